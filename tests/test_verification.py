"""The shared verification math: greedy acceptance and lossless rejection sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams
from wisp_common.verification import (
    DraftDistribution,
    Verification,
    dense_draft_probs,
    draft_distributions,
    target_distribution,
    verify,
    verify_greedy,
    verify_sampled,
)

VOCAB = 8
TRIALS = 20000


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(tokens), VOCAB)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


@pytest.mark.parametrize(
    ("target", "drafts", "expected"),
    [
        ([1, 2, 3, 4], [1, 2, 3], Verification(3, 4)),  # all accepted: bonus token
        ([1, 2, 3, 4], [1, 5, 3], Verification(1, 2)),  # rejected at the second: correction
        ([1, 2, 3, 4], [7, 2, 3], Verification(0, 1)),
        ([6], [], Verification(0, 6)),  # no drafts: plain decoding
    ],
)
def test_greedy_accepts_the_matching_prefix(target, drafts, expected):
    assert verify_greedy(one_hot_logits(target), drafts) == expected


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    kept = lambda params: (target_distribution(logits, params)[0] > 0).tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.65)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.71)) == [True, True, True, False]
    assert kept(SamplingParams(temperature=1.0, top_p=0.05)) == [True, False, False, False]
    probs = target_distribution(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert torch.allclose(probs[:2], torch.tensor([4 / 7, 3 / 7]))


def broken_verify_sampled(probs, drafts, generator, draft_probs=None) -> Verification:
    """A plausible-looking mistake: on rejection, resample from p instead of the residual."""
    for i, token in enumerate(drafts):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i][token])
        if float(torch.rand(1, generator=generator)) < min(1.0, float(probs[i][token]) / q_x):
            continue
        return Verification(i, int(torch.multinomial(probs[i], 1, generator=generator)))
    return Verification(len(drafts), int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))


def first_token_counts(rule, use_draft_probs: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``TRIALS`` two-draft rounds; returns the histogram of the first committed token, and p."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(3, VOCAB, generator=generator) * 1.5, -1)
    q = torch.softmax(torch.randn(2, VOCAB, generator=generator) * 1.5, -1)
    counts = torch.zeros(VOCAB)
    for _ in range(TRIALS):
        drafts = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
        result = rule(p, drafts, generator, q if use_draft_probs else None)
        first = drafts[0] if result.num_accepted > 0 else result.next_token
        counts[first] += 1
    return counts, p[0]


@pytest.mark.parametrize("use_draft_probs", [False, True], ids=["point-mass", "draft-probs"])
def test_rejection_sampling_follows_the_target_distribution(use_draft_probs):
    counts, p = first_token_counts(verify_sampled, use_draft_probs, seed=1)
    assert chisquare(counts.numpy(), (p * TRIALS).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("use_draft_probs", [False, True], ids=["point-mass", "draft-probs"])
def test_the_distribution_test_catches_a_broken_acceptance_rule(use_draft_probs):
    counts, p = first_token_counts(broken_verify_sampled, use_draft_probs, seed=1)
    assert chisquare(counts.numpy(), (p * TRIALS).numpy()).pvalue < 1e-6


def test_bonus_token_follows_the_last_row_when_every_draft_is_accepted():
    generator = torch.Generator().manual_seed(0)
    p = torch.zeros(2, VOCAB)
    p[0, 3] = 1.0  # the draft is certain to be accepted
    p[1] = torch.softmax(torch.randn(VOCAB, generator=generator), -1)
    counts = torch.zeros(VOCAB)
    for _ in range(5000):
        result = verify_sampled(p, [3], generator)
        assert result.num_accepted == 1
        counts[result.next_token] += 1
    assert chisquare(counts.numpy(), (p[1] * 5000).numpy()).pvalue > 1e-3


SPARSE_Q = DraftDistribution((1, 3, 4, 6), (0.4, 0.3, 0.2, 0.1))


def joint_counts(rule, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``TRIALS`` one-draft rounds with the draft sampled from ``SPARSE_Q``; returns the histogram of
    (accepted?, committed token) and its exact expectation: accepted x with min(p(x), q(x)), rejected then y with
    max(0, p(y) - q(y)). Summed over both, y follows p exactly."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(2, VOCAB, generator=generator) * 1.5, -1)
    q = dense_draft_probs([SPARSE_Q], [SPARSE_Q.token_ids[0]], VOCAB, "cpu")  # one row, the q of any draft
    support = torch.tensor(SPARSE_Q.probs)
    counts = torch.zeros(2, VOCAB)
    for _ in range(TRIALS):
        draft = SPARSE_Q.token_ids[int(torch.multinomial(support, 1, generator=generator))]
        result = rule(p, [draft], generator, q)
        accepted = result.num_accepted == 1
        counts[0 if accepted else 1, draft if accepted else result.next_token] += 1
    expected = torch.stack([torch.minimum(p[0], q[0]), (p[0] - q[0]).clamp_min(0)]) * TRIALS
    return counts, expected


def test_sparse_draft_probabilities_accept_min_p_q_and_reject_to_the_residual():
    counts, expected = joint_counts(verify_sampled, seed=2)
    assert expected.sum().item() == pytest.approx(TRIALS)
    possible = expected > 0
    assert counts[~possible].sum() == 0  # e.g. never accepts a token q does not list
    assert chisquare(counts[possible].numpy(), expected[possible].numpy()).pvalue > 1e-3


def test_the_exact_check_catches_resampling_from_p_instead_of_the_residual():
    counts, expected = joint_counts(broken_verify_sampled, seed=2)
    possible = expected > 0
    assert counts[~possible].sum() > 0 or chisquare(counts[possible].numpy(), expected[possible].numpy()).pvalue < 1e-6


@pytest.mark.slow
def test_verify_uses_sparse_proposals_only_when_sampling():
    """Greedy ignores q; sampling with q = p accepts every draft (min(1, p/q) = 1)."""
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]) + 1e-30)
    proposals = (DraftDistribution((0, 1), (0.5, 0.5)),)
    assert verify(logits, [1], SamplingParams(), proposals=proposals) == Verification(0, 0)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    assert all(verify(logits, [1], params, generator, proposals).num_accepted == 1 for _ in range(200))
    # The same draft as a point mass is accepted only with p = 0.5.
    accepted = sum(verify(logits, [1], params, generator).num_accepted for _ in range(600))
    assert 240 < accepted < 360  # 300 ± 5 standard deviations


def draft_round(drafts: list[int], *entries: tuple[list[int], list[float]]) -> pb.DraftRound:
    return pb.DraftRound(
        token_ids=drafts,
        draft_probabilities=[pb.DraftProbabilities(token_ids=ids, probs=probs) for ids, probs in entries],
    )


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (draft_round([1, 2], ([1], [1.0])), "1 entries for 2 drafts"),
        (draft_round([1], ([1, 2], [1.0])), "lists 2 tokens but 1 probabilities"),
        (draft_round([1], ([1, 1], [0.5, 0.5])), "lists a token twice"),
        (draft_round([1], ([1, VOCAB], [0.5, 0.5])), "outside the vocabulary"),
        (draft_round([1], ([1, 2], [float("nan"), 0.5])), "finite number in [0, 1]"),
        (draft_round([1], ([1, 2], [1.5, -0.5])), "finite number in [0, 1]"),
        (draft_round([1], ([1, 2], [0.5, 0.6])), "sums to 1.1"),
        (draft_round([1], ([1, 2], [0.5, 0.4])), "sums to 0.9"),
        (draft_round([3], ([1, 2], [0.5, 0.5])), "gives the draft 3 no probability"),
        (draft_round([1], ([1, 2], [0.0, 1.0])), "gives the draft 1 no probability"),
    ],
)
def test_malformed_draft_probabilities_are_refused(message, words):
    with pytest.raises(ValueError) as refused:
        draft_distributions(message, VOCAB)
    assert words in str(refused.value)


def test_draft_probabilities_parse_with_point_masses_where_entries_are_empty():
    message = draft_round([1, 5], ([1, 2], [0.75, 0.25]), ([], []))
    assert draft_distributions(message, VOCAB) == (DraftDistribution((1, 2), (0.75, 0.25)), None)
    assert draft_distributions(draft_round([1, 5]), VOCAB) == ()  # an edge that sends none
