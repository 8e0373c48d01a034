"""How well the `VerificationTimeEstimator` predicts batch times, per engine backend.

For each backend, in its own process: the estimator is profiled exactly as
at server start-up, then predicts held-out batches of random composition
(1-16 sessions, contexts up to ~1500 tokens, 0-8 drafts, new sessions
mixed in) before each runs, and learns from each afterwards, as in serving.
Reported: the mean absolute percentage error (MAPE) of those predictions,
for the first and the second half of the held-out batches (the online
refinement), and the fitted coefficients.

    python -m benchmarks.estimator
    python -m benchmarks.estimator --backends hf --batches 100
    python -m benchmarks.estimator --backends hf --batches 6 --max-sessions 2 --max-prompt-tokens 64  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from benchmarks.common import add_common_options
from benchmarks.report import print_table, run_worker, save_plot, write_json


def worker(args: argparse.Namespace) -> dict:
    from wisp_common.config import ServerConfig
    from wisp_common.request import SamplingParams
    from wisp_server.engines.base import RoundRequest
    from wisp_server.engines.factory import build_engine
    from wisp_server.estimator import SequenceShape, VerificationTimeEstimator, profile

    config = ServerConfig(
        target_model=args.target_model,
        engine=args.worker,
        dtype=args.dtype,
        max_sessions=32,
        max_context_tokens=2048,
        max_batch_tokens=16 * 1600,
        max_batch_sessions=args.max_sessions,  # the profile's largest batch too
        kv_cache_gib=2.0,
    )
    engine = build_engine(config)
    estimator = VerificationTimeEstimator(padded=engine.pads_batches)
    started = time.monotonic()
    profile(engine, estimator, config.max_batch_sessions, config.max_context_tokens, config.max_draft_tokens)
    profile_seconds = time.monotonic() - started

    rng = random.Random(1)
    vocab = engine.info.vocab_size
    live: dict[str, int] = {}  # session -> committed tokens whose KV is cached
    errors: list[float] = []
    next_id = 0
    for _ in range(args.batches):
        while len(live) < rng.randrange(1, args.max_sessions + 1):  # sessions come and go
            sid, next_id = f"s{next_id}", next_id + 1
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(16, args.max_prompt_tokens))]
            engine.add_session(sid, prompt, SamplingParams(), 2048)
            live[sid] = 0
        for sid in [s for s in live if rng.random() < 0.1]:
            engine.remove_session(sid)
            del live[sid]
        batch = rng.sample(sorted(live), k=min(len(live), rng.randrange(1, args.max_sessions + 1)))
        drafts = {sid: rng.randrange(0, 9) for sid in batch}
        shapes = [SequenceShape(live[s], engine.uncached_tokens(s) + drafts[s]) for s in batch]
        predicted = estimator.estimate(shapes)
        start = time.perf_counter()
        results = engine.verify([RoundRequest(s, tuple(rng.randrange(vocab) for _ in range(drafts[s]))) for s in batch])
        seconds = time.perf_counter() - start
        estimator.observe(shapes, seconds)
        errors.append(abs(predicted - seconds) / seconds)
        for sid, shape, result in zip(batch, shapes, results):
            live[sid] = shape.context_tokens + shape.new_tokens - drafts[sid] + result.num_accepted
            if live[sid] > 1900:
                engine.remove_session(sid)
                del live[sid]
    half = len(errors) // 2
    return {
        "profile_seconds": profile_seconds,
        "mape_first_half": 100 * sum(errors[:half]) / half,
        "mape_second_half": 100 * sum(errors[half:]) / (len(errors) - half),
        "mape": 100 * sum(errors) / len(errors),
        "coefficients": estimator.coefficients,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.estimator", description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--batches", type=int, default=200, help="held-out batches per backend")
    parser.add_argument(
        "--max-sessions", type=int, default=16, help="most sessions in a held-out batch, and in the profile's (1-16)"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=1500, help="longest prompt of a new held-out session (17-1500)"
    )
    parser.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.max_sessions <= 16 or not 17 <= args.max_prompt_tokens <= 1500:
        parser.error("--max-sessions must be within 1-16 and --max-prompt-tokens within 17-1500")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results = {}
    for backend in args.backends:
        print(f"measuring {backend} ...", file=sys.stderr, flush=True)
        results[backend] = run_worker("benchmarks.estimator", backend)
    rows = [
        [
            b,
            round(r["mape"], 1),
            round(r["mape_first_half"], 1),
            round(r["mape_second_half"], 1),
            round(r["profile_seconds"], 1),
        ]
        for b, r in results.items()
    ]
    print_table(["backend", "MAPE %", "first half", "second half", "profile s"], rows)
    png = plot(results)
    print(f"wrote {write_json('estimator', {'args': vars(args), 'results': results})} and {png}")
    return 0


def plot(results: dict) -> Path:
    def draw(ax) -> None:
        names = list(results)
        width = 0.35
        for offset, key, label in (
            (-width / 2, "mape_first_half", "first half"),
            (width / 2, "mape_second_half", "second half"),
        ):
            ax.bar([i + offset for i in range(len(names))], [results[n][key] for n in names], width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set(title="verification time estimator, held-out batches", ylabel="MAPE %")
        ax.legend()

    return save_plot("estimator", draw, figsize=(6, 4))


if __name__ == "__main__":
    sys.exit(main())
