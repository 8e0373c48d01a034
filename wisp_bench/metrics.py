"""Figures of merit computed from raw request traces: latency, SLO attainment, goodput, speculation and capacity.

Conventions, chosen once and kept everywhere:

* Times in a trace are seconds; every ``*_ms`` figure is milliseconds, as in ``vllm bench serve``.
* A request is *completed* when it has no error and at least one output token. Latency figures (TTFT, TPOT, ITL,
  E2EL) and speculation figures are over completed requests only; SLO attainment is over all requests issued, so a
  failed request counts as a miss.
* A figure whose denominator is zero (no completed request, no speculative round, a zero-length run) is ``None``,
  never ``0.0``: a zero would read as a measured zero. Counts are plain ints and are never ``None``.
* SLOs are normally each trace's own (``ttft_slo``, ``tpot_slo``); an :class:`SloOverride` applies other SLOs
  without touching the traces, so one set of traces can be re-judged against many SLOs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wisp_bench.trace import RequestTrace

Load = int | float
PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)
DEFAULT_THRESHOLD = 0.9  # the attainment a load must reach to count toward capacity


@dataclass(frozen=True)
class SloOverride:
    """SLOs to judge traces by instead of their own; a ``None`` field keeps each trace's own value."""

    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds

    def ttft_of(self, t: RequestTrace) -> float:
        return t.ttft_slo if self.ttft is None else self.ttft

    def tpot_of(self, t: RequestTrace) -> float:
        return t.tpot_slo if self.tpot is None else self.tpot


_OWN_SLO = SloOverride()


# --- per request -------------------------------------------------------------------------------------------------


def completed(t: RequestTrace) -> bool:
    """A request counts as served only when it did not fail and delivered at least one token."""
    return not t.error and bool(t.token_times)


def ttft(t: RequestTrace) -> float:
    """Time to first token in seconds: first token arrival minus ``sent_at``."""
    if not t.token_times:
        raise ValueError("ttft of a request without tokens")
    return t.token_times[0] - t.sent_at


def tpot(t: RequestTrace) -> float:
    """Time per output token after the first, in seconds; 0.0 for a single token, as vLLM does."""
    n = len(t.token_times)
    if n == 0:
        raise ValueError("tpot of a request without tokens")
    if n == 1:
        return 0.0
    return (t.token_times[-1] - t.token_times[0]) / (n - 1)


def itls(t: RequestTrace) -> list[float]:
    """Gaps between consecutive tokens in seconds; tokens of one verdict give zero gaps, as vLLM's bench keeps them."""
    times = t.token_times
    return [b - a for a, b in zip(times, times[1:])]


def e2el(t: RequestTrace) -> float:
    """End-to-end latency in seconds: last token arrival minus ``sent_at``."""
    if not t.token_times:
        raise ValueError("e2el of a request without tokens")
    return t.token_times[-1] - t.sent_at


def meets_ttft(t: RequestTrace, slo: SloOverride | None = None) -> bool:
    return completed(t) and ttft(t) <= (slo or _OWN_SLO).ttft_of(t)


def meets_tpot(t: RequestTrace, slo: SloOverride | None = None) -> bool:
    return completed(t) and tpot(t) <= (slo or _OWN_SLO).tpot_of(t)


def meets_slo(t: RequestTrace, slo: SloOverride | None = None) -> bool:
    """Both SLOs met (bounds inclusive); a failed or empty request never meets its SLO."""
    return meets_ttft(t, slo) and meets_tpot(t, slo)


# --- one run -------------------------------------------------------------------------------------------------------


def run_duration(traces: Sequence[RequestTrace]) -> float:
    """The run's wall span: first ``sent_at`` to last token arrival over all requests (0.0 when there is none)."""
    if not traces:
        return 0.0
    start = min(t.sent_at for t in traces)
    end = max((t.token_times[-1] for t in traces if t.token_times), default=start)
    return max(0.0, end - start)


def _rate(count: float, duration: float) -> float | None:
    return count / duration if duration > 0 else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std (population, as numpy and vLLM) and the percentiles of seconds, in milliseconds."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    a = np.asarray(values_s, dtype=float) * 1000.0
    out: dict[str, float | None] = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    return out


def attainment(traces: Sequence[RequestTrace], slo: SloOverride | None = None) -> float | None:
    """Fraction of all requests issued that met both SLOs (``None`` for no request)."""
    return _ratio(sum(meets_slo(t, slo) for t in traces), len(traces))


@dataclass
class ClassSummary:
    """SLO attainment and goodput of one device class; rates use the whole run's duration, so classes add up."""

    device_class: str
    requests: int
    completed: int
    slo_met: int
    slo_attainment: float | None
    slo_missed_ttft: int
    slo_missed_tpot: int
    request_goodput: float | None  # req/s of requests that met both SLOs
    token_goodput: float | None  # output tok/s of those requests


@dataclass
class RunSummary:
    """Every figure of one configuration at one load point. Field names follow ``vllm bench serve`` where they overlap.

    TPOT statistics are over completed requests with at least two tokens (vLLM's choice), while SLO judgement gives a
    one-token request a TPOT of 0. ``slo_missed_ttft``/``slo_missed_tpot`` count completed requests missing that SLO
    (a request missing both is in both); failed requests are in ``failed`` and in neither.
    """

    config: str
    load: Load | None  # fleet size or arrival rate; whatever the sweep varies
    duration: float  # seconds
    requests: int  # issued
    completed: int  # no error and at least one token
    failed: int  # requests - completed
    errors: int  # requests that carried an error message
    total_output_tokens: int  # over completed requests
    request_throughput: float | None  # completed / duration
    output_throughput: float | None  # total_output_tokens / duration
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    std_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    std_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    std_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    std_e2el_ms: float | None
    p99_e2el_ms: float | None
    percentiles: dict[str, dict[str, float | None]]  # {"ttft_ms"|"tpot_ms"|"itl_ms"|"e2el_ms": {"p50": ..., ...}}
    slo_met: int
    slo_attainment: float | None  # slo_met / requests
    slo_missed_ttft: int
    slo_missed_tpot: int
    request_goodput: float | None  # DistServe / vllm --goodput: req/s that met both SLOs
    token_goodput: float | None  # WISP: output tok/s of requests that met both SLOs
    acceptance_rate: float | None  # accepted / sent draft tokens
    tokens_per_round: float | None  # tokens verification rounds committed / those rounds (server-decoded: neither)
    wasted_draft_tokens: int  # drafted - accepted
    mean_edge_idle_s: float | None  # mean idle_seconds of speculative requests
    server_decoded_share: float | None  # server_decoded / total_output_tokens
    round_anatomy: dict[str, float] | None  # where a speculative round's time goes (`round_anatomy`)
    slo_override: dict[str, float | None] | None = None  # the SLOs applied, when not the traces' own
    by_class: dict[str, ClassSummary] = field(default_factory=dict)
    branch_fit_share: float | None = None  # server-paced: second guesses a step verified / those streamed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _class_summary(name: str, traces: Sequence[RequestTrace], duration: float, slo: SloOverride) -> ClassSummary:
    met = [t for t in traces if meets_slo(t, slo)]
    return ClassSummary(
        device_class=name,
        requests=len(traces),
        completed=sum(completed(t) for t in traces),
        slo_met=len(met),
        slo_attainment=_ratio(len(met), len(traces)),
        slo_missed_ttft=sum(completed(t) and not meets_ttft(t, slo) for t in traces),
        slo_missed_tpot=sum(completed(t) and not meets_tpot(t, slo) for t in traces),
        request_goodput=_rate(len(met), duration),
        token_goodput=_rate(sum(t.output_tokens for t in met), duration),
    )


def by_class(
    traces: Sequence[RequestTrace], duration: float | None = None, slo: SloOverride | None = None
) -> dict[str, ClassSummary]:
    """SLO attainment and goodput per ``device_class``, over the whole run's duration unless one is given."""
    span = run_duration(traces) if duration is None else duration
    groups: dict[str, list[RequestTrace]] = {}
    for t in traces:
        groups.setdefault(t.device_class, []).append(t)
    return {name: _class_summary(name, group, span, slo or _OWN_SLO) for name, group in sorted(groups.items())}


def round_anatomy(traces: Sequence[RequestTrace]) -> dict[str, float] | None:
    """Where a verification round's time goes, in mean milliseconds per round, over the requests the server never
    decoded on its own: the edge's time from a verdict to its next round (drafting, mostly), the network and both
    ends' handling, the wait for a batch, and the verification. The four add up to ``round_ms``, a request's
    time (from its sending to its last token) over its rounds. None without such requests."""
    rounds_only = [t for t in traces if t.rounds and not t.server_decoded and t.token_times]
    rounds = sum(t.rounds for t in rounds_only)
    if not rounds:
        return None
    wall = sum(t.token_times[-1] - t.sent_at for t in rounds_only)
    trip, queue, verify = (
        sum(getattr(t, f) for t in rounds_only) for f in ("round_trip_seconds", "queue_seconds", "verify_seconds")
    )
    parts = {
        "round_ms": wall,
        "edge_ms": wall - trip,
        "network_ms": trip - queue - verify,
        "queue_ms": queue,
        "verify_ms": verify,
    }
    return {name: 1000 * seconds / rounds for name, seconds in parts.items()}


def summarize(
    traces: Sequence[RequestTrace],
    *,
    load: Load | None = None,
    duration: float | None = None,
    slo: SloOverride | None = None,
    config: str | None = None,
) -> RunSummary:
    """Summarizes the traces of ONE configuration at one load; ``duration`` defaults to the traces' wall span."""
    configs = {t.config for t in traces}
    if len(configs) > 1:
        raise ValueError(f"traces of several configurations: {sorted(configs)}")
    name = config if config is not None else (configs.pop() if configs else "")
    span = run_duration(traces) if duration is None else float(duration)
    applied = slo or _OWN_SLO

    done = [t for t in traces if completed(t)]
    out_tokens = sum(t.output_tokens for t in done)
    stats = {
        "ttft": _stats_ms([ttft(t) for t in done]),
        "tpot": _stats_ms([tpot(t) for t in done if t.output_tokens >= 2]),
        "itl": _stats_ms([gap for t in done for gap in itls(t)]),
        "e2el": _stats_ms([e2el(t) for t in done]),
    }
    flat: dict[str, float | None] = {}
    for metric, s in stats.items():
        flat[f"mean_{metric}_ms"] = s["mean"]
        flat[f"median_{metric}_ms"] = s["median"]
        flat[f"std_{metric}_ms"] = s["std"]
        flat[f"p99_{metric}_ms"] = s["p99"]
    percentiles = {f"{metric}_ms": {f"p{p}": s[f"p{p}"] for p in PERCENTILES} for metric, s in stats.items()}

    met = [t for t in traces if meets_slo(t, applied)]
    speculative = [t for t in done if t.rounds > 0]
    return RunSummary(
        config=name,
        load=load,
        duration=span,
        requests=len(traces),
        completed=len(done),
        failed=len(traces) - len(done),
        errors=sum(bool(t.error) for t in traces),
        total_output_tokens=out_tokens,
        request_throughput=_rate(len(done), span),
        output_throughput=_rate(out_tokens, span),
        **flat,
        percentiles=percentiles,
        slo_met=len(met),
        slo_attainment=_ratio(len(met), len(traces)),
        slo_missed_ttft=sum(not meets_ttft(t, applied) for t in done),
        slo_missed_tpot=sum(not meets_tpot(t, applied) for t in done),
        request_goodput=_rate(len(met), span),
        token_goodput=_rate(sum(t.output_tokens for t in met), span),
        acceptance_rate=_ratio(sum(t.accepted for t in done), sum(t.sent for t in done)),
        tokens_per_round=_ratio(
            sum(t.output_tokens - t.server_decoded for t in speculative), sum(t.rounds for t in speculative)
        ),
        wasted_draft_tokens=sum(t.drafted - t.accepted for t in done),
        mean_edge_idle_s=float(np.mean([t.idle_seconds for t in speculative])) if speculative else None,
        server_decoded_share=_ratio(sum(t.server_decoded for t in done), out_tokens),
        round_anatomy=round_anatomy(speculative),
        slo_override=None if slo is None else {"ttft": slo.ttft, "tpot": slo.tpot},
        by_class=by_class(traces, span, applied),
        branch_fit_share=_ratio(sum(t.branches_verified for t in done), sum(t.branches for t in done)),
    )


# --- capacity --------------------------------------------------------------------------------------------------------


def capacity(
    points: Mapping[Load, float | None], threshold: float = DEFAULT_THRESHOLD, *, strict: bool = False
) -> Load | None:
    """The largest measured load whose SLO attainment is at least ``threshold``; ``None`` when no load qualifies.

    Attainment need not fall monotonically with load (noise, batching effects); by default a dip below the threshold
    at a smaller load does not disqualify a larger load that reaches it. ``strict=True`` instead stops at the first
    measured load that misses: the largest load such that it and every smaller measured load qualify. The two agree
    on a monotone curve; :func:`is_monotone` tells which case a sweep is in. A ``None`` attainment counts as a miss.
    """
    ok = sorted(load for load, a in points.items() if a is not None and a >= threshold)
    if not strict:
        return ok[-1] if ok else None
    best: Load | None = None
    for load in sorted(points):
        a = points[load]
        if a is None or a < threshold:
            break
        best = load
    return best


def is_monotone(points: Mapping[Load, float | None]) -> bool:
    """Whether attainment never rises as load grows (``None`` read as 0)."""
    values = [points[load] or 0.0 for load in sorted(points)]
    return all(b <= a for a, b in zip(values, values[1:]))


def next_load_to_try(
    points: Mapping[Load, float | None],
    lo: Load,
    hi: Load,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    resolution: Load = 1,
) -> Load | None:
    """The next load to measure when bisecting capacity within ``[lo, hi]``; ``None`` once the bracket is closed.

    Measure ``lo`` and ``hi`` first, then bisect between the largest passing load and the smallest failing load
    above it, on a grid of ``resolution`` (1 for fleet sizes; e.g. 0.1 for arrival rates). ``None`` also when
    ``lo`` already misses (capacity below the range) or ``hi`` still passes (capacity at least ``hi``: widen the
    range). The bracket is consistent with :func:`capacity`'s default, non-strict reading; points outside the
    range are ignored. Integer ``lo``/``hi``/``resolution`` give integer loads.
    """
    if resolution <= 0 or hi < lo:
        raise ValueError("need resolution > 0 and lo <= hi")
    inside = {load: a for load, a in points.items() if lo <= load <= hi}

    def passes(load: Load) -> bool:
        a = inside[load]
        return a is not None and a >= threshold

    for end in (lo, hi):
        if end not in inside:
            return end
    if not passes(lo) or passes(hi):
        return None
    good = max(load for load in inside if passes(load))
    bad = min(load for load in inside if load > good and not passes(load))
    steps = math.floor((bad - good) / resolution + 1e-9)
    if steps <= 1:
        return None
    mid = good + (steps // 2) * resolution
    return mid if isinstance(mid, int) else round(mid, 12)


def search_capacity(
    measure: Callable[[Load], float | None],
    lo: Load,
    hi: Load,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    resolution: Load = 1,
    points: Mapping[Load, float | None] | None = None,
    max_probes: int = 64,
) -> tuple[Load | None, dict[Load, float | None]]:
    """Measures loads chosen by :func:`next_load_to_try` until the bracket closes; returns (capacity, all points).

    ``points`` seeds the search with loads already measured; ``max_probes`` bounds new measurements.
    """
    seen: dict[Load, float | None] = dict(points or {})
    for _ in range(max_probes):
        load = next_load_to_try(seen, lo, hi, threshold=threshold, resolution=resolution)
        if load is None:
            break
        seen[load] = measure(load)
    return capacity(seen, threshold), seen


def capacity_curve(
    traces_by_load: Mapping[Load, Sequence[RequestTrace]],
    tpot_slos: Iterable[float],
    ttft_slo: float | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    strict: bool = False,
) -> dict[float, Load | None]:
    """Capacity of one configuration under each TPOT SLO (seconds), the traces unchanged and only the SLO re-applied.

    ``ttft_slo`` (seconds) replaces every trace's own TTFT SLO; ``None`` keeps them. With the default non-strict
    capacity, a looser TPOT SLO never gives less capacity: attainment at every load can only rise.
    """
    curve: dict[float, Load | None] = {}
    for tpot_slo in tpot_slos:
        override = SloOverride(ttft=ttft_slo, tpot=tpot_slo)
        points = {load: attainment(traces, override) for load, traces in traces_by_load.items()}
        curve[tpot_slo] = capacity(points, threshold, strict=strict)
    return curve
