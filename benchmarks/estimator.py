"""How well the `VerificationTimeEstimator` predicts batch times, per engine backend.

For each backend, in its own process: the estimator is profiled exactly as
at server start-up, then predicts held-out batches of random composition
(1-16 sessions, contexts up to ~1500 tokens, 0-8 drafts, new sessions
mixed in) before each runs, and learns from each afterwards, as in serving.
Reported: the mean absolute percentage error (MAPE) of those predictions,
for the first and the second half of the held-out batches (the online
refinement), and the fitted coefficients.

    python benchmarks/estimator.py
    python benchmarks/estimator.py --backends hf --batches 100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, print_table, run_worker, write_json  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    from wisp_common.config import ServerConfig
    from wisp_common.request import SamplingParams
    from wisp_server.engine import RoundRequest
    from wisp_server.estimator import SequenceShape, VerificationTimeEstimator, profile
    from wisp_server.server import build_engine

    config = ServerConfig(
        target_model=args.target_model,
        engine=args.worker,
        dtype=args.dtype,
        max_sessions=32,
        max_context_tokens=2048,
        max_batch_tokens=16 * 1600,
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
        while len(live) < rng.randrange(1, 17):  # sessions come and go
            sid, next_id = f"s{next_id}", next_id + 1
            engine.add_session(
                sid, [rng.randrange(vocab) for _ in range(rng.randrange(16, 1500))], SamplingParams(), 2048
            )
            live[sid] = 0
        for sid in [s for s in live if rng.random() < 0.1]:
            engine.remove_session(sid)
            del live[sid]
        batch = rng.sample(sorted(live), k=min(len(live), rng.randrange(1, 17)))
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the CPU computes in it, else float32")
    parser.add_argument("--backends", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    parser.add_argument("--batches", type=int, default=200, help="held-out batches per backend")
    parser.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    results = {}
    for backend in args.backends:
        print(f"measuring {backend} ...", file=sys.stderr, flush=True)
        results[backend] = run_worker(__file__, backend)
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
    png = RESULTS / "estimator.png"
    plot(results, png)
    print(f"wrote {write_json('estimator', {'args': vars(args), 'results': results})} and {png}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
