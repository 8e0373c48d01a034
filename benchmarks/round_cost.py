"""Server time per verification round, side by side in one run:

* `vllm`   - WISP's vllm engine verifying 4 drafts per session (sessions resident in the paged KV cache);
* `hf`     - WISP's hf engine verifying the same (per-session KV tensors, padded into one batch);
* `decode` - a plain vLLM decode step of the same sessions, no WISP hooks: the centralized cost.

Each configuration runs in its own process (vLLM sets process-wide thread
state) with the same thread binding. This machine is noisy, so the
configurations take turns, in alternating order, ``--repeats`` times, and
each cell reports the median over the turns. Drafts are random tokens, so
nearly all are rejected and every round computes the full 1 + 4 new tokens
per session.

Where the time goes is profiled too (torch.profiler, the largest cell only):
attention, matrix products, and everything else, in ms per round.

    python -m benchmarks.round_cost                       # 1/4/8/16 sessions, ~100 and ~1000 tokens
    python -m benchmarks.round_cost --sessions 1 16 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import add_common_options
from benchmarks.report import print_table, run_worker, save_plot, write_json

CONFIGS = ("vllm", "hf", "decode")
PARTS = ("attention", "matmul", "other")


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(length)]


def server_config(args: argparse.Namespace, engine: str):
    from wisp_common.config import ServerConfig

    return ServerConfig(
        engine=engine,
        target_model=args.target_model,
        dtype=args.dtype,
        max_context_tokens=max(args.contexts) + (2 * args.rounds + 3 * args.warmup + 8) * (args.drafts + 1),
        max_sessions=max(args.sessions),
        max_draft_tokens=args.drafts,
        max_batch_tokens=max(args.sessions) * max(args.contexts) + 64,
        kv_cache_gib=args.kv_cache_gib,
    )


def time_rounds(step, rounds: int) -> float:
    """Median milliseconds of ``step()`` over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_rounds(step, rounds: int) -> dict[str, float]:
    """Milliseconds per round of ``step()`` spent in attention, matrix products and the rest (operators' self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    parts = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        part = "attention" if "attention" in name else "matmul" if "mm" in name or "linear" in name else "other"
        parts[part] += event.self_cpu_time_total / 1000 / rounds
    return parts


def worker_verify(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from wisp_common.request import SamplingParams
    from wisp_server.engines.base import RoundRequest
    from wisp_server.engines.factory import build_engine

    config = server_config(args, args.worker)
    engine = build_engine(config)
    rng = random.Random(0)
    results = {}
    warmup = args.warmup * 3  # the first multi-token steps after start are slower
    for context in args.contexts:
        for n in args.sessions:
            ids = [f"{context}-{n}-{i}" for i in range(n)]
            for sid in ids:
                engine.add_session(sid, random_prompt(rng, context), SamplingParams(), config.max_context_tokens)
            engine.verify([RoundRequest(sid, ()) for sid in ids])  # prefill, not timed

            def step(ids: list[str] = ids) -> None:
                engine.verify([RoundRequest(sid, tuple(random_prompt(rng, args.drafts))) for sid in ids])

            time_rounds(step, warmup)
            warmup = args.warmup
            results[f"{context}/{n}"] = time_rounds(step, args.rounds)
            if (context, n) == (args.contexts[-1], args.sessions[-1]):
                breakdown = profile_rounds(step, args.rounds)
            for sid in ids:
                engine.remove_session(sid)
            print(
                f"  {args.worker}: context {context}, {n} sessions: {results[f'{context}/{n}']:.1f} ms", file=sys.stderr
            )
    return {"ms": results, "breakdown": breakdown}


def worker_decode(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Plain vLLM: every step decodes one token for every running request."""
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.inputs import TokensPrompt

    from wisp_common.models import resolve_device, resolve_dtype, resolve_model
    from wisp_server.engines.vllm_engine import configure_environment, device_settings

    config = server_config(args, "vllm")
    device = resolve_device(config.device)
    settings = device_settings(device)
    configure_environment(settings)
    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=resolve_model(args.target_model),
            dtype=resolve_dtype(args.dtype, device),
            max_model_len=config.max_context_tokens + 1,
            block_size=settings.block_size,
            max_num_seqs=config.max_sessions,
            max_num_batched_tokens=config.max_batch_tokens,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            enable_prefix_caching=False,
            enforce_eager=settings.enforce_eager,
            async_scheduling=False,
            seed=0,
        )
    )
    rng = random.Random(0)
    results = {}
    warmup = args.warmup * 3
    for context in args.contexts:
        for n in args.sessions:
            params = SamplingParams(
                temperature=0, max_tokens=warmup + 2 * args.rounds + 4, ignore_eos=True, detokenize=False
            )
            ids = [f"{context}-{n}-{i}" for i in range(n)]
            for rid in ids:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=random_prompt(rng, context)), params)
            started: set[str] = set()
            while len(started) < n:  # prefill, not timed
                started |= {o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids}
            time_rounds(engine.step, warmup)
            warmup = args.warmup
            results[f"{context}/{n}"] = time_rounds(engine.step, args.rounds)
            if (context, n) == (args.contexts[-1], args.sessions[-1]):
                breakdown = profile_rounds(engine.step, args.rounds)
            while engine.has_unfinished_requests():
                engine.step()
            print(f"  decode: context {context}, {n} sessions: {results[f'{context}/{n}']:.1f} ms", file=sys.stderr)
    return {"ms": results, "breakdown": breakdown}


def plot(results: dict[str, dict[str, float]], args: argparse.Namespace) -> Path:
    def draw(*axes) -> None:
        for ax, context in zip(axes, args.contexts):
            for name in CONFIGS:
                sessions = args.sessions
                ax.plot(sessions, [results[name][f"{context}/{n}"] for n in sessions], marker="o", label=name)
            ax.set(title=f"context ~{context} tokens, {args.drafts} drafts", xlabel="sessions", ylabel="ms per round")
            ax.grid(alpha=0.3)
            ax.legend()

    return save_plot("round_cost", draw, ncols=len(args.contexts), figsize=(5 * len(args.contexts), 4))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.round_cost", description=__doc__.splitlines()[0])
    add_common_options(parser, repeats=True)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per cell (3x for the first)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        work = worker_decode if args.worker == "decode" else worker_verify
        print(json.dumps(work(args)))
        return 0

    turns: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        for name in CONFIGS if repeat % 2 == 0 else reversed(CONFIGS):
            print(f"measuring {name} (turn {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            turns[name].append(run_worker("benchmarks.round_cost", name))

    def median(name: str, field: str) -> dict[str, float]:
        runs = [turn[field] for turn in turns[name]]
        return {key: statistics.median(run[key] for run in runs) for key in runs[0]}

    results = {name: median(name, "ms") for name in CONFIGS}
    breakdown = {name: median(name, "breakdown") for name in CONFIGS}

    rows = []
    for context in args.contexts:
        for n in args.sessions:
            key = f"{context}/{n}"
            v, h, d = (results[c][key] for c in CONFIGS)
            rows.append([context, n, v, h, d, round(v / d, 2), round(h / d, 2)])
    print_table(["context", "sessions", "vllm ms", "hf ms", "decode ms", "vllm/decode", "hf/decode"], rows)
    small, large = min(args.contexts), max(args.contexts)
    growth = {n: round(results["vllm"][f"{large}/{n}"] / results["vllm"][f"{small}/{n}"], 2) for n in args.sessions}
    print(f"vllm round cost growth from ~{small} to ~{large} tokens of context: {growth}")
    print(f"\nwhere a round's time goes, context ~{large}, {max(args.sessions)} sessions (ms, profiled):")
    print_table(["config", *PARTS], [[name, *(breakdown[name][part] for part in PARTS)] for name in CONFIGS])

    png = plot(results, args)
    path = write_json(
        "round_cost",
        {
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "ms_per_round": results,
            "vllm_growth": growth,
            "breakdown_ms": breakdown,
        },
    )
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
