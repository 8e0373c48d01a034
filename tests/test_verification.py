"""The shared verification math: greedy acceptance and lossless rejection sampling."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from wisp_common.request import SamplingParams
from wisp_common.verification import Verification, target_distribution, verify_greedy, verify_sampled

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
