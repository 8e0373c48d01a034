"""Calibrates the modeled-GPU cost model (docs/modeled-gpu.md) against step times measured on the GPU at hand.

Two steps, because the GPU host has neither vLLM nor the target's weights:

    python -m benchmarks.gpu_calibration measure --gpu-model h200/qwen3-32b   # on the GPU: the measured points
    python -m benchmarks.gpu_calibration fit --points gpu_calibration_points.json [--write]   # anywhere

`measure` builds a decoder of the target's exact shape (its layers, widths, heads and vocabulary, checked
against its published parameter count) with random bf16 weights, in place, and times one step of it per
shape of the grid docs/modeled-gpu.md names: every layer's projections, RMS norms, rotary embedding, attention
over a KV cache of the shape's context plus its new tokens, the SwiGLU MLP, and the output head on every new
token (verification needs each one's logits). Each step is replayed from a CUDA graph, as vLLM replays its
decode steps; eager times are kept beside. What it leaves out is the serving stack's host-side work
(scheduling, input preparation, sampling): that part of `step_overhead_s` stays an assumption.

`fit` finds the `memory_efficiency`, `compute_efficiency` and fixed GPU time per step that minimize the squared
relative error of the roofline against the measured times, prints a table, writes JSON and a plot, and with
`--write` fills the model's `calibration` in wisp_server/engines/gpu_models.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wisp_server.engines.modeled_engine import GPU_MODELS_PATH, GpuCostModel, TargetSpec, load_gpu_model
from wisp_server.estimator import SequenceShape

NAME = "gpu_calibration"
CONTEXTS = (128, 1000, 4000)
SESSIONS = (1, 4, 16, 64)
NEW_TOKENS = (1, 2, 5, 9)
PREFILLS = (128, 512, 2048)
ASSUMED = ("memory_efficiency", "compute_efficiency")  # what the fit is compared with (the overhead is host-side)
# Host-side work of a serving step that a bare forward pass does not do; docs/modeled-gpu.md's assumption.
HOST_OVERHEAD_S = 0.003
HOST_OVERHEAD_SOURCE = (
    "ASSUMPTION, not measured here: vLLM's host-side work per step (scheduling, input preparation, sampling); "
    "WukLab's analysis of vLLM (mlsys.wuklab.io/posts/scheduling_overhead), 2-5 ms"
)


@dataclass(frozen=True)
class Shape:
    """``sessions`` sequences, each with ``context`` cached tokens and ``new_tokens`` to compute."""

    sessions: int
    new_tokens: int
    context: int

    @property
    def kv_tokens(self) -> int:
        return self.sessions * (self.context + self.new_tokens)

    def shapes(self) -> list[SequenceShape]:
        return [SequenceShape(context_tokens=self.context, new_tokens=self.new_tokens)] * self.sessions


def grid(max_kv_tokens: int) -> list[Shape]:
    """docs/modeled-gpu.md's grid, less the shapes whose KV cache would not fit beside the weights."""
    shapes = [Shape(s, n, c) for c in CONTEXTS for s in SESSIONS for n in NEW_TOKENS]
    shapes += [Shape(1, p, 0) for p in PREFILLS]
    return [s for s in shapes if s.kv_tokens <= max_kv_tokens]


# ---------------------------------------------------------------------------------------------------------------------
# measure


class RandomDecoder:
    """A decoder of ``target``'s shape with random weights: what a step reads and multiplies, not what it says.

    Llama's layout (RMS norms, fused QKV, rotary embedding, grouped-query attention, SwiGLU MLP), with Qwen3's
    per-head q/k norms where the published parameter count has them.
    """

    def __init__(self, target: TargetSpec, device: str, dtype: torch.dtype = torch.bfloat16) -> None:
        t = self.t = target
        self.q_width, self.kv_width = t.attention_heads * t.head_dim, t.kv_heads * t.head_dim
        per_layer = (
            t.hidden_size * (self.q_width + 2 * self.kv_width)
            + self.q_width * t.hidden_size
            + 3 * t.hidden_size * t.intermediate_size
            + 2 * t.hidden_size
        )
        embeddings = t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
        plain = t.layers * per_layer + embeddings + t.hidden_size
        qk_norms = t.parameters - plain
        if qk_norms not in (0, t.layers * 2 * t.head_dim):
            raise ValueError(
                f"{t.name}: a Llama-shaped decoder has {plain:,} parameters, the table says {t.parameters:,}"
            )
        self.qk_norm = qk_norms > 0

        def weight(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype).normal_(0, 0.02)

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, dtype=dtype)

        self.embed = weight(t.vocab_size, t.hidden_size)
        self.head = self.embed if t.tie_word_embeddings else weight(t.vocab_size, t.hidden_size)
        self.norm = ones(t.hidden_size)
        self.layers = [
            {
                "norm1": ones(t.hidden_size),
                "qkv": weight(self.q_width + 2 * self.kv_width, t.hidden_size),
                "q_norm": ones(t.head_dim) if self.qk_norm else None,
                "k_norm": ones(t.head_dim) if self.qk_norm else None,
                "o": weight(t.hidden_size, self.q_width),
                "norm2": ones(t.hidden_size),
                "gate_up": weight(2 * t.intermediate_size, t.hidden_size),
                "down": weight(t.hidden_size, t.intermediate_size),
            }
            for _ in range(t.layers)
        ]

    def parameters(self) -> int:
        tensors = [self.embed, self.norm, *(w for layer in self.layers for w in layer.values() if w is not None)]
        if self.head is not self.embed:
            tensors.append(self.head)
        return sum(w.numel() for w in tensors)

    def kv_cache(self, shape: Shape) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random keys and values for every layer, room for the new tokens included."""
        size = (shape.sessions, self.t.kv_heads, shape.context + shape.new_tokens, self.t.head_dim)
        like = self.embed
        return [
            tuple(torch.empty(size, device=like.device, dtype=like.dtype).normal_() for _ in range(2))
            for _ in self.layers
        ]

    def rotary(self, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.t.head_dim // 2
        inverse = 1.0 / (1e6 ** (torch.arange(half, device=self.embed.device, dtype=torch.float32) / half))
        angles = torch.outer(
            torch.arange(shape.context, shape.context + shape.new_tokens, device=inverse.device), inverse
        )
        angles = torch.cat([angles, angles], -1)[None, :, None, :]  # [1, n, 1, head_dim]
        return angles.cos().to(self.embed.dtype), angles.sin().to(self.embed.dtype)

    def step(self, ids: torch.Tensor, cache, rotary) -> torch.Tensor:
        """One forward step of ``ids`` [sessions, new tokens] after the cached context; returns every logit.

        After a context, attention runs as decode kernels run it: a KV head's query heads (and new tokens) are the
        rows of one attention, with no mask. That leaves out the causal mask among the new tokens, at most
        n(n+1)/2 of the n(c+n) scores, and keeps every verification step on the kernel a decode step uses
        (a masked kernel measured several times slower at a few rows). A prefill is causal.
        """
        t, (b, n) = self.t, ids.shape
        group, context = t.attention_heads // t.kv_heads, cache[0][0].shape[2] - n
        cos, sin = rotary
        x = F.embedding(ids, self.embed)
        for layer, (keys, values) in zip(self.layers, cache):
            h = F.rms_norm(x, (t.hidden_size,), layer["norm1"], 1e-6)
            q, k, v = F.linear(h, layer["qkv"]).split([self.q_width, self.kv_width, self.kv_width], -1)
            q, k = q.view(b, n, t.attention_heads, t.head_dim), k.view(b, n, t.kv_heads, t.head_dim)
            if self.qk_norm:
                q = F.rms_norm(q, (t.head_dim,), layer["q_norm"], 1e-6)
                k = F.rms_norm(k, (t.head_dim,), layer["k_norm"], 1e-6)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys[:, :, context:].copy_(k.transpose(1, 2))
            values[:, :, context:].copy_(v.view(b, n, t.kv_heads, t.head_dim).transpose(1, 2))
            if context == 0:
                a = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, enable_gqa=True)
                a = a.transpose(1, 2).reshape(b, n, self.q_width)
            else:
                rows = (
                    q.view(b, n, t.kv_heads, group, t.head_dim)
                    .permute(0, 2, 3, 1, 4)
                    .reshape(b, t.kv_heads, -1, t.head_dim)
                )
                a = F.scaled_dot_product_attention(rows, keys, values)
                a = a.view(b, t.kv_heads, group, n, t.head_dim).permute(0, 3, 1, 2, 4).reshape(b, n, self.q_width)
            x = x + F.linear(a, layer["o"])
            h = F.rms_norm(x, (t.hidden_size,), layer["norm2"], 1e-6)
            gate, up = F.linear(h, layer["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        return F.linear(F.rms_norm(x, (t.hidden_size,), self.norm, 1e-6), self.head)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat([-second, first], -1) * sin


def _median_seconds(run, repeats: int, synchronize) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_shape(decoder: RandomDecoder, shape: Shape, repeats: int, graphs: bool) -> dict[str, float]:
    """Median wall time of one step, eager and (on CUDA) replayed from a CUDA graph, after warm-up."""
    device = decoder.embed.device
    ids = torch.randint(0, decoder.t.vocab_size, (shape.sessions, shape.new_tokens), device=device)
    cache, rotary = decoder.kv_cache(shape), decoder.rotary(shape)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        run = lambda: decoder.step(ids, cache, rotary)  # noqa: E731
        for _ in range(2):
            run()
        out = {"eager_s": _median_seconds(run, repeats, synchronize)}
        if graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run()  # warm-up on the side stream, as torch.cuda.graph wants
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            out["graph_s"] = _median_seconds(graph.replay, repeats, synchronize)
    return out


def measure(args: argparse.Namespace) -> None:
    cost = load_gpu_model(args.gpu_model)
    started = time.time()
    decoder = RandomDecoder(cost.target, "cuda")  # refuses a shape whose parameter count is not the target's
    free, _ = torch.cuda.mem_get_info()
    max_kv_tokens = int((free - args.headroom_gib * 2**30) / cost.target.kv_bytes_per_token)
    hardware = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    hardware["driver"] = _driver()
    shapes = grid(min(max_kv_tokens, args.max_kv_tokens))
    print(
        f"built {args.gpu_model} with random weights in {time.time() - started:.1f} s; {len(shapes)} shapes", flush=True
    )
    payload = {
        "model": args.gpu_model,
        "date": datetime.date.today().isoformat(),
        "hardware": hardware,
        "method": "random bf16 weights of the target's shape built in place; PyTorch eager and CUDA-graph replay; "
        f"median of {args.repeats} steps after warm-up (benchmarks/gpu_calibration.py)",
        "points": [],
        "skipped": [],
    }
    for shape in tqdm(shapes, desc="shapes", unit="shape"):
        try:
            timed = time_shape(decoder, shape, args.repeats, graphs=True)
        except torch.OutOfMemoryError:
            payload["skipped"].append({**asdict(shape), "why": "out of GPU memory"})
            timed = None
        torch.cuda.empty_cache()  # this shape's KV cache and graph pool, before the next one's
        if timed is not None:
            payload["points"].append({**asdict(shape), **timed})
            tqdm.write(f"{shape}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timed.items()))
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")  # what was measured survives a timeout
    print(f"wrote {args.output}")


def _driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True)
        return out.stdout.decode().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# fit


@dataclass(frozen=True)
class Fit:
    memory_efficiency: float
    compute_efficiency: float
    fixed_s: float  # the measured steps' fixed GPU time (launches, small kernels)
    relative_errors: list[float]

    @property
    def median_relative_error(self) -> float:
        return statistics.median(abs(e) for e in self.relative_errors)

    @property
    def max_relative_error(self) -> float:
        return max(abs(e) for e in self.relative_errors)


def _roofline(cost: GpuCostModel, shape: Shape) -> tuple[float, float]:
    """Bytes over the peak bandwidth and FLOPs over the peak compute: seconds at 100% efficiency."""
    step = cost.step_cost(shape.shapes())
    return step.bytes / cost.gpu.memory_bandwidth, step.flops / cost.gpu.peak_flops


def fit_points(cost: GpuCostModel, shapes: list[Shape], seconds: list[float]) -> Fit:
    """Least squares on the relative error over a grid of efficiencies; the fixed time is solved exactly at each."""
    import numpy as np

    ideal = np.array([_roofline(cost, s) for s in shapes])  # [points, 2]
    measured = np.array(seconds)
    memory = np.arange(0.20, 1.0001, 0.0025)
    compute = np.arange(0.10, 1.0001, 0.0025)
    step = np.maximum(
        ideal[None, None, :, 0] / memory[:, None, None], ideal[None, None, :, 1] / compute[None, :, None]
    )  # [memory, compute, points]
    residual = (step - measured) / measured
    # r_i + o / y_i: the fixed time o that minimizes sum (r_i + o / y_i)^2, kept >= 0
    fixed = np.maximum(0.0, -(residual / measured).sum(-1) / (1 / measured**2).sum())
    loss = ((residual + fixed[..., None] / measured) ** 2).sum(-1)
    i, j = np.unravel_index(loss.argmin(), loss.shape)
    errors = residual[i, j] + fixed[i, j] / measured
    return Fit(float(memory[i]), float(compute[j]), float(fixed[i, j]), [float(e) for e in errors])


def fit(args: argparse.Namespace) -> None:
    from benchmarks.common import ROOT
    from benchmarks.report import print_table, save_plot, write_json

    recorded = json.loads(Path(args.points).read_text())
    cost = load_gpu_model(recorded["model"])
    shapes = [Shape(p["sessions"], p["new_tokens"], p["context"]) for p in recorded["points"]]
    seconds = [p[args.timing] for p in recorded["points"]]
    result = fit_points(cost, shapes, seconds)
    entry = json.loads(GPU_MODELS_PATH.read_text())["models"][recorded["model"]]
    before = replace(cost, gpu=replace(cost.gpu, **{k: entry[k]["value"] for k in ASSUMED}, step_overhead_s=0.0))
    assumed = [before.step_seconds(s.shapes()) for s in shapes]  # the GPU part, at the assumed efficiencies
    rows = []
    for shape, measured, error, assumed_s in zip(shapes, seconds, result.relative_errors, assumed):
        rows.append(
            [
                shape.sessions,
                shape.new_tokens,
                shape.context,
                measured * 1e3,
                measured * (1 + error) * 1e3,
                f"{error:+.1%}",
                assumed_s * 1e3,
            ]
        )
    print_table(["sessions", "new", "context", "measured ms", "fitted ms", "error", "assumed ms"], rows)
    print(
        f"\n{recorded['model']} on {recorded['hardware'].get('gpu')}: "
        f"memory_efficiency {result.memory_efficiency:.3f}, "
        f"compute_efficiency {result.compute_efficiency:.3f}, fixed GPU time {result.fixed_s * 1e3:.2f} ms; "
        f"relative error median {result.median_relative_error:.1%}, max {result.max_relative_error:.1%}"
    )
    calibration = {
        "memory_efficiency": round(result.memory_efficiency, 4),
        "compute_efficiency": round(result.compute_efficiency, 4),
        "step_overhead_s": round(result.fixed_s + HOST_OVERHEAD_S, 6),
        "gpu_fixed_s": round(result.fixed_s, 6),
        "host_overhead_s": {"value": HOST_OVERHEAD_S, "source": HOST_OVERHEAD_SOURCE},
        "measured_on": ", ".join(f"{k} {v}" for k, v in recorded["hardware"].items() if v),
        "engine": f"{recorded['method']}; timings: {args.timing}",
        "date": recorded["date"],
        "points": len(shapes),
        "median_relative_error": round(result.median_relative_error, 4),
        "max_relative_error": round(result.max_relative_error, 4),
        "data": str(Path(args.points).resolve().relative_to(ROOT)),  # where tests/test_gpu_calibration.py refits it
    }
    write_json(NAME, {"model": recorded["model"], "calibration": calibration, "points": recorded["points"]})

    def draw(ax) -> None:
        ax.plot(
            [s * 1e3 for s in seconds],
            [s * (1 + e) * 1e3 for s, e in zip(seconds, result.relative_errors)],
            "o",
            label="fitted roofline",
        )
        ax.plot([s * 1e3 for s in seconds], [a * 1e3 for a in assumed], "x", label="assumed efficiencies, no overhead")
        top = max(seconds) * 1e3 * 1.05
        ax.plot([0, top], [0, top], "k:", lw=1)
        ax.set(xlabel="measured step (ms)", ylabel="modeled step (ms)", title=f"{recorded['model']} ({args.timing})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()

    save_plot(NAME, draw)
    if result.max_relative_error > 0.15:
        print("the fit's largest error is over 15%: the model's form, not its constants, needs work there")
    if args.write:
        _fill_calibration(GPU_MODELS_PATH, recorded["model"], calibration)
        print(f"filled {recorded['model']}'s calibration in {GPU_MODELS_PATH}")


def _fill_calibration(path: Path, model: str, calibration: dict) -> None:
    """Replaces ``model``'s calibration (null or an earlier fit) in place, leaving the rest of the hand-written
    file as it was."""
    text = path.read_text()
    start = text.index(f'"{model}": {{', text.index('"models"'))
    value = text.index('"calibration": ', start) + len('"calibration": ')
    _, end = json.JSONDecoder().raw_decode(text, value)  # where the old value ends, however it is laid out
    updated = text[:value] + json.dumps(calibration, indent=2).replace("\n", "\n      ") + text[end:]
    json.loads(updated)  # still a valid table
    path.write_text(updated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_calibration",
        description=__doc__.split("\n")[0],
        epilog="measure: time steps of a random-weight model of the target's shape (needs CUDA); "
        "fit: fit the cost model's efficiencies to the measured points",
    )
    parser.add_argument("step", choices=["measure", "fit"])
    parser.add_argument("--gpu-model", default="h200/qwen3-32b", help="measure: a GPU/target of gpu_models.json")
    parser.add_argument("--output", default=f"{NAME}_points.json", help="measure: where the points go")
    parser.add_argument("--repeats", type=int, default=10, help="measure: timed steps per shape (the median is kept)")
    parser.add_argument("--headroom-gib", type=float, default=12.0, help="measure: GPU memory kept free of KV cache")
    parser.add_argument("--max-kv-tokens", type=int, default=10**9, help="measure: skip shapes holding more KV")
    parser.add_argument("--points", help="fit: a file `measure` wrote")
    parser.add_argument("--timing", default="graph_s", choices=["graph_s", "eager_s"], help="fit: which times")
    parser.add_argument("--write", action="store_true", help="fit: fill the model's calibration in gpu_models.json")
    args = parser.parse_args(argv)
    if args.step == "measure" and not torch.cuda.is_available():
        parser.error("measure needs a CUDA GPU: it times the GPU at hand (run `fit` anywhere)")
    if args.step == "fit" and not args.points:
        parser.error("fit needs --points, a file `measure` wrote")
    (measure if args.step == "measure" else fit)(args)


if __name__ == "__main__":
    main()
