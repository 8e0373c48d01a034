"""`wisp_bench.metrics` and `wisp_bench.report` on hand-made traces whose figures are worked out by hand."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wisp_bench import report
from wisp_bench.metrics import (
    SloOverride,
    attainment,
    by_class,
    capacity,
    capacity_curve,
    e2el,
    is_monotone,
    itls,
    meets_slo,
    meets_tpot,
    meets_ttft,
    next_load_to_try,
    run_duration,
    search_capacity,
    summarize,
    tpot,
    ttft,
)
from wisp_bench.trace import RequestTrace


def trace(
    tokens: list[float],
    sent_at: float = 0.0,
    *,
    config: str = "wisp",
    device_class: str = "orin",
    ttft_slo: float = 1.0,
    tpot_slo: float = 0.25,
    error: str = "",
    **counters,
) -> RequestTrace:
    return RequestTrace(
        config=config,
        device="d0",
        device_class=device_class,
        prompt_index=0,
        category="",
        ttft_slo=ttft_slo,
        tpot_slo=tpot_slo,
        sent_at=sent_at,
        token_times=list(tokens),
        error=error,
        **counters,
    )


# --- per request ----------------------------------------------------------------------------------------------------


def test_per_request_figures_of_a_verdict_stream():
    t = trace([0.5, 0.5, 0.7, 0.9])  # the first two tokens arrive in one verdict
    assert ttft(t) == pytest.approx(0.5)
    assert tpot(t) == pytest.approx((0.9 - 0.5) / 3)
    assert itls(t) == pytest.approx([0.0, 0.2, 0.2])
    assert e2el(t) == pytest.approx(0.9)


def test_single_token_has_zero_tpot_and_no_gaps():
    t = trace([0.3], sent_at=0.1)
    assert tpot(t) == 0.0
    assert itls(t) == []
    assert ttft(t) == pytest.approx(0.2)
    assert e2el(t) == pytest.approx(0.2)


def test_request_missing_only_tpot():
    t = trace([0.2, 0.5, 0.8], ttft_slo=1.0, tpot_slo=0.1)  # TTFT 0.2 <= 1.0, TPOT 0.3 > 0.1
    assert meets_ttft(t)
    assert not meets_tpot(t)
    assert not meets_slo(t)


def test_request_missing_only_ttft():
    t = trace([1.5, 1.6], ttft_slo=1.0, tpot_slo=0.25)
    assert not meets_ttft(t)
    assert meets_tpot(t)
    assert not meets_slo(t)


def test_slo_bounds_are_inclusive():
    t = trace([0.5, 0.75, 1.0], ttft_slo=0.5, tpot_slo=0.25)  # exact binary fractions: TTFT 0.5, TPOT 0.25
    assert meets_slo(t)


def test_failed_request_never_meets_slo():
    failed = trace([0.1, 0.2], error="UNAVAILABLE: server went away")
    assert not meets_slo(failed)
    assert not meets_slo(trace([]))  # no error, but not a single token
    assert not meets_slo(failed, SloOverride(ttft=100.0, tpot=100.0))


def test_slo_override_judges_without_mutating():
    t = trace([0.2, 0.5, 0.8], ttft_slo=1.0, tpot_slo=0.1)
    before = asdict(t)
    assert meets_slo(t, SloOverride(tpot=0.31))  # TPOT is 0.3
    assert not meets_slo(t, SloOverride(ttft=0.1, tpot=0.31))
    assert not meets_slo(t, SloOverride(ttft=5.0))  # keeps the trace's own TPOT SLO of 0.1
    assert asdict(t) == before


@settings(max_examples=200, deadline=None)
@given(
    sent_at=st.floats(0.0, 100.0),
    first=st.floats(0.0, 10.0),
    gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 2.0)), min_size=1, max_size=30),
)
def test_latency_identities(sent_at, first, gaps):
    times = [sent_at + first]
    for gap in gaps:
        times.append(times[-1] + gap)
    t = trace(times, sent_at=sent_at)
    n = len(times)
    assert tpot(t) * (n - 1) + ttft(t) == pytest.approx(e2el(t), abs=1e-9)
    assert len(itls(t)) == n - 1
    assert sum(itls(t)) == pytest.approx(times[-1] - times[0], abs=1e-9)
    assert min(itls(t)) >= 0.0


# --- one run --------------------------------------------------------------------------------------------------------


def two_second_run() -> list[RequestTrace]:
    """Four requests over [0, 2] s: two meet both SLOs (3 and 5 tokens), one misses TPOT (4 tokens), one fails."""
    return [
        trace([0.2, 0.3, 0.4], sent_at=0.0),  # meets: TTFT 0.2, TPOT 0.1
        trace([0.7, 0.8, 0.9, 1.0, 1.1], sent_at=0.5),  # meets: TTFT 0.2, TPOT 0.1
        trace([1.2, 1.6, 1.9, 2.0], sent_at=1.0, tpot_slo=0.2),  # misses TPOT only: (2.0 - 1.2) / 3 > 0.2
        trace([], sent_at=1.5, error="DEADLINE_EXCEEDED"),
    ]


def test_goodput_both_ways_on_a_two_second_run():
    s = summarize(two_second_run(), load=4)
    assert s.config == "wisp" and s.load == 4
    assert s.duration == pytest.approx(2.0)
    assert (s.requests, s.completed, s.failed, s.errors) == (4, 3, 1, 1)
    assert s.total_output_tokens == 3 + 5 + 4
    assert s.request_throughput == pytest.approx(3 / 2)
    assert s.output_throughput == pytest.approx(12 / 2)
    assert s.slo_met == 2
    assert s.slo_attainment == pytest.approx(2 / 4)  # the failed request counts as a miss
    assert (s.slo_missed_ttft, s.slo_missed_tpot) == (0, 1)
    assert s.request_goodput == pytest.approx(2 / 2)  # DistServe / vllm --goodput
    assert s.token_goodput == pytest.approx((3 + 5) / 2)  # WISP


def test_explicit_duration_scales_rates():
    s = summarize(two_second_run(), duration=4.0)
    assert s.duration == 4.0
    assert s.request_goodput == pytest.approx(2 / 4)
    assert s.token_goodput == pytest.approx(8 / 4)
    assert s.output_throughput == pytest.approx(12 / 4)


def test_run_duration_spans_first_send_to_last_token():
    assert run_duration([trace([0.9], sent_at=0.4), trace([1.3, 2.7], sent_at=1.0)]) == pytest.approx(2.3)
    assert run_duration([]) == 0.0


def test_latency_statistics_in_ms_like_vllm():
    traces = [
        trace([0.1, 0.2], sent_at=0.0),  # TTFT 100 ms, TPOT 100 ms, E2EL 200 ms
        trace([1.2, 1.2, 1.5], sent_at=1.0),  # TTFT 200 ms, TPOT 150 ms, ITLs 0 and 300 ms
        trace([2.3], sent_at=2.0),  # TTFT 300 ms, one token: no TPOT sample
        trace([9.0], sent_at=2.0, error="CANCELLED"),  # failed: in no statistic
    ]
    s = summarize(traces)
    assert s.mean_ttft_ms == pytest.approx(200.0)
    assert s.median_ttft_ms == pytest.approx(200.0)
    assert s.std_ttft_ms == pytest.approx(100.0 * math.sqrt(2 / 3))  # population std
    assert s.p99_ttft_ms == pytest.approx(200.0 + 0.98 * 100.0)  # linear interpolation at rank 1.98
    assert s.mean_tpot_ms == pytest.approx(125.0)  # the one-token request is left out, as vLLM does
    assert s.median_tpot_ms == pytest.approx(125.0)
    assert s.mean_itl_ms == pytest.approx((100.0 + 0.0 + 300.0) / 3)  # the zero gap inside a verdict counts
    assert s.median_itl_ms == pytest.approx(100.0)
    assert s.mean_e2el_ms == pytest.approx((200.0 + 500.0 + 300.0) / 3)
    assert s.percentiles["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s.percentiles["ttft_ms"]["p90"] == pytest.approx(280.0)
    assert s.percentiles["tpot_ms"]["p95"] == pytest.approx(100.0 + 0.95 * 50.0)
    assert set(s.percentiles["itl_ms"]) == {"p50", "p90", "p95", "p99"}
    assert s.slo_met == 3  # the one-token request meets TPOT with TPOT 0


def test_speculation_figures():
    traces = [
        trace([0.1 * i for i in range(1, 17)], rounds=4, drafted=20, sent=16, accepted=12, idle_seconds=0.3),
        trace(
            [0.1 * i for i in range(1, 7)], rounds=2, drafted=10, sent=8, accepted=2, server_decoded=2, idle_seconds=0.1
        ),
        trace([0.1 * i for i in range(1, 5)], server_decoded=4),  # decoded by the server alone: no rounds
        trace([0.5], rounds=9, drafted=99, sent=99, accepted=99, error="INTERNAL"),  # failed: not counted
    ]
    s = summarize(traces)
    assert s.acceptance_rate == pytest.approx((12 + 2) / (16 + 8))
    assert s.tokens_per_round == pytest.approx((16 + 6 - 2) / (4 + 2))  # what rounds committed, per round
    assert s.wasted_draft_tokens == (20 - 12) + (10 - 2)
    assert s.mean_edge_idle_s == pytest.approx(0.2)
    assert s.server_decoded_share == pytest.approx((0 + 2 + 4) / (16 + 6 + 4))


def test_round_anatomy_splits_each_rounds_time_into_its_parts():
    # 2 s from sending to the last token over 10 rounds: 200 ms a round, 150 of them out for verification.
    timed = dict(round_trip_seconds=1.5, queue_seconds=0.3, verify_seconds=1.0)
    traces = [
        trace([0.5, 1.0, 2.2], sent_at=0.2, rounds=10, **timed),
        trace([0.4, 0.6], rounds=5, server_decoded=1, round_trip_seconds=9.0),  # mixed with server decoding: out
        trace([0.1, 0.2], config="wisp"),  # no rounds
    ]
    anatomy = summarize(traces).round_anatomy
    assert anatomy == pytest.approx(
        {"round_ms": 200.0, "edge_ms": 50.0, "network_ms": 20.0, "queue_ms": 30.0, "verify_ms": 100.0}
    )
    assert anatomy["round_ms"] == pytest.approx(sum(v for k, v in anatomy.items() if k != "round_ms"))
    table = report.anatomy_table([summarize(traces, load=4)]).strip().splitlines()
    assert table[2].split("|")[1:-1] == [" wisp/4 ", " 200 ", " 50 ", " 20 ", " 30 ", " 100 "]
    assert summarize([trace([0.1, 0.2], config="centralized")]).round_anatomy is None
    assert report.anatomy_table([summarize([trace([0.1, 0.2], config="centralized")])]) == ""


def test_undefined_figures_are_none():
    central = summarize([trace([0.1, 0.2], config="centralized", server_decoded=2)])
    assert central.acceptance_rate is None
    assert central.tokens_per_round is None
    assert central.mean_edge_idle_s is None
    assert central.wasted_draft_tokens == 0
    assert central.server_decoded_share == pytest.approx(1.0)
    empty = summarize([], config="wisp")
    assert (empty.requests, empty.completed, empty.total_output_tokens) == (0, 0, 0)
    assert empty.slo_attainment is None and empty.request_goodput is None and empty.median_ttft_ms is None
    failed_only = summarize([trace([], sent_at=0.0, error="UNAVAILABLE")])
    assert failed_only.slo_attainment == 0.0
    assert failed_only.server_decoded_share is None
    assert failed_only.request_goodput is None  # a zero-length run has no rate


def test_summary_refuses_mixed_configurations():
    with pytest.raises(ValueError, match="several configurations"):
        summarize([trace([0.1]), trace([0.1], config="fcfs")])


def test_slo_override_in_summary():
    s = summarize(two_second_run(), slo=SloOverride(tpot=0.5))
    assert s.slo_met == 3 and s.slo_missed_tpot == 0
    assert s.slo_override == {"ttft": None, "tpot": 0.5}
    assert summarize(two_second_run()).slo_override is None


def test_per_class_breakdown():
    traces = [
        trace([0.2, 0.3], device_class="orin"),  # meets
        trace([0.2, 1.0], device_class="orin"),  # misses TPOT (0.8 > 0.25)
        trace([1.5, 1.6, 1.7, 2.0], sent_at=1.0, device_class="pi5"),  # meets: TTFT 0.5, TPOT 0.1667
        trace([], sent_at=1.0, device_class="pi5", error="UNAVAILABLE"),
    ]
    classes = by_class(traces)  # duration 2.0 over the whole run
    assert set(classes) == {"orin", "pi5"}
    orin, pi5 = classes["orin"], classes["pi5"]
    assert (orin.requests, orin.completed, orin.slo_met) == (2, 2, 1)
    assert orin.slo_attainment == pytest.approx(0.5)
    assert orin.slo_missed_tpot == 1 and orin.slo_missed_ttft == 0
    assert orin.request_goodput == pytest.approx(1 / 2)
    assert orin.token_goodput == pytest.approx(2 / 2)
    assert (pi5.requests, pi5.completed, pi5.slo_met) == (2, 1, 1)
    assert pi5.slo_attainment == pytest.approx(0.5)
    assert pi5.token_goodput == pytest.approx(4 / 2)
    s = summarize(traces)
    assert s.by_class == classes
    assert sum(c.request_goodput for c in classes.values()) == pytest.approx(s.request_goodput)
    assert sum(c.token_goodput for c in classes.values()) == pytest.approx(s.token_goodput)


# --- capacity -------------------------------------------------------------------------------------------------------


def test_capacity_on_a_monotone_curve():
    points = {1: 1.0, 2: 0.95, 4: 0.9, 8: 0.7, 16: 0.2}
    assert is_monotone(points)
    assert capacity(points) == 4  # 0.9 itself qualifies
    assert capacity(points, strict=True) == 4
    assert capacity(points, threshold=0.95) == 2
    assert capacity({1: 0.5, 2: 0.1}) is None
    assert capacity({}) is None


def test_capacity_on_a_non_monotone_curve():
    points = {1: 1.0, 2: 0.85, 4: 0.92, 8: 0.5, 16: None}
    assert not is_monotone(points)
    assert capacity(points) == 4  # the largest measured load that reaches 90%
    assert capacity(points, strict=True) == 1  # stops at the first miss
    assert capacity({4: 0.95, 2: 0.5, 8: 0.2}, strict=True) is None


def step_attainment(cap: float):
    return lambda n: 1.0 if n <= cap else 0.5


def test_bisection_pins_down_capacity_in_few_probes():
    probes: list[int] = []

    def measure(n: int) -> float:
        probes.append(n)
        return step_attainment(13)(n)

    found, points = search_capacity(measure, 1, 64)
    assert found == 13
    assert probes[:2] == [1, 64]
    assert len(probes) <= 2 + math.ceil(math.log2(64 - 1))
    assert len(set(probes)) == len(probes)  # never measures a load twice
    assert all(isinstance(n, int) for n in probes)
    assert next_load_to_try(points, 1, 64) is None


def test_next_load_to_try_steps():
    assert next_load_to_try({}, 2, 40) == 2
    assert next_load_to_try({2: 1.0}, 2, 40) == 40
    assert next_load_to_try({2: 1.0, 40: 0.3}, 2, 40) == 21
    assert next_load_to_try({2: 1.0, 40: 0.3, 21: 0.95}, 2, 40) == 30
    assert next_load_to_try({2: 1.0, 40: 0.3, 21: 0.95, 22: 0.6}, 2, 40) is None  # bracket 21..22 closed
    assert next_load_to_try({2: 0.8, 40: 0.3}, 2, 40) is None  # below range: capacity None
    assert next_load_to_try({2: 1.0, 40: 0.99}, 2, 40) is None  # at least hi: widen the range
    assert next_load_to_try({2: 1.0, 40: 0.3, 100: 1.0}, 2, 40) == 21  # points outside the range are ignored


def test_bisection_on_rates_with_a_resolution():
    found, points = search_capacity(step_attainment(2.35), 0.5, 5.0, resolution=0.1)
    assert 2.25 < found <= 2.35
    assert len(points) <= 2 + math.ceil(math.log2(45))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bisection_finds_any_step(data):
    lo = data.draw(st.integers(1, 50))
    hi = data.draw(st.integers(lo + 1, 400))
    cap = data.draw(st.integers(lo, hi - 1))
    found, points = search_capacity(step_attainment(cap), lo, hi)
    assert found == cap
    assert len(points) <= 2 + math.ceil(math.log2(hi - lo))


def fleet_traces(load: int, n: int = 10) -> list[RequestTrace]:
    """Requests whose TPOT grows with the fleet: 10 ms per device; TTFT 0.1 s."""
    return [trace([0.1 + i * 0.01 * load for i in range(5)], ttft_slo=1.0, tpot_slo=1.0) for _ in range(n)]


def test_capacity_curve_over_tpot_slos():
    by_load = {load: fleet_traces(load) for load in range(1, 13)}
    before = [asdict(t) for traces in by_load.values() for t in traces]
    curve = capacity_curve(by_load, [0.015, 0.055, 0.105, 0.2], ttft_slo=1.0)  # SLOs off the 10 ms grid
    assert curve == {0.015: 1, 0.055: 5, 0.105: 10, 0.2: 12}
    assert capacity_curve(by_load, [0.05], ttft_slo=0.05) == {0.05: None}  # every TTFT is 0.1 s
    assert capacity_curve(by_load, [0.0001]) == {0.0001: None}
    assert [asdict(t) for traces in by_load.values() for t in traces] == before  # traces untouched


@settings(max_examples=40, deadline=None)
@given(
    tpots=st.lists(st.lists(st.floats(0.001, 0.5), min_size=1, max_size=6), min_size=1, max_size=6),
    slos=st.lists(st.floats(0.001, 0.6), min_size=2, max_size=6, unique=True),
)
def test_looser_tpot_slo_never_gives_less_capacity(tpots, slos):
    by_load = {
        load: [trace([0.1 + i * step for i in range(3)]) for step in steps] for load, steps in enumerate(tpots, 1)
    }
    curve = capacity_curve(by_load, sorted(slos), ttft_slo=1.0)
    caps = [curve[s] if curve[s] is not None else 0 for s in sorted(slos)]
    assert caps == sorted(caps)


def test_attainment_counts_failures():
    assert attainment(two_second_run()) == pytest.approx(0.5)
    assert attainment([]) is None


# --- report ---------------------------------------------------------------------------------------------------------

REGIME = "real: SmolLM2-135M on 2-core AMD EPYC CPU"


def sweep() -> tuple[list, dict]:
    summaries, traces = [], {}
    for config, slowdown in (("wisp", 1.0), ("centralized", 2.0)):
        for load in (2, 4, 8):
            group = [
                trace([0.1 * slowdown + i * 0.02 * load * slowdown for i in range(6)], sent_at=0.0, config=config)
                for _ in range(5)
            ]
            traces[(config, load)] = group
            summaries.append(summarize(group, load=load))
    return summaries, traces


def test_json_keeps_every_figure_and_the_raw_traces(tmp_path):
    summaries, traces = sweep()
    curves = {c: capacity_curve({k[1]: v for k, v in traces.items() if k[0] == c}, [0.05, 0.1]) for c in ("wisp",)}
    payload = report.make_payload(
        REGIME, summaries, traces, capacity={"wisp": 8, "centralized": 2}, capacity_curves=curves, meta={"x": math.nan}
    )
    path = report.write_json(tmp_path / "out" / "run.json", payload)
    loaded = json.loads(path.read_text())
    assert loaded["regime"] == REGIME
    assert loaded["meta"] == {"x": None}  # NaN is not JSON
    assert loaded["summaries"][0]["regime"] == REGIME
    assert loaded["summaries"][0]["median_tpot_ms"] == pytest.approx(summaries[0].median_tpot_ms)
    assert loaded["summaries"][0]["by_class"]["orin"]["slo_met"] == summaries[0].by_class["orin"].slo_met
    assert loaded["capacity_curves"]["wisp"] == [{"tpot_slo": 0.05, "capacity": 2}, {"tpot_slo": 0.1, "capacity": 4}]
    back = report.traces_from_payload(loaded)
    assert back == traces
    assert summarize(back[("wisp", 4)], load=4) == summaries[1]  # everything can be recomputed
    with pytest.raises(ValueError, match="regime"):
        report.make_payload("", summaries)


def test_plots_are_pngs_labelled_with_their_regime(tmp_path, monkeypatch):
    summaries, traces = sweep()
    titles: list[str] = []
    save = report._save

    def spy(fig, path):
        titles.append(fig.get_suptitle())
        return save(fig, path)

    monkeypatch.setattr(report, "_save", spy)
    by_config = {c: traces[(c, 4)] for c in ("wisp", "centralized")}
    curves = {"wisp": {0.05: 4, 0.1: 8}, "centralized": {0.05: 0, 0.1: 2}}
    paths = [
        report.plot_goodput(summaries, tmp_path / "goodput.png", REGIME),
        report.plot_slo_attainment(summaries, tmp_path / "slo.png", REGIME),
        report.plot_latency_cdfs(by_config, tmp_path / "cdf.png", REGIME, load=4, ttft_slo=1.0, tpot_slo=0.25),
        report.plot_capacity_curve(curves, tmp_path / "capacity.png", REGIME, operating_slo=0.1),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert len(titles) == 4 and all(REGIME in t for t in titles)
    with pytest.raises(ValueError, match="regime"):
        report.plot_goodput(summaries, tmp_path / "x.png", "")


def test_markdown_table():
    s = summarize(two_second_run(), load=4)
    central = summarize([trace([0.1, 0.2], config="centralized")], load=4)
    table = report.markdown_table([s, central])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| config | load | completed | SLO met % |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["wisp", "4", "3", "50.0", "1", "4"]
    assert "—" in lines[3]  # centralized has no acceptance rate


def test_compare_doubled_goodput(tmp_path):
    summaries, traces = sweep()
    a = report.make_payload(REGIME, summaries, capacity={"wisp": 8})
    # B: the same requests served in half the wall time, so both goodputs double while latencies stay.
    doubled = [summarize(traces[(s.config, s.load)], load=float(s.load), duration=s.duration / 2) for s in summaries]
    b = report.make_payload(REGIME, doubled, capacity={"wisp": 16})
    a_path = report.write_json(tmp_path / "a.json", a)
    b_path = report.write_json(tmp_path / "b.json", b)
    rows = report.compare_rows(a_path, b_path)
    by = {(r.config, r.load, r.figure): r for r in rows}
    for config, load in [("wisp", 2), ("wisp", 4), ("wisp", 8), ("centralized", 2), ("centralized", 4)]:
        assert by[(config, load, "request_goodput")].ratio == pytest.approx(2.0)
        assert by[(config, load, "token_goodput")].ratio == pytest.approx(2.0)
        assert by[(config, load, "output_throughput")].ratio == pytest.approx(2.0)
        assert by[(config, load, "median_tpot_ms")].ratio == pytest.approx(1.0)
    # centralized at 8 devices: TPOT 0.32 s misses every SLO, goodput 0 in A, so B/A is undefined
    assert by[("centralized", 8, "request_goodput")].a == 0.0
    assert by[("centralized", 8, "request_goodput")].ratio is None
    assert by[("wisp", None, "capacity")].ratio == pytest.approx(2.0)
    table = report.compare(a_path, b_path, labels=("base", "new"))
    assert "| new/base |" in table.splitlines()[0]
    assert "| request_goodput |" in table and "2.00" in table


def test_compare_matches_regime():
    summaries, _ = sweep()
    a = report.make_payload(REGIME, summaries[:1])
    b = report.make_payload("modeled GPU: A100-80GB, 32B", summaries[:1])
    rows = report.compare_rows(a, b)
    assert {r.regime for r in rows} == {REGIME, "modeled GPU: A100-80GB, 32B"}
    assert all(r.ratio is None for r in rows)
    assert all(r.a is None or r.b is None for r in rows)  # no point is matched across regimes
    assert {(r.a, r.b) for r in rows if r.figure == "completed"} == {(None, 5), (5, None)}


def test_the_servers_figures_between_two_scrapes_on_hand_made_samples():
    """What wisp-bench reports of the server at a point: deltas of its counters, per batch or per output token."""
    from wisp_bench.server_metrics import during

    before = {"wisp_batch_size_count": 10, "wisp_batch_size_sum": 30, "wisp_output_tokens_total": 100}
    before |= {"wisp_stream_messages_total": 250, "process_cpu_seconds_total": 4.0, "wisp_verify_seconds_sum": 1.0}
    after = {"wisp_batch_size_count": 30, "wisp_batch_size_sum": 110, "wisp_output_tokens_total": 300}
    after |= {"wisp_stream_messages_total": 750, "process_cpu_seconds_total": 5.0, "wisp_verify_seconds_sum": 2.0}
    figures = during(before, after)
    assert figures["batches"] == 20 and figures["mean_batch_size"] == 4.0 and figures["mean_verify_ms"] == 50.0
    assert figures["messages_per_token"] == 2.5  # 500 messages, both directions, for 200 tokens
    assert figures["server_cpu_ms_per_token"] == pytest.approx(5.0)  # 1 s of CPU for 200 tokens
    idle = during(after, after)
    assert idle["batches"] == 0 and idle["messages_per_token"] is None and idle["server_cpu_ms_per_token"] is None
