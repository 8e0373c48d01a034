"""Device profiles: how fast an emulated edge device drafts, and the network between it and the server.

The figures live in ``profiles.json`` next to this module (package data), one profile per device class, and every
number there names its source. ``docs/device-profiles.md`` shows the derivations. This module also holds the tools
the figures came from:

* `measure_draft_seconds_per_token`: times the real default draft at batch 1 on this machine (the laptop figure);
* `draft_cost` and `roofline_seconds_per_token`: a draft's bytes read and FLOPs per token, and the time a device
  with a given memory bandwidth, compute rate and per-step overhead needs for them (the Jetson and Pi figures).

    python -m wisp_bench.profiles measure      # times the draft, its per-step overhead, this CPU's memory and FLOPs
    python -m wisp_bench.profiles derive       # recomputes every derived draft time in profiles.json

Nothing here imports torch at module level: the benchmark's devices only read the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROFILES_FILE = Path(__file__).with_name("profiles.json")
DEFAULT_DRAFT = "smollm2-135m-wisp-draft"
# The JSON's numeric fields; each needs an entry in the profile's ``sources``.
SOURCED_FIELDS = ("draft_seconds_per_token", "rtt_seconds", "bandwidth_bytes_per_second", "jitter_seconds")
DERIVATION_FIELDS = (
    "bytes_per_value",
    "context_tokens",
    "memory_bytes_per_second",
    "memory_efficiency",
    "flops_per_second",
    "compute_efficiency",
    "overhead_seconds",
)


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Times in seconds, rates in bytes per second; ``sources`` maps each JSON field to where its
    figure comes from. ``jitter_seconds`` is the standard deviation of the round trip time (see `wisp_bench.network`).
    """

    name: str
    draft_seconds_per_token: float
    rtt_seconds: float
    uplink_bytes_per_second: float  # device -> server
    downlink_bytes_per_second: float  # server -> device
    jitter_seconds: float
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    description: str = field(default="", compare=False)


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """The profiles in ``path`` (default: the packaged ``profiles.json``), by name; checks every field and source."""
    path = Path(path) if path is not None else PROFILES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read device profiles: {error}") from error
    raw = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected an object with a non-empty 'profiles' object")
    return {name: _profile_of(name, entry, path) for name, entry in raw.items()}


def profile(name: str, path: str | Path | None = None) -> DeviceProfile:
    """The profile called ``name``; a ValueError naming the known ones if there is none."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ValueError(f"unknown device profile {name!r}; known profiles: {', '.join(sorted(profiles))}")
    return profiles[name]


def _profile_of(name: str, entry: dict, path: Path) -> DeviceProfile:
    where = f"{path}: profile {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    missing = [key for key in SOURCED_FIELDS if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    sources = entry.get("sources")
    if not isinstance(sources, dict):
        raise ValueError(f"{where}: needs a 'sources' object naming the source of every number")
    unsourced = [key for key in SOURCED_FIELDS if not (isinstance(sources.get(key), str) and sources[key].strip())]
    if unsourced:
        raise ValueError(f"{where}: no source for {', '.join(unsourced)}")
    bandwidth = entry["bandwidth_bytes_per_second"]
    if isinstance(bandwidth, dict):
        if set(bandwidth) != {"uplink", "downlink"}:
            raise ValueError(f"{where}: bandwidth_bytes_per_second needs exactly 'uplink' and 'downlink'")
        uplink, downlink = bandwidth["uplink"], bandwidth["downlink"]
    else:
        uplink = downlink = bandwidth
    values = {
        "draft_seconds_per_token": entry["draft_seconds_per_token"],
        "rtt_seconds": entry["rtt_seconds"],
        "uplink_bytes_per_second": uplink,
        "downlink_bytes_per_second": downlink,
        "jitter_seconds": entry["jitter_seconds"],
    }
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        if value < 0 or (value == 0 and key != "jitter_seconds"):
            raise ValueError(f"{where}: {key} must be {'>= 0' if key == 'jitter_seconds' else '> 0'}, got {value}")
    return DeviceProfile(
        name=name,
        **{key: float(value) for key, value in values.items()},
        sources=dict(sources),
        description=str(entry.get("description", "")),
    )


# --- what a draft costs per token -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftCost:
    """What one draft step (one token, batch 1, with a KV cache) reads and computes, from the draft's shapes.

    ``matmul_params``: weights of every matrix product per step (fusion layer, decoder projections, output head
    rows). ``other_params``: weights read but not multiplied (norms, the token's embedding row).
    ``kv_values_per_position``: K and V values cached per context position, all layers.
    ``attention_flops_per_position``: FLOPs of QK^T and attention x V per context position, all layers.
    """

    matmul_params: int
    other_params: int
    kv_values_per_position: int
    attention_flops_per_position: int

    def bytes_per_token(self, bytes_per_value: float, context: int) -> float:
        """Weights plus the KV cache read at ``context`` positions, in a dtype of ``bytes_per_value`` bytes."""
        return bytes_per_value * (self.matmul_params + self.other_params + self.kv_values_per_position * context)

    def flops_per_token(self, context: int) -> float:
        """2 per multiply-add of the matrix products, plus attention over ``context`` positions."""
        return 2 * self.matmul_params + self.attention_flops_per_position * context


def draft_cost(draft: str | Path = DEFAULT_DRAFT) -> DraftCost:
    """The cost per token of an EAGLE-style draft (`wisp_common.eagle`), from its config and weights' header only.

    A fused draft's fusion of the target's layers (`EagleDraftModel.fuse`) runs once per verdict, over the
    committed rows, not once per step: amortized over a round of 4 drafts, about 1% of a step's reads; left out."""
    from wisp_common.models import resolve_model

    path = Path(resolve_model(str(draft)))
    config = json.loads((path / "config.json").read_text())
    decoder, layers = config["decoder"], config.get("layers", 1)
    hidden, inter = decoder["hidden_size"], decoder["intermediate_size"]
    heads, kv_heads = decoder["num_attention_heads"], decoder["num_key_value_heads"]
    head_dim = decoder.get("head_dim") or hidden // heads
    head_rows = _safetensors_shapes(path / "model.safetensors")["head_ids"][0]
    per_layer = (
        hidden * heads * head_dim  # q
        + 2 * hidden * kv_heads * head_dim  # k, v
        + heads * head_dim * hidden  # o
        + 3 * hidden * inter  # gate, up, down
    )
    return DraftCost(
        matmul_params=2 * hidden * hidden + layers * per_layer + head_rows * hidden,
        other_params=layers * 2 * hidden + hidden + hidden,  # two norms per layer, the final norm, an embedding row
        kv_values_per_position=layers * 2 * kv_heads * head_dim,
        attention_flops_per_position=layers * 2 * 2 * heads * head_dim,
    )


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def roofline_seconds_per_token(
    cost: DraftCost,
    *,
    bytes_per_value: float,
    context_tokens: int,
    memory_bytes_per_second: float,
    memory_efficiency: float,
    flops_per_second: float,
    compute_efficiency: float,
    overhead_seconds: float,
) -> float:
    """max(bytes / (efficiency x bandwidth), FLOPs / (efficiency x peak)) + a fixed per-step overhead."""
    memory = cost.bytes_per_token(bytes_per_value, context_tokens) / (memory_efficiency * memory_bytes_per_second)
    compute = cost.flops_per_token(context_tokens) / (compute_efficiency * flops_per_second)
    return max(memory, compute) + overhead_seconds


def derived_draft_seconds(derivation: dict, cost: DraftCost) -> float:
    """The roofline time for a profile's ``derivation`` block in profiles.json."""
    missing = [key for key in DERIVATION_FIELDS if key not in derivation]
    if missing:
        raise ValueError(f"derivation lacks {', '.join(missing)}")
    return roofline_seconds_per_token(cost, **{key: derivation[key] for key in DERIVATION_FIELDS})


# --- measured on this machine -----------------------------------------------------------------------------------


def measure_draft_seconds_per_token(
    draft: str = DEFAULT_DRAFT,
    tokens: int = 32,
    turns: int = 5,
    context: int = 512,
    threads: int = 1,
    prompts: str | Path | None = None,
    statistic: str = "median",
    clock: str = "cpu",
    evict_mib: int = 0,
) -> float:
    """Seconds per drafted token at batch 1, fp32 on the CPU with ``threads`` torch threads: the ``statistic``
    (`STATISTICS`) of the per-token times on ``clock`` (`CLOCKS`).

    Loads the real draft through `wisp_edge.draft_loader.drafter_factory` and its target, builds a ``context``-token
    chat context from the MT-Bench questions, computes the target's real features over it (as a verdict would bring
    them), lets the drafter read them once (the pass over the context, not a per-token cost), then times ``tokens``
    consecutive `draft_one` calls (the draft's own predicted features fed back, the KV cache growing), ``turns``
    times over. A `draft_one` is what drafting costs on the edge: fusion layer, decoder layers, trimmed head,
    the confidence signals and the pick.

    ``clock`` "cpu" counts this thread's CPU time (`time.thread_time`; with one torch thread all the work runs in
    the calling thread), so the time other processes hold the core does not count: on a shared machine it is
    closer to what an idle core would take than "wall" (`time.perf_counter`), though their cache and memory
    traffic still slows it. With more than one thread only "wall" means anything.
    """
    times = draft_step_times(draft, tokens, turns, context, threads, prompts, evict_mib)
    return _statistic(times[_clock(clock)], statistic)


def draft_step_times(
    draft: str = DEFAULT_DRAFT,
    tokens: int = 32,
    turns: int = 5,
    context: int = 512,
    threads: int = 1,
    prompts: str | Path | None = None,
    evict_mib: int = 0,
) -> dict[str, list[float]]:
    """Every timed `draft_one` of `measure_draft_seconds_per_token`, in seconds, by clock ("wall", "cpu").

    ``evict_mib`` > 0 reads that many MiB before each step, so that the draft's weights come from memory, not
    from a server CPU's last-level cache: a laptop's (tens of MiB) cannot hold them, this Xeon's 300 MiB can."""
    import torch

    from wisp_common.features import computed_feature_rows
    from wisp_common.models import load_causal_lm, load_tokenizer

    with _torch_threads(threads):
        make = _drafter_factory(draft)
        drafter = make()
        ids = _context_ids(load_tokenizer(draft), context, prompts)
        target = load_causal_lm(drafter.model.target, "float32", "cpu")
        with torch.inference_mode():
            features = computed_feature_rows(target, ids, drafter.model.feature_layers)
        del target
        return _time_drafting(make, ids, features, tokens, turns, evict_mib)


def measure_step_overhead_seconds(
    draft: str = DEFAULT_DRAFT,
    tokens: int = 32,
    turns: int = 5,
    context: int = 512,
    threads: int = 1,
    statistic: str = "median",
    clock: str = "cpu",
) -> float:
    """Seconds per `draft_one` (their ``statistic`` on ``clock``) of a copy of the draft shrunk to width 18: same
    layers, same code path, a 64-row head. What a step costs when its matrices cost next to nothing: Python,
    dispatch and per-operator overhead."""
    return _statistic(overhead_step_times(draft, tokens, turns, context, threads)[0][_clock(clock)], statistic)


def overhead_step_times(
    draft: str = DEFAULT_DRAFT, tokens: int = 32, turns: int = 5, context: int = 512, threads: int = 1
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every timed step of `measure_step_overhead_seconds`, and the aten operators one step calls (top-level
    calls per step, by name, from the torch profiler)."""
    import collections

    import torch

    from wisp_common.eagle import EagleDraftModel
    from wisp_edge.eagle import EagleDrafter

    with _torch_threads(threads):
        real = _drafter_factory(draft)().model
        width, vocab = 18, real.embed.weight.shape[0]  # a multiple of the 9 heads, as LlamaConfig wants
        decoder = dict(real.decoder_config, hidden_size=width, intermediate_size=width, head_dim=8)
        generator = torch.Generator().manual_seed(0)
        embedding = torch.randn(vocab, width, generator=generator)
        tiny = EagleDraftModel(
            real.target, decoder, embedding, None, real.head_ids[:64], real.layers, feature_layers=real.feature_layers
        ).eval()  # a fused draft's rows are wider: its fusion is part of each commit's cost
        ids = torch.randint(0, vocab, (context,), generator=generator).tolist()
        features = torch.randn(context, tiny.feature_width, generator=generator)
        times = _time_drafting(lambda: EagleDrafter(tiny), ids, features, tokens, turns)
        drafter = EagleDrafter(tiny)
        drafter.start(ids[:-1])
        drafter.commit(0, ids[-1], features[:-1])
        drafter.draft_one()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(tokens):
                drafter.draft_one()
        calls = collections.Counter(
            event.name for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None
        )
        return times, {name: count / tokens for name, count in calls.most_common()}


def measure_memory_read_bytes_per_second(megabytes: int = 512, repeats: int = 5) -> float:
    """Best single-thread read bandwidth: summing an fp32 array far larger than the caches."""
    import torch

    with _torch_threads(1):
        data = torch.ones(megabytes * 2**20 // 4)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        return data.numel() * 4 / best


def measure_matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    """Best single-thread fp32 matrix-product rate (a square product of ``size``)."""
    import torch

    with _torch_threads(1):
        a, b = torch.randn(size, size), torch.randn(size, size)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _drafter_factory(draft: str):
    from wisp_edge.draft_loader import drafter_factory

    return drafter_factory(draft, dtype="float32", device="cpu")


def _context_ids(tokenizer, context: int, prompts: str | Path | None) -> list[int]:
    from wisp_bench import MT_BENCH
    from wisp_common.prompts import encode_prompt, load_prompts

    ids: list[int] = []
    for text in load_prompts(prompts or MT_BENCH):
        ids += encode_prompt(tokenizer, text, chat=True)
        if len(ids) >= context:
            return ids[:context]
    raise ValueError(f"the prompts make only {len(ids)} tokens, fewer than a context of {context}")


def _time_drafting(
    make, ids: list[int], features, tokens: int, turns: int, evict_mib: int = 0
) -> dict[str, list[float]]:
    import torch

    evictor = torch.ones(evict_mib * 2**20 // 4) if evict_mib > 0 else None
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for _ in range(turns):
        drafter = make()
        drafter.start(ids[:-1])
        drafter.commit(0, ids[-1], features[:-1])
        drafter.draft_one()  # the pass over the context's features
        for _ in range(tokens):
            if evictor is not None:
                evictor.sum()
            wall, cpu = time.perf_counter(), time.thread_time()
            drafter.draft_one()
            times["cpu"].append(time.thread_time() - cpu)
            times["wall"].append(time.perf_counter() - wall)
    return times


STATISTICS = ("median", "p10", "min")
CLOCKS = ("cpu", "wall")


def _clock(clock: str) -> str:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    return clock


def _statistic(times: list[float], statistic: str) -> float:
    if statistic == "median":
        return statistics.median(times)
    if statistic == "p10":
        return statistics.quantiles(times, n=10)[0]
    if statistic == "min":
        return min(times)
    raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="time the draft, its per-step overhead, memory and FLOPs here")
    measure.add_argument("--draft", default=DEFAULT_DRAFT)
    measure.add_argument("--tokens", type=int, default=32)
    measure.add_argument("--turns", type=int, default=5)
    measure.add_argument("--context", type=int, default=512)
    measure.add_argument("--threads", type=int, default=1)
    measure.add_argument(
        "--evict-mib",
        type=int,
        default=1024,
        help="MiB read before each timed draft step so the draft's weights come from memory, as on a laptop whose "
        "caches cannot hold them (default %(default)s; 0 times it with warm caches)",
    )
    derive = sub.add_parser("derive", help="recompute the derived draft times in profiles.json")
    derive.add_argument("--profiles", default=str(PROFILES_FILE))
    derive.add_argument("--draft", default=DEFAULT_DRAFT)
    args = parser.parse_args(argv)
    if args.command == "measure":
        import os

        from wisp_common.models import hardware_name

        load = os.getloadavg()
        draft = draft_step_times(args.draft, args.tokens, args.turns, args.context, args.threads, None, args.evict_mib)
        warm = draft_step_times(args.draft, args.tokens, args.turns, args.context, args.threads)
        overhead, calls = overhead_step_times(args.draft, args.tokens, args.turns, args.context, args.threads)
        result = {
            "cpu": hardware_name(),
            "threads": args.threads,
            "context": args.context,
            "load_average_before": load,
            "evict_mib": args.evict_mib,
            "draft_seconds_per_token": {c: {s: _statistic(draft[c], s) for s in STATISTICS} for c in CLOCKS},
            "draft_seconds_per_token_warm_caches": {c: {s: _statistic(warm[c], s) for s in STATISTICS} for c in CLOCKS},
            "overhead_seconds_per_step": {c: {s: _statistic(overhead[c], s) for s in STATISTICS} for c in CLOCKS},
            "aten_calls_per_step": sum(calls.values()),
            "aten_calls_by_name": calls,
            "memory_read_bytes_per_second": measure_memory_read_bytes_per_second(),
            "matmul_flops_per_second": measure_matmul_flops_per_second(),
            "load_average_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"),
        }
    else:
        cost = draft_cost(args.draft)
        data = json.loads(Path(args.profiles).read_text())
        result = {"cost": vars(cost), "bytes_per_token_fp32_512": cost.bytes_per_token(4, 512)}
        result["flops_per_token_512"] = cost.flops_per_token(512)
        for name, entry in data["profiles"].items():
            if "derivation" in entry:
                result[name] = {
                    "derived": derived_draft_seconds(entry["derivation"], cost),
                    "in_profile": entry["draft_seconds_per_token"],
                }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
