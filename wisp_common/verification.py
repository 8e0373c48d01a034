"""The verification math every engine shares.

Given the target's logits at the positions of one round's drafts (one row per
draft plus one after the last draft), decide how many drafts are accepted and
which target token comes next. Both rules are lossless:

* greedy: a draft is accepted while it equals the target's argmax; the argmax
  at the first mismatch is the correction, or after the last draft the bonus.
* sampling (Leviathan et al. 2023, Chen et al. 2023): draft x drawn from q is
  accepted with probability min(1, p(x)/q(x)); on rejection the next token is
  drawn from the residual max(0, p - q), renormalised; if all are accepted a
  bonus token is drawn from p. Whatever q is, every committed token follows p
  exactly. Without draft probabilities q is the point mass at x, which is what
  the minimal protocol (token ids only) uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wisp_common.request import SamplingParams


@dataclass(frozen=True)
class Verification:
    num_accepted: int
    next_token: int


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of probabilities the target samples from: temperature, then top-k, then top-p."""
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the top-1 always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


def verify_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> Verification:
    """``logits`` has ``len(drafts) + 1`` rows."""
    targets = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return Verification(accepted, targets[accepted])


def verify_sampled(
    probs: torch.Tensor,
    drafts: Sequence[int],
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> Verification:
    """Speculative rejection sampling.

    ``probs`` are the target's ``len(drafts) + 1`` rows; ``draft_probs``, if
    given, the draft's ``len(drafts)`` rows (the distribution each draft was
    drawn from); without them each draft is treated as a point mass.
    """
    uniforms = torch.rand(len(drafts), generator=generator, device=probs.device).tolist()
    for i, token in enumerate(drafts):
        p = probs[i]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i]
        p_x, q_x = float(p[token]), float(q[token])
        if q_x > 0 and uniforms[i] < min(1.0, p_x / q_x):
            continue
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # only when p == q up to rounding
            residual = p
        return Verification(i, int(torch.multinomial(residual, 1, generator=generator)))
    bonus = torch.multinomial(probs[len(drafts)], 1, generator=generator)
    return Verification(len(drafts), int(bonus))


def verify(
    logits: torch.Tensor,
    drafts: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Verification:
    if params.greedy:
        return verify_greedy(logits, drafts)
    if generator is None:
        raise ValueError("sampling needs a generator")
    return verify_sampled(target_distribution(logits, params), drafts, generator)
