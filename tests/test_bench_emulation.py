"""wisp-bench's emulation: device profiles, the emulated network and clock, prompts, arrivals, fleets and SLOs."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest

from wisp_bench import network, profiles, workload
from wisp_bench.network import Link, message_bytes, sleep_until
from wisp_bench.profiles import DeviceProfile, load_profiles, profile
from wisp_bench.workload import FleetSpec, Prompt, SloSpec, arrival_times, load_workload_prompts
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import Slo

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"jetson-orin-nano", "raspberry-pi-5", "laptop"}


def a_profile(**changes) -> DeviceProfile:
    base = DeviceProfile("test", 0.01, 0.010, 1e6, 4e6, 0.004, {})
    return replace(base, **changes)


# --- the emulated network ---------------------------------------------------------------------------------------


def test_link_delays_average_half_the_rtt_plus_transmission_and_are_never_negative():
    link = Link(a_profile(), random.Random(1))
    samples = [link.uplink_delay(1000) for _ in range(20000)]
    assert min(samples) > 0
    assert statistics.fmean(samples) == pytest.approx(0.010 / 2 + 1000 / 1e6, rel=0.03)
    rtts = [link.rtt_sample() for _ in range(20000)]
    assert statistics.fmean(rtts) == pytest.approx(0.010, rel=0.03)
    assert statistics.stdev(rtts) == pytest.approx(0.004, rel=0.1)  # jitter: the RTT's standard deviation
    assert statistics.median(rtts) < statistics.fmean(rtts)  # lognormal: a long right tail


def test_link_delays_are_deterministic_per_seed():
    def delays(seed):
        link = Link(a_profile(), random.Random(seed))
        return [link.one_way_delay(n, d) for n in (0, 100, 5000) for d in (network.UPLINK, network.DOWNLINK)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)
    same = _replay(Link.for_device(a_profile(), 7, "laptop-0"), 5)
    assert same == _replay(Link.for_device(a_profile(), 7, "laptop-0"), 5)
    assert same != _replay(Link.for_device(a_profile(), 7, "laptop-1"), 5)  # each device its own stream


def _replay(link: Link, n: int) -> list[float]:
    return [link.uplink_delay(10) for _ in range(n)]


def test_bandwidth_term_is_proportional_to_bytes_in_each_direction():
    link = Link(a_profile(jitter_seconds=0.0), random.Random(0))
    assert link.uplink_delay(0) == pytest.approx(0.005)
    assert link.uplink_delay(2000) - link.uplink_delay(0) == pytest.approx(2 * (link.uplink_delay(1000) - 0.005))
    assert link.uplink_delay(4000) == pytest.approx(0.005 + 4000 / 1e6)
    assert link.downlink_delay(4000) == pytest.approx(0.005 + 4000 / 4e6)  # its own bandwidth
    with pytest.raises(ValueError, match="direction"):
        link.one_way_delay(10, "sideways")


def test_deliver_at_serializes_and_keeps_order():
    link = Link(a_profile(jitter_seconds=0.0), random.Random(0))
    first = link.deliver_at(1.0, 1000)
    second = link.deliver_at(1.0, 1000)  # sent together: waits for the first to leave
    assert first == pytest.approx(1.0 + 0.001 + 0.005)
    assert second == pytest.approx(first + 0.001)
    jittery = Link(a_profile(jitter_seconds=0.02), random.Random(5))
    arrivals = [jittery.deliver_at(i * 0.0001, 10) for i in range(500)]
    assert arrivals == sorted(arrivals)  # one in-order connection: no message overtakes another


def test_message_bytes_adds_the_http2_and_grpc_framing():
    message = pb.SpeculateRequest(draft=pb.DraftRound(round=3, position=120, token_ids=[5, 70000, 12]))
    assert network.MESSAGE_OVERHEAD_BYTES == 9 + 5
    assert message_bytes(message) == len(message.SerializeToString()) + 14


def test_sleep_until_is_accurate_to_a_few_milliseconds():
    lateness = []
    for i in range(20):
        deadline = time.monotonic() + 0.002 + 0.0005 * (i % 5)
        late = sleep_until(deadline)
        assert time.monotonic() >= deadline  # never early
        assert late >= 0
        lateness.append(late)
    assert statistics.median(lateness) < 0.005, lateness  # generous: a shared, loaded 2-core machine
    assert sleep_until(time.monotonic() - 1.0) >= 1.0  # a past deadline returns at once, saying how late


# --- device profiles --------------------------------------------------------------------------------------------


def test_every_profile_has_every_figure_and_a_source_for_each():
    found = load_profiles()
    assert set(found) == NAMES
    raw = json.loads(profiles.PROFILES_FILE.read_text())["profiles"]
    for name, device in found.items():
        for value in (device.draft_seconds_per_token, device.rtt_seconds, device.uplink_bytes_per_second):
            assert value > 0
        assert device.downlink_bytes_per_second > 0 and device.jitter_seconds >= 0
        for key in profiles.SOURCED_FIELDS:
            source = device.sources[key]
            assert len(source) > 20, f"{name}.{key}: {source!r}"
            assert any(s in source.lower() for s in ("http", "measured here", "derived", "assumption", "rfc")), (
                f"{name}.{key}: the source names no URL, measurement, derivation or stated assumption"
            )
        if device.sources["draft_seconds_per_token"].startswith("derived"):
            assert "docs/device-profiles.md" in device.sources["draft_seconds_per_token"]
            assert raw[name]["derivation"]["sources"], name
    assert (ROOT / "docs" / "device-profiles.md").is_file()
    assert found["laptop"].sources["draft_seconds_per_token"].startswith("measured here")


def test_derived_draft_times_follow_from_their_derivation():
    cost = profiles.draft_cost()
    raw = json.loads(profiles.PROFILES_FILE.read_text())["profiles"]
    derived = [name for name, entry in raw.items() if entry["sources"]["draft_seconds_per_token"].startswith("derived")]
    assert set(derived) == {"jetson-orin-nano", "raspberry-pi-5"}
    for name in derived:
        expected = profiles.derived_draft_seconds(raw[name]["derivation"], cost)
        assert raw[name]["draft_seconds_per_token"] == pytest.approx(expected, rel=0.01), name


def test_draft_cost_counts_the_default_drafts_weights():
    cost = profiles.draft_cost()
    h, inter, q, kv = 576, 1536, 9 * 64, 3 * 64
    layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    assert cost.matmul_params == 2 * h * h + 2 * layer + 16384 * h
    assert cost.kv_values_per_position == 2 * 2 * kv
    assert cost.bytes_per_token(2, 512) == 2 * (cost.matmul_params + cost.other_params + 2 * 2 * kv * 512)
    slow = dict(
        bytes_per_value=4,
        context_tokens=512,
        memory_bytes_per_second=10e9,
        memory_efficiency=0.5,
        flops_per_second=1e15,
        compute_efficiency=1.0,
        overhead_seconds=0.001,
    )
    assert profiles.roofline_seconds_per_token(cost, **slow) == pytest.approx(
        cost.bytes_per_token(4, 512) / 5e9 + 0.001
    )


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown device profile 'iphone'.*jetson-orin-nano, laptop, raspberry-pi-5"):
        profile("iphone")
    assert profile("laptop").name == "laptop"


def test_profiles_file_is_checked(tmp_path):
    entry = json.loads(profiles.PROFILES_FILE.read_text())["profiles"]["laptop"]
    path = tmp_path / "p.json"
    two_way = {**entry, "bandwidth_bytes_per_second": {"uplink": 5, "downlink": 7}}
    path.write_text(json.dumps({"profiles": {"x": two_way}}))
    loaded = load_profiles(path)["x"]
    assert (loaded.uplink_bytes_per_second, loaded.downlink_bytes_per_second) == (5.0, 7.0)
    unsourced = {**entry, "sources": {k: v for k, v in entry["sources"].items() if k != "rtt_seconds"}}
    path.write_text(json.dumps({"profiles": {"x": unsourced}}))
    with pytest.raises(ValueError, match="no source for rtt_seconds"):
        load_profiles(path)
    path.write_text(json.dumps({"profiles": {"x": {**entry, "rtt_seconds": -1}}}))
    with pytest.raises(ValueError, match="rtt_seconds must be > 0"):
        load_profiles(path)


# --- prompts ----------------------------------------------------------------------------------------------------


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_prompt_files_of_every_format(tmp_path):
    plain = load_workload_prompts(_jsonl(tmp_path / "plain.jsonl", [{"prompt": "a"}, {"prompt": "b"}]))
    assert plain == [Prompt("a", "", 0), Prompt("b", "", 1)]
    mt = [{"question_id": 81, "category": "writing", "turns": ["first", "second"]}]
    assert load_workload_prompts(_jsonl(tmp_path / "mt.jsonl", mt)) == [Prompt("first", "writing", 0)]
    spec_bench = [
        {"question_id": 1, "category": "mt_bench", "turns": ["Write a poem.", "Shorter."]},
        {"question_id": 81, "category": "translation", "turns": ["Translate German to English: Hallo"]},
        {"question_id": 161, "category": "summarization", "turns": ["Summarize: ..."]},
        {"question_id": 241, "category": "qa", "turns": ["Who wrote Hamlet?"]},
        {"question_id": 321, "category": "math_reasoning", "turns": ["2+2?"]},
        {"question_id": 401, "category": "rag", "turns": ["Given the passages, answer."]},
    ]
    loaded = load_workload_prompts(_jsonl(tmp_path / "question.jsonl", spec_bench))
    assert [p.category for p in loaded] == ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    assert loaded[1] == Prompt("Translate German to English: Hallo", "translation", 1)
    share = [
        {"id": "x", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}]},
        {"id": "y", "conversations": [{"from": "gpt", "value": "only an answer"}]},  # no prompt: skipped
        {"id": "z", "conversations": [{"from": "user", "value": "there"}]},
    ]
    expected = [Prompt("hi", "", 0), Prompt("there", "", 2)]
    assert load_workload_prompts(_jsonl(tmp_path / "share.jsonl", share)) == expected
    (tmp_path / "share.json").write_text(json.dumps(share))
    assert load_workload_prompts(tmp_path / "share.json") == expected
    assert len(load_workload_prompts(tmp_path / "question.jsonl", limit=2)) == 2
    with pytest.raises(ValueError, match="no prompts"):
        load_workload_prompts(_jsonl(tmp_path / "none.jsonl", [{"text": "?"}]))


def test_default_prompts_are_mt_bench_with_categories():
    prompts = load_workload_prompts()
    assert len(prompts) == 80
    assert {p.category for p in prompts} >= {"writing", "math", "coding"}


# --- arrivals and plans -----------------------------------------------------------------------------------------


def test_poisson_arrivals_have_mean_gap_one_over_rate():
    times = arrival_times(rate=4.0, count=20000, seed=1)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g >= 0 for g in gaps) and times == sorted(times)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.variance(gaps) == pytest.approx(0.25**2, rel=0.08)  # exponential: variance = mean^2


def test_burstiness_moves_the_variance_the_right_way():
    def variance(burstiness):
        gaps = workload.interarrival_times(2.0, 20000, burstiness, seed=2)
        assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)  # the rate holds whatever the burstiness
        return statistics.variance(gaps)

    bursty, poisson, regular = variance(0.25), variance(1.0), variance(4.0)
    assert bursty > 2 * poisson > 4 * regular  # shape k: variance = mean^2 / k
    assert bursty == pytest.approx(0.5**2 / 0.25, rel=0.15)


def test_arrivals_are_reproducible_per_seed_and_checked():
    assert arrival_times(3.0, 50, 0.5, seed=9) == arrival_times(3.0, 50, 0.5, seed=9)
    assert arrival_times(3.0, 50, 0.5, seed=9) != arrival_times(3.0, 50, 0.5, seed=10)
    assert arrival_times(float("inf"), 3) == [0.0, 0.0, 0.0]
    for bad in (dict(rate=0.0), dict(rate=-1.0), dict(rate=1.0, burstiness=0.0)):
        with pytest.raises(ValueError):
            arrival_times(count=5, **bad)


def test_plans_give_the_same_prompts_in_the_same_order_for_a_seed():
    prompts = load_workload_prompts()
    fleet = FleetSpec.parse("laptop:2,raspberry-pi-5:3")
    one = workload.open_loop_plan(fleet, prompts, rate=5.0, count=100, seed=4)
    assert one == workload.open_loop_plan(fleet, prompts, rate=5.0, count=100, seed=4)
    assert one != workload.open_loop_plan(fleet, prompts, rate=5.0, count=100, seed=5)
    assert len({a.prompt.index for a in one[:80]}) == 80  # a shuffled pass uses every prompt once
    assert {a.device.device_id for a in one} == {d.device_id for d in fleet.devices}
    small = workload.closed_loop_plan(FleetSpec.parse("laptop:1"), prompts, 6, seed=1, think_seconds=2.0)
    large = workload.closed_loop_plan(fleet, prompts, 6, seed=1, think_seconds=2.0)
    assert small["laptop-0"] == large["laptop-0"]  # a device's sessions do not depend on the rest of the fleet
    assert large["laptop-0"] != large["laptop-1"]
    assert all(s.think_seconds > 0 for s in large["raspberry-pi-5-2"])
    fixed = workload.closed_loop_plan(fleet, prompts, 3, think_seconds=1.5, exponential_think=False)
    assert [s.think_seconds for s in fixed["laptop-1"]] == [1.5, 1.5, 1.5]


def test_an_open_loop_run_gives_each_arrival_a_device_of_its_own_that_waits_for_its_arrival_time():
    from wisp_bench.cli import open_loop_devices

    prompts = load_workload_prompts()
    fleet = FleetSpec.parse("laptop:1,jetson-orin-nano:3")
    arrivals = workload.open_loop_plan(fleet, prompts, rate=4.0, count=40, seed=2)
    devices, plan = open_loop_devices(fleet, prompts, 4.0, 40, 1.0, 2)
    assert len({d.device_id for d in devices}) == 40
    for device, arrival in zip(devices, arrivals):
        assert device.profile == arrival.device.profile
        assert plan[device.device_id] == [workload.ClosedLoopSession(arrival.time, arrival.prompt)]
    assert 5.0 < arrivals[-1].time < 20.0  # 40 arrivals at 4 per second
    assert sum(d.profile.name == "jetson-orin-nano" for d in devices) > 20  # the fleet's mix, 3 in 4


# --- fleets and SLOs --------------------------------------------------------------------------------------------


def test_fleet_spec_gives_stable_device_ids():
    fleet = FleetSpec.parse("laptop:2, jetson-orin-nano:3")
    assert [d.device_id for d in fleet.devices] == [
        "laptop-0",
        "laptop-1",
        "jetson-orin-nano-0",
        "jetson-orin-nano-1",
        "jetson-orin-nano-2",
    ]
    assert fleet.devices[2].profile.name == "jetson-orin-nano" and len(fleet) == 5
    device_id, device_profile = fleet.devices[0]
    assert (device_id, device_profile.name) == ("laptop-0", "laptop")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("laptop", "expected PROFILE:COUNT"),
        ("laptop:x", "expected PROFILE:COUNT"),
        ("laptop:0", "at least 1"),
        ("phone:2", "unknown profile 'phone'; known: jetson-orin-nano, laptop, raspberry-pi-5"),
        ("laptop:1,laptop:2", "listed twice"),
        ("laptop:1,,jetson-orin-nano:1", "empty entry"),
        ("", "empty entry"),
    ],
)
def test_bad_fleet_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        FleetSpec.parse(spec)


def test_slo_spec_per_class_with_a_default():
    slos = SloSpec.parse("laptop=2.0/0.1, jetson-orin-nano=3/0.15")
    assert slos.for_class("laptop") == Slo(2.0, 0.1)
    assert slos.for_class("jetson-orin-nano") == Slo(3.0, 0.15)
    assert slos.for_class("raspberry-pi-5") == workload.DEFAULT_SLO
    assert SloSpec.parse("laptop=1/0.1,default=5/0.5").for_class("raspberry-pi-5") == Slo(5.0, 0.5)
    assert SloSpec.parse("", default=Slo(9.0, 0.9)).for_class("laptop") == Slo(9.0, 0.9)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("laptop=2.0", "expected CLASS=TTFT/TPOT"),
        ("laptop:2.0/0.1", "expected CLASS=TTFT/TPOT"),
        ("laptop=a/0.1", "must be numbers"),
        ("laptop=-1/0.1", "positive"),
        ("laptop=1/0", "positive"),
        ("laptop=1/0.1,laptop=2/0.2", "listed twice"),
        ("phone=1/0.1", "unknown device class 'phone'"),
    ],
)
def test_bad_slo_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        SloSpec.parse(spec, known=NAMES)


def test_the_server_admits_every_session_unless_told_to_admit_fewer():
    """By default a sweep's server has room for every device's session; --server-max-sessions overloads it."""
    from wisp_bench.cli import CONFIGURATIONS, main_parser, server_args

    def admitted(*options: str) -> int:
        args = main_parser().parse_args(["run", "--regime", "modeled", "--sizes", "8", "32", *options])
        command = server_args(args, CONFIGURATIONS["wisp-paced"], 32, Path("answers.jsonl"))
        return int(command[command.index("--max-sessions") + 1])

    assert admitted() >= 32
    assert admitted("--server-max-sessions", "16") == 16


def test_a_sweep_runs_every_configuration_at_a_load_before_the_next_load():
    """Configurations are compared side by side: all of them at one load, their order reversed at the next, so a
    machine that slows for a few minutes does not slow one configuration's every point."""
    from wisp_bench.cli import interleaved

    order = interleaved(["wisp", "sled", "centralized"], [1, 2, 4])
    assert order == [
        ("wisp", 1), ("sled", 1), ("centralized", 1),
        ("centralized", 2), ("sled", 2), ("wisp", 2),
        ("wisp", 4), ("sled", 4), ("centralized", 4),
    ]  # fmt: skip
