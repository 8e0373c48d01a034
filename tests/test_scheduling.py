"""Guarantees of the batch scheduling policies and the verification time estimator (property tests)."""

from __future__ import annotations

import logging
import random

import grpc
import numpy as np
import pytest
from helpers import running_server
from hypothesis import given, settings
from hypothesis import strategies as st

from wisp_server.engines.base import RoundRequest, RoundVerdict
from wisp_server.estimator import SequenceShape, VerificationTimeEstimator, features, sequence_features
from wisp_server.scheduler import (
    BatchLimits,
    ExpectedRound,
    FCFSPolicy,
    PendingRound,
    SchedulingPolicy,
    SLEDPolicy,
    WispPolicy,
    computed_shape,
)

TRUE_COEF = np.array([0.004, 0.0008, 0.0003, 0.0002, 0.00005])  # launch, sequence, token, attention, prefill


def true_time(shapes: list[SequenceShape]) -> float:
    return float(features(shapes) @ TRUE_COEF)


def trained_estimator(batches: int = 40, seed: int = 0) -> VerificationTimeEstimator:
    estimator = VerificationTimeEstimator()
    rng = random.Random(seed)
    for _ in range(batches):
        shapes = random_shapes(rng)
        estimator.observe(shapes, true_time(shapes) * rng.uniform(0.95, 1.05))
    return estimator


def random_shapes(rng: random.Random) -> list[SequenceShape]:
    return [SequenceShape(rng.randrange(0, 2000), rng.randrange(1, 9)) for _ in range(rng.randrange(1, 17))]


ESTIMATOR = trained_estimator()

pending_rounds = st.lists(
    st.builds(
        lambda context, new, deadline, expected, arrival: PendingRound(
            RoundRequest("s", ()), SequenceShape(context, new), deadline, expected, arrival
        ),
        st.integers(0, 2000),
        st.integers(1, 300),
        st.floats(-1.0, 2.0),
        st.floats(1.0, 5.0),
        st.floats(-2.0, 0.0),
    ),
    min_size=1,
    max_size=40,
)
limits = st.builds(BatchLimits, st.integers(1, 16), st.integers(1, 600))


def policies(lim: BatchLimits):
    return [FCFSPolicy(lim, ESTIMATOR), SLEDPolicy(lim, ESTIMATOR, window=0.0), WispPolicy(lim, ESTIMATOR)]


@settings(max_examples=200, deadline=None)
@given(pending_rounds, limits)
def test_no_policy_exceeds_the_sequence_and_token_limits(waiting, lim):
    for policy in policies(lim):
        batch = policy.select(waiting, now=0.0)
        assert batch, policy.name  # something is always launched when asked with nothing to wait for
        assert len(set(map(id, batch))) == len(batch) and all(p in waiting for p in batch)
        if len(batch) > 1:  # a lone round is launched even when it alone exceeds the token limit
            assert len(batch) <= lim.max_sessions, policy.name
            assert sum(p.shape.new_tokens for p in batch) <= lim.max_tokens, policy.name


@settings(max_examples=200, deadline=None)
@given(pending_rounds)
def test_wisp_serves_urgent_rounds_earliest_deadline_first(waiting):
    lim = BatchLimits(max_sessions=4, max_tokens=10_000)
    policy = WispPolicy(lim, ESTIMATOR, urgency=0.05, max_wait=100.0)
    now = 0.0
    urgent = sorted(
        (p for p in waiting if p.deadline >= now and p.deadline - now - ESTIMATOR.estimate([p.shape]) < 0.05),
        key=lambda p: p.deadline,
    )
    batch = policy.select(waiting, now)
    assert batch[: min(len(urgent), 4)] == urgent[:4]


def test_wisp_prefers_rounds_that_can_still_make_it_over_late_ones():
    lim = BatchLimits(max_sessions=2, max_tokens=10_000)
    late = [PendingRound(RoundRequest(f"late{i}", ()), SequenceShape(100, 5), -0.5, 5.0, -0.1) for i in range(3)]
    on_time = [PendingRound(RoundRequest(f"ok{i}", ()), SequenceShape(100, 5), 5.0, 1.5, -0.1) for i in range(2)]
    batch = WispPolicy(lim, ESTIMATOR).select(late + on_time, now=0.0)
    assert set(map(id, batch)) == set(map(id, on_time))


def test_wisp_launches_only_what_finishes_by_the_deadlines():
    lim = BatchLimits(max_sessions=16, max_tokens=100_000)
    tight = PendingRound(RoundRequest("tight", ()), SequenceShape(100, 5), 0.2, 2.0, 0.0)
    heavy = [PendingRound(RoundRequest(f"h{i}", ()), SequenceShape(0, 400), 10.0, 1.0, 0.0) for i in range(8)]
    batch = WispPolicy(lim, ESTIMATOR, urgency=0.0).select([tight, *heavy], now=0.0)
    assert tight in batch
    assert ESTIMATOR.estimate([p.shape for p in batch]) <= 0.2  # the heavy prefills wait for the next batch
    assert len(batch) < 9


def test_wisp_sheds_no_one_where_shedding_cannot_save_a_deadline():
    """A step that costs the same whatever it holds (a GPU reading its weights): a deadline inside it cannot be
    met by any batch, so the batch keeps everyone instead of sending them to a later one."""
    flat = VerificationTimeEstimator()
    for n in range(1, 17):
        flat.observe([SequenceShape(100, 1)] * n, 0.040)
    lim = BatchLimits(max_sessions=16, max_tokens=1024)
    doomed = PendingRound(RoundRequest("doomed", ()), SequenceShape(100, 1), 0.030, 1.0, 0.0)
    others = [PendingRound(RoundRequest(f"o{i}", ()), SequenceShape(100, 1), 1.0, 1.0, 0.0) for i in range(8)]
    assert len(WispPolicy(lim, flat, urgency=0.0).select([doomed, *others], now=0.0)) == 9


def simulate(policy: SchedulingPolicy, rng: random.Random, arrivals: tuple[int, int], batches: int = 300):
    """Feeds ``policy`` a stream of rounds with mixed deadlines and values; yields (now, waiting, batch) per launch."""
    now, waiting = 0.0, []
    for _ in range(batches):
        for _ in range(rng.randrange(*arrivals)):
            shape = SequenceShape(rng.randrange(0, 2000), rng.randrange(1, 9))
            deadline = now + rng.choice([-1.0, 0.01, 0.1, 1.0, 100.0])
            waiting.append(PendingRound(RoundRequest("s", ()), shape, deadline, rng.uniform(1, 5), now))
        batch = policy.select(waiting, now)
        yield now, waiting, batch
        waiting = [p for p in waiting if p not in batch]
        now += ESTIMATOR.estimate([p.shape for p in batch])


def make_policy(name: str, lim: BatchLimits, max_wait: float = 0.5) -> SchedulingPolicy:
    policy = {p.name: p for p in policies(lim)}[name]
    if isinstance(policy, WispPolicy):
        policy.max_wait = max_wait
    return policy


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["fcfs", "sled", "wisp"]))
def test_nothing_starves_under_overload(seed, name):
    """More rounds arrive than batches hold, for good: waits grow for everyone, but a round that has
    waited its bound (wisp: max_wait; fcfs and sled: none) is never overtaken by a later arrival."""
    lim = BatchLimits(max_sessions=4, max_tokens=10_000)
    bound = 0.5 if name == "wisp" else 0.0
    for now, waiting, batch in simulate(make_policy(name, lim, bound), random.Random(seed), (3, 7)):
        starving = [p for p in waiting if p not in batch and now - p.arrival >= bound]
        if starving:
            oldest_left = min(p.arrival for p in starving)
            assert all(q.arrival <= oldest_left for q in batch), name


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_wisp_bounds_every_wait_when_the_load_fits(seed):
    """Bursty load under capacity (3.5 rounds per batch of 4): whatever its value or deadline, every round
    is served within max_wait plus a few batch times, although wisp ranks by value."""
    lim = BatchLimits(max_sessions=4, max_tokens=10_000)
    runs = simulate(make_policy("wisp", lim), random.Random(seed), (2, 6))
    waits = [now - p.arrival for now, _, batch in runs for p in batch]
    assert max(waits) <= 0.5 + 0.2


def test_estimator_fit_improves_with_more_batches():
    rng = random.Random(7)
    held_out = [random_shapes(rng) for _ in range(100)]

    def mape(estimator: VerificationTimeEstimator) -> float:
        return float(np.mean([abs(estimator.estimate(s) - true_time(s)) / true_time(s) for s in held_out]))

    few, many = trained_estimator(batches=3, seed=1), trained_estimator(batches=200, seed=1)
    assert mape(many) < mape(few)
    assert mape(many) < 0.05
    assert many.mape is not None and many.mape < 10  # its own running error, in percent


def test_estimator_follows_a_machine_that_changes_speed():
    estimator = trained_estimator(batches=100)
    rng = random.Random(3)
    for _ in range(400):  # the machine becomes twice as slow
        shapes = random_shapes(rng)
        estimator.observe(shapes, 2 * true_time(shapes))
    shapes = random_shapes(rng)
    assert abs(estimator.estimate(shapes) / (2 * true_time(shapes)) - 1) < 0.1


def test_a_saved_fit_is_taken_up_only_by_the_server_it_was_saved_for(tmp_path, caplog):
    """A restarted server starts from the last one's least-squares sums, and learns on from them exactly as the
    last one would have; a fit saved for other hardware or threads, or a padding engine's, or a damaged file, is
    ignored."""
    saved, path = trained_estimator(batches=50, seed=2), tmp_path / "fit.json"
    identity = {"engine": "HFEngine", "target": "abc", "hardware": "AMD EPYC, 2 cores, avx2", "threads": 0}
    saved.save(path, identity)
    restored = VerificationTimeEstimator()
    assert restored.load(path, identity) and restored.observations == 50
    rng = random.Random(9)
    for _ in range(20):
        shapes = random_shapes(rng)
        assert restored.estimate(shapes) == pytest.approx(saved.estimate(shapes), rel=1e-12)
        saved.observe(shapes, true_time(shapes))
        restored.observe(shapes, true_time(shapes))
    assert restored.coefficients == pytest.approx(saved.coefficients, rel=1e-9)

    for other in ({**identity, "hardware": "Intel Xeon, 2 cores, avx2 avx512f"}, {**identity, "threads": 1}):
        assert not VerificationTimeEstimator().load(path, other)
    assert not VerificationTimeEstimator(padded=True).load(path, identity)  # the engine's batch shape differs
    assert not VerificationTimeEstimator().load(tmp_path / "none.json", identity)
    path.write_text('{"format": 1, "identity"')
    fresh = VerificationTimeEstimator()
    assert not fresh.load(path, identity) and fresh.observations == 0 and fresh.estimate(random_shapes(rng)) == 0
    assert "ignoring the saved estimator fit" in caplog.text


def test_a_restarted_server_starts_from_the_fit_its_predecessor_saved(tiny_pair, tmp_path, caplog):
    """The first start profiles; at stop the fit, with what serving taught it, is saved; the next start on the same
    engine, target and hardware takes it up instead of profiling, unless told not to."""
    from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
    from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc

    fits = tmp_path / "fits"
    caplog.set_level(logging.INFO, logger="wisp_server")
    with running_server(tiny_pair[0], engine="hf", estimator_cache=str(fits)) as first:
        profiled = first.estimator.observations
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], stop=pb.StopCondition(max_new_tokens=4))
            assert len(list(pb_grpc.WispStub(channel).Generate(request))) >= 1
    assert "estimator profiled" in caplog.text
    assert first.estimator.observations > profiled  # serving's batches, saved with the profile's
    assert len(list(fits.glob("fit-*.json"))) == 1

    caplog.clear()
    with running_server(tiny_pair[0], engine="hf", estimator_cache=str(fits)) as second:
        assert second.estimator.observations == first.estimator.observations
        assert second.estimator.coefficients == pytest.approx(first.estimator.coefficients, rel=1e-9)
    assert "starting from the fit saved" in caplog.text and "estimator profiled" not in caplog.text

    caplog.clear()
    with running_server(tiny_pair[0], engine="hf", estimator_cache="none"):
        pass
    assert "estimator profiled" in caplog.text


def test_estimator_of_a_padding_engine_counts_every_sequence_as_wide_as_the_widest():
    """The hf engine pads a batch to its longest context: a per-sequence model cannot fit that, the padded one can."""
    rng = random.Random(5)
    plain, padded = VerificationTimeEstimator(), VerificationTimeEstimator(padded=True)
    for _ in range(300):
        shapes = random_shapes(rng)
        seconds = float(features(shapes, padded=True) @ TRUE_COEF) * rng.uniform(0.95, 1.05)
        plain.observe(shapes, seconds)
        padded.observe(shapes, seconds)
    assert padded.mape < 5 and plain.mape > 2 * padded.mape, (padded.mape, plain.mape)


def test_a_sequence_costs_the_same_in_any_batch():
    """What lets the wisp policy rank rounds by value density once, not per candidate batch."""
    rng = random.Random(11)
    for _ in range(20):
        batch, extra = random_shapes(rng), SequenceShape(rng.randrange(0, 2000), rng.randrange(1, 9))
        added = ESTIMATOR.estimate([*batch, extra]) - ESTIMATOR.estimate(batch)
        assert abs(added - ESTIMATOR.sequence_cost(extra)) < 1e-9


def round_of(deadline: float = float("inf"), session: str = "s") -> PendingRound:
    return PendingRound(RoundRequest(session, ()), SequenceShape(100, 1), deadline, 1.0, 0.0)


def due(at: float, turnaround: float = 0.0) -> ExpectedRound:
    return ExpectedRound(at, turnaround, SequenceShape(100, 1), 1.0)


def test_wisp_holds_a_batch_for_rounds_due_sooner_than_a_batch_of_their_own_would_cost():
    policy = WispPolicy(BatchLimits(16, 1024), ESTIMATOR)
    waiting = [round_of() for _ in range(4)]
    launch = ESTIMATOR.coefficients["launch"]  # what a separate batch costs on top of its members: ~4 ms
    assert policy.select(waiting, 0.0, [due(0.3 * launch), due(0.6 * launch)]) == []
    assert policy.retry_after(waiting, 0.0) == pytest.approx(0.6 * launch)  # until the last of them is due
    assert policy.select(waiting, 0.0, [due(2 * launch)]) == waiting  # too far off: launch now
    assert policy.select(waiting, 0.0, [due(0.3 * launch, 2 * launch)]) == waiting  # half batches interleave better
    assert policy.select(waiting, 0.0) == waiting  # nothing expected: launch now
    full = WispPolicy(BatchLimits(4, 1024), ESTIMATOR)
    assert full.select(waiting, 0.0, [due(0.3 * launch)]) == waiting  # no room for it anyway
    tight = [round_of(deadline=ESTIMATOR.estimate([r.shape for r in waiting]) + 0.2 * launch), *waiting[1:]]
    assert policy.select(tight, 0.0, [due(0.3 * launch)]) == tight  # holding would miss a member's deadline


@pytest.mark.parametrize("turnaround_in_launches", [0.5, 2.0])
def test_holding_for_returning_sessions_ends_half_batches_where_that_pays(turnaround_in_launches):
    """Sessions come back a turnaround after their verdict. Launching whatever waits splits them into two halves
    that alternate. Where the turnaround is shorter than the launch cost a half batch adds, whole batches commit
    more per second, and the scheduler holds for the returners; where it is longer, half batches interleave
    better, and it does not. A small event simulation of 8 sessions, with and without the server knowing when
    they return."""
    turnaround = turnaround_in_launches * ESTIMATOR.coefficients["launch"]

    def simulate(knows_returns: bool) -> tuple[float, float]:
        policy, now, sizes = WispPolicy(BatchLimits(16, 1024), ESTIMATOR), 0.0, []
        ready = {f"s{i}": 0.0005 * i for i in range(8)}  # when each session's round arrives
        while len(sizes) < 200:
            waiting = [round_of(session=s) for s, t in ready.items() if t <= now]
            expected = [due(t, turnaround) for t in ready.values() if t > now] if knows_returns else []
            batch = policy.select(waiting, now, expected) if waiting else []
            if not batch:
                arrivals = [t for t in ready.values() if t > now]
                now = min([*arrivals, now + policy.retry_after(waiting, now)]) if waiting else min(arrivals)
                continue
            now += ESTIMATOR.estimate([p.shape for p in batch])
            sizes.append(len(batch))
            for p in batch:
                ready[p.request.session_id] = now + turnaround
        return sum(sizes) / len(sizes), sum(sizes) / now

    blind_size, blind_rate = simulate(False)
    knowing_size, knowing_rate = simulate(True)
    if turnaround_in_launches < 1:
        assert blind_size < 6 and knowing_size > 7.5  # halves, then whole batches
        assert knowing_rate > 1.1 * blind_rate  # tokens per second
    else:
        assert knowing_rate >= 0.99 * blind_rate  # never worse


shapes = st.lists(st.builds(SequenceShape, st.integers(0, 4000), st.integers(1, 64)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(shapes, st.booleans())
def test_a_batchs_features_are_its_launch_plus_each_sequences(batch, padded):
    widest = None
    if padded and batch:
        widest = SequenceShape(max(s.context_tokens for s in batch), max(s.new_tokens for s in batch))
    expected = np.array([1.0, 0, 0, 0, 0]) + sum((sequence_features(s, widest) for s in batch), np.zeros(5))
    assert np.allclose(features(batch, padded), expected)


def test_the_estimator_learns_what_a_round_computed_not_what_was_guessed_when_it_was_queued():
    """A first round is queued with the engine's guess of its prefix-cache hit; it computed its context from where
    the hit it got ended (blocks may be evicted or cached in between). Later rounds computed what they queued."""
    guessed = SequenceShape(160, 45)  # 160 of 205 context tokens guessed cached
    first = PendingRound(RoundRequest("s", ()), guessed, first=True)
    assert computed_shape(first, RoundVerdict(0, 7, reused_tokens=128)) == SequenceShape(128, 77)
    assert computed_shape(first, RoundVerdict(0, 7, reused_tokens=0)) == SequenceShape(0, 205)
    later = PendingRound(RoundRequest("s", (1, 2)), SequenceShape(300, 3))
    assert computed_shape(later, RoundVerdict(2, 7)) == SequenceShape(300, 3)
