"""What a `wisp-bench` run leaves behind: a JSON with every figure and raw trace, PNG plots and markdown tables.

Every plot carries a ``regime`` label (what was real and what was modeled, e.g. "real: SmolLM2-135M on 2-core AMD
EPYC CPU" or "modeled GPU: A100-80GB, 32B"): a figure without its regime is easy to misread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

from wisp_bench.metrics import Load, RunSummary, completed, tpot, ttft
from wisp_bench.trace import RequestTrace

SCHEMA = "wisp-bench/1"
Summary = RunSummary | Mapping[str, Any]

# The figures `compare` puts side by side, in order.
HEADLINE: tuple[str, ...] = (
    "completed",
    "slo_attainment",
    "request_goodput",
    "token_goodput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "tokens_per_round",
    "acceptance_rate",
    "server_decoded_share",
)


# --- JSON -----------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy values, tuples and non-string keys made JSON-safe; NaN and infinities become null."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else json.dumps(to_jsonable(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def make_payload(
    regime: str,
    summaries: Sequence[Summary],
    traces: Mapping[tuple[str, Load | None], Sequence[RequestTrace]] | None = None,
    *,
    capacity: Mapping[str, Load | None] | None = None,
    capacity_curves: Mapping[str, Mapping[float, Load | None]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's JSON document: regime, every summary, the raw traces per (config, load), and capacity figures.

    Each summary is stamped with the regime so ``compare`` can match by (config, load, regime). ``capacity`` maps a
    config to its capacity; ``capacity_curves`` maps a config to {TPOT SLO in seconds: capacity}.
    """
    if not regime:
        raise ValueError("every result needs its regime label")
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "regime": regime,
        "meta": dict(meta or {}),
        "summaries": [{**_as_dict(s), "regime": _as_dict(s).get("regime", regime)} for s in summaries],
        "traces": [
            {"config": config, "load": load, "requests": [asdict(t) for t in group]}
            for (config, load), group in (traces or {}).items()
        ],
    }
    if capacity is not None:
        payload["capacity"] = dict(capacity)
    if capacity_curves is not None:
        payload["capacity_curves"] = {
            config: [{"tpot_slo": slo, "capacity": cap} for slo, cap in sorted(curve.items())]
            for config, curve in capacity_curves.items()
        }
    return to_jsonable(payload)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` (any mix of dicts, dataclasses and numpy values) as indented JSON; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return out


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def traces_from_payload(payload: Mapping[str, Any]) -> dict[tuple[str, Load | None], list[RequestTrace]]:
    """The raw traces of a run JSON back as :class:`RequestTrace` objects, keyed by (config, load), to recompute."""
    names = {f.name for f in fields(RequestTrace)}
    return {
        (group["config"], group["load"]): [
            RequestTrace(**{k: v for k, v in r.items() if k in names}) for r in group["requests"]
        ]
        for group in payload.get("traces", [])
    }


def _as_dict(s: Summary) -> dict[str, Any]:
    return s.to_dict() if isinstance(s, RunSummary) else dict(s)


def _load(payload: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    return payload if isinstance(payload, Mapping) else read_json(payload)


# --- plots ----------------------------------------------------------------------------------------------------------


def _figure(ncols: int, title: str, regime: str) -> tuple[Figure, list[Any]]:
    if not regime:
        raise ValueError("every plot needs its regime label")
    fig = Figure(figsize=(6.0 * ncols, 4.5), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    fig.suptitle(f"{title}\n{regime}", fontsize=11)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _series(summaries: Sequence[Summary], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """{config: (loads, values)} sorted by load; summaries without a load are left out."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for s in map(_as_dict, summaries):
        if s.get("load") is not None:
            rows.setdefault(s["config"], []).append((float(s["load"]), _num(s.get(key))))
    return {c: ([x for x, _ in sorted(r)], [y for _, y in sorted(r)]) for c, r in sorted(rows.items())}


def plot_goodput(
    summaries: Sequence[Summary], path: str | Path, regime: str, *, load_label: str = "fleet size (devices)"
) -> Path:
    """Goodput against load, one line per config: request goodput (DistServe/vLLM) and token goodput (WISP)."""
    fig, (left, right) = _figure(2, "Goodput vs load", regime)
    for ax, key, ylabel in (
        (left, "request_goodput", "request goodput (req/s meeting both SLOs)"),
        (right, "token_goodput", "token goodput (tok/s of requests meeting both SLOs)"),
    ):
        for config, (xs, ys) in _series(summaries, key).items():
            ax.plot(xs, ys, marker="o", label=config)
        ax.set_xlabel(load_label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_slo_attainment(
    summaries: Sequence[Summary],
    path: str | Path,
    regime: str,
    *,
    threshold: float = 0.9,
    load_label: str = "fleet size (devices)",
) -> Path:
    """SLO attainment against load, one line per config, with the threshold that defines capacity."""
    fig, (ax,) = _figure(1, "SLO attainment vs load", regime)
    for config, (xs, ys) in _series(summaries, "slo_attainment").items():
        ax.plot(xs, [100.0 * y for y in ys], marker="o", label=config)
    ax.axhline(100.0 * threshold, color="grey", linestyle="--", label=f"{100 * threshold:g}%")
    ax.set_xlabel(load_label)
    ax.set_ylabel("requests meeting both SLOs (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _ecdf(ax: Any, values: Sequence[float], label: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values, dtype=float))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)


def plot_latency_cdfs(
    traces_by_config: Mapping[str, Sequence[RequestTrace]],
    path: str | Path,
    regime: str,
    *,
    load: Load | None = None,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
) -> Path:
    """CDFs of TTFT and TPOT (ms) over completed requests, one line per config at one load; SLOs (s) as lines.

    TPOT's CDF is over requests with at least two tokens, as its statistics are.
    """
    at = "" if load is None else f" at load {load}"
    fig, (left, right) = _figure(2, f"Latency CDFs{at}", regime)
    for config, traces in traces_by_config.items():
        done = [t for t in traces if completed(t)]
        _ecdf(left, [1000.0 * ttft(t) for t in done], config)
        _ecdf(right, [1000.0 * tpot(t) for t in done if t.output_tokens >= 2], config)
    for ax, name, slo in ((left, "TTFT", ttft_slo), (right, "TPOT", tpot_slo)):
        if slo is not None:
            ax.axvline(1000.0 * slo, color="grey", linestyle="--", label=f"{name} SLO")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_capacity_curve(
    curves: Mapping[str, Mapping[float, Load | None]],
    path: str | Path,
    regime: str,
    *,
    operating_slo: float | None = None,
    ratio: tuple[str, str] | None = ("wisp", "centralized"),
    load_label: str = "capacity (devices at >=90% SLO attainment)",
) -> Path:
    """Capacity of each config against the TPOT SLO (given in seconds, drawn in ms).

    ``operating_slo`` marks the SLO the headline numbers use; ``ratio`` (numerator, denominator) adds their capacity
    ratio on a second axis when both configs are present (undefined points, where the denominator is 0, are gaps).
    """
    fig, (ax,) = _figure(1, "Capacity vs TPOT SLO", regime)
    for config, curve in curves.items():
        slos = sorted(curve)
        ax.plot([1000.0 * s for s in slos], [_num(curve[s]) for s in slos], marker="o", label=config)
    if operating_slo is not None:
        ax.axvline(
            1000.0 * operating_slo, color="grey", linestyle="--", label=f"operating point {1000 * operating_slo:g} ms"
        )
    ax.set_xlabel("TPOT SLO (ms)")
    ax.set_ylabel(load_label)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ratio is not None and ratio[0] in curves and ratio[1] in curves:
        num, den = curves[ratio[0]], curves[ratio[1]]
        slos = sorted(set(num) & set(den))
        values = [_num(num[s]) / _num(den[s]) if den[s] else math.nan for s in slos]
        twin = ax.twinx()
        (line,) = twin.plot([1000.0 * s for s in slos], values, color="black", linestyle=":", marker="x")
        twin.set_ylabel(f"capacity ratio {ratio[0]}/{ratio[1]}")
        twin.set_ylim(bottom=0)
        handles, labels = [*handles, line], [*labels, f"{ratio[0]}/{ratio[1]}"]
    ax.legend(handles, labels)
    return _save(fig, path)


# --- tables ---------------------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if kind == "%":
        return f"{100.0 * v:.1f}"
    if kind == "ratio":
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("config", "config", "g"),
    ("load", "load", "g"),
    ("completed", "completed", "g"),
    ("SLO met %", "slo_attainment", "%"),
    ("req goodput (req/s)", "request_goodput", "g"),
    ("token goodput (tok/s)", "token_goodput", "g"),
    ("median TTFT (ms)", "median_ttft_ms", "g"),
    ("median TPOT (ms)", "median_tpot_ms", "g"),
    ("tokens/round", "tokens_per_round", "g"),
    ("acceptance", "acceptance_rate", "ratio"),
    ("server-decoded share", "server_decoded_share", "ratio"),
)


def markdown_table(summaries: Sequence[Summary]) -> str:
    """One row per summary with the headline figures; undefined figures print as "—"."""
    rows = [[_fmt(s.get(key), kind) for _, key, kind in TABLE_COLUMNS] for s in map(_as_dict, summaries)]
    return _markdown([h for h, _, _ in TABLE_COLUMNS], rows)


ANATOMY_COLUMNS = ("round_ms", "edge_ms", "network_ms", "queue_ms", "verify_ms")


def anatomy_table(summaries: Sequence[Summary]) -> str:
    """Where speculative rounds' time goes, one row per point that has rounds; "" if none has."""
    rows = [
        [f"{s['config']}/{_fmt(s.get('load'))}", *(_fmt(s["round_anatomy"][k]) for k in ANATOMY_COLUMNS)]
        for s in map(_as_dict, summaries)
        if s.get("round_anatomy")
    ]
    header = ["round anatomy, ms per round", "round", "edge (drafting)", "network + handling", "queue", "verify"]
    return _markdown(header, rows) if rows else ""


def print_markdown_table(summaries: Sequence[Summary]) -> None:
    print(markdown_table(summaries), end="")


@dataclass
class ComparisonRow:
    """One headline figure of one (config, load, regime) point in runs A and B; ``None`` where absent or undefined."""

    config: str
    load: Load | None
    regime: str
    figure: str
    a: float | None
    b: float | None
    ratio: float | None  # b / a


def _point_key(s: Mapping[str, Any], regime: str) -> tuple[str, float | None, str]:
    load = s.get("load")
    return (s["config"], None if load is None else float(load), s.get("regime") or regime)


def compare_rows(a_json: str | Path | Mapping[str, Any], b_json: str | Path | Mapping[str, Any]) -> list[ComparisonRow]:
    """Headline figures of two runs matched by (config, load, regime), with B/A; unmatched points get one side empty.

    Loads match numerically (8 and 8.0 are one point). Capacity per config, when both runs carry it, is a row with
    no load.
    """
    a, b = _load(a_json), _load(b_json)
    points: dict[tuple[str, float | None, str], list[Mapping[str, Any] | None]] = {}
    for side, run in enumerate((a, b)):
        for s in run.get("summaries", []):
            points.setdefault(_point_key(s, run.get("regime", "")), [None, None])[side] = s
    rows: list[ComparisonRow] = []
    for (config, _, regime), (sa, sb) in points.items():
        load = (sa or sb or {}).get("load")
        for figure in HEADLINE:
            va = None if sa is None else sa.get(figure)
            vb = None if sb is None else sb.get(figure)
            rows.append(ComparisonRow(config, load, regime, figure, va, vb, _div(vb, va)))
    cap_a, cap_b = a.get("capacity") or {}, b.get("capacity") or {}
    if a.get("regime") == b.get("regime"):
        for config in [c for c in cap_a if c in cap_b]:
            va, vb = cap_a[config], cap_b[config]
            rows.append(ComparisonRow(config, None, a.get("regime", ""), "capacity", va, vb, _div(vb, va)))
    return rows


def _div(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


def compare(
    a_json: str | Path | Mapping[str, Any],
    b_json: str | Path | Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("A", "B"),
) -> str:
    """A markdown table of two runs' headline figures side by side with B/A (backs ``wisp-bench compare A B``)."""
    rows = [
        [r.config, _fmt(r.load), r.regime, r.figure, _fmt(r.a), _fmt(r.b), _fmt(r.ratio, "ratio")]
        for r in compare_rows(a_json, b_json)
    ]
    return _markdown(["config", "load", "regime", "figure", labels[0], labels[1], f"{labels[1]}/{labels[0]}"], rows)


def print_compare(
    a_json: str | Path | Mapping[str, Any],
    b_json: str | Path | Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("A", "B"),
) -> None:
    print(compare(a_json, b_json, labels=labels), end="")
