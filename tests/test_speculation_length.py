"""The goodput-optimal speculation length the server suggests, and the adaptive edge keeping to it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wisp_common.request import SamplingParams, StopCondition
from wisp_edge.controller import AcceptancePredictor, AdaptiveSpeculation, FixedLength, RoundTiming
from wisp_edge.drafter import DraftSignals
from wisp_server.estimator import SequenceShape, VerificationTimeEstimator
from wisp_server.session import Session
from wisp_server.speculation_length import Load, expected_tokens, goodput_optimal_drafts


def linear_cost(launch: float, per_sequence: float, per_token: float):
    """A batch's time: a launch, then a cost per sequence and per new token (a CPU: every token costs)."""

    def batch_seconds(others: list[SequenceShape]):
        return lambda shape: launch + sum(per_sequence + per_token * s.new_tokens for s in [*others, shape])

    return batch_seconds


def test_expected_tokens_counts_the_verdicts_own_token_and_each_draft_reached():
    assert expected_tokens(0.5, 0) == 1
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5


def test_no_draft_when_none_pays_and_every_draft_when_they_are_nearly_free():
    # Compute-bound (a token costs as much as a sequence) and drafts mostly rejected: nothing pays.
    assert goodput_optimal_drafts(0.2, 100, 8, 0.0, linear_cost(0.001, 0.01, 0.01)([])) == 0
    # Memory-bound (a step costs the same whatever its tokens): every draft adds tokens for free.
    assert goodput_optimal_drafts(0.6, 100, 8, 0.0, linear_cost(0.03, 0.0, 1e-6)([])) == 8


def test_a_full_batch_leaves_room_for_fewer_drafts_than_a_lone_session():
    """The same acceptance and costs: alone, the launch cost is the session's own, and drafts amortise it;
    in a batch of 15 others sending one token each, a draft competes with their cheaper tokens."""
    cost = linear_cost(0.020, 0.001, 0.002)
    alone = goodput_optimal_drafts(0.55, 100, 8, 0.0, cost([]))
    others = [SequenceShape(100, 1)] * 15
    loaded = goodput_optimal_drafts(0.55, 100, 8, float(len(others)), cost(others))
    assert alone >= 3 > loaded


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0.0, 0.99),
    st.floats(0.0, 0.05),
    st.floats(0.0, 0.01),
    st.floats(1e-5, 0.01),
    st.integers(0, 20),
    st.integers(0, 8),
)
def test_the_length_chosen_is_the_best_of_all_lengths(acceptance, launch, per_sequence, per_token, load, max_drafts):
    others = [SequenceShape(200, 2)] * load
    batch_seconds = linear_cost(launch, per_sequence, per_token)(others)
    tokens = 1.5 * load
    chosen = goodput_optimal_drafts(acceptance, 200, max_drafts, tokens, batch_seconds)
    goodput = [
        (tokens + expected_tokens(acceptance, k)) / batch_seconds(SequenceShape(200, 1 + k))
        for k in range(max_drafts + 1)
    ]
    assert 0 <= chosen <= max_drafts
    assert goodput[chosen] == pytest.approx(max(goodput))


@pytest.mark.parametrize("padded", [False, True])
def test_estimates_with_others_equal_the_estimate_of_the_whole_batch(padded):
    estimator = VerificationTimeEstimator(padded=padded)
    rng = np.random.default_rng(0)
    for _ in range(30):
        batch = [SequenceShape(int(rng.integers(0, 500)), int(rng.integers(1, 9))) for _ in range(rng.integers(1, 9))]
        estimator.observe(batch, 0.01 + 0.001 * sum(s.new_tokens for s in batch))
    others = [SequenceShape(300, 3), SequenceShape(20, 1)]
    with_others = estimator.with_others(others)
    for shape in (SequenceShape(100, 1), SequenceShape(900, 9)):
        assert with_others(shape) == pytest.approx(estimator.estimate([*others, shape]))


@pytest.mark.parametrize("padded", [False, True])
def test_a_hint_weighs_the_session_against_the_rest_of_the_load_as_the_whole_batch_would(padded):
    """`Load` (taken once per batch) gives each session the others' tokens and the batch time with its round added,
    as summing the other sessions would; past the batch limit, a typical limit's worth of them."""
    estimator = VerificationTimeEstimator(padded=padded)
    rng = np.random.default_rng(1)
    for _ in range(30):
        batch = [SequenceShape(int(rng.integers(0, 500)), int(rng.integers(1, 9))) for _ in range(rng.integers(1, 9))]
        estimator.observe(batch, 0.01 + 0.001 * sum(s.new_tokens for s in batch) + 0.002 * len(batch))
    sessions = []
    for index in range(5):
        session = Session(f"s{index}", 10, list(range(40 * index + 10)), SamplingParams(), StopCondition(64), 4096)
        session.next_drafts, session.drafted, session.accepted = index, 10 * index, 4 * index
        sessions.append(session)
    load = Load.of(s.next_round for s in sessions)
    me, rest = sessions[2], [s for s in sessions if s is not sessions[2]]
    shapes = [SequenceShape(len(s.context), 1 + s.next_drafts) for s in rest]
    tokens, seconds = load.others(me.session_id, estimator, room=8)
    assert tokens == pytest.approx(sum(s.expected_tokens(s.next_drafts) for s in rest))
    for shape in (SequenceShape(len(me.context), 1), SequenceShape(len(me.context), 5)):
        assert seconds(shape) == pytest.approx(estimator.estimate([*shapes, shape]))
    if not padded:  # 2 of the 4 others fit beside it: half of their tokens and of their cost beyond the launch
        tokens, seconds = load.others(me.session_id, estimator, room=2)
        assert tokens == pytest.approx(sum(s.expected_tokens(s.next_drafts) for s in rest) / 2)
        shape = SequenceShape(len(me.context), 1)
        launch = estimator.estimate([shape]) - estimator.sequence_cost(shape)
        own = estimator.sequence_cost(shape)
        assert seconds(shape) - launch - own == pytest.approx((estimator.estimate([*shapes, shape]) - launch - own) / 2)


def confident() -> DraftSignals:
    return DraftSignals(top1=0.99, entropy=0.05, margin=0.98)


@pytest.mark.parametrize(("suggested", "most"), [(0, 0), (2, 2), (None, 6), (9, 6)])
def test_the_adaptive_edge_never_drafts_past_the_servers_suggestion(suggested, most):
    controller = AdaptiveSpeculation(6, AcceptancePredictor(), min_run_probability=0.0)
    timing = RoundTiming(suggested_drafts=suggested)
    assert controller.round_length([confident()] * 8, timing, can_draft_more=False) == most
    if most < 6:  # it stops asking for drafts at the cap
        assert controller.round_length([confident()] * most, timing, can_draft_more=True) == most


def test_a_fixed_length_edge_ignores_the_suggestion_as_sled_does():
    assert FixedLength(4).round_length([confident()] * 4, RoundTiming(suggested_drafts=0), can_draft_more=True) == 4
