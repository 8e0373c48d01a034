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

Draft probabilities travel sparse (`DraftDistribution`): the edge samples each
draft from the top tokens of its distribution, renormalised, and sends exactly
those tokens and probabilities; q is zero elsewhere. So the server knows the q
the draft was drawn from, not an approximation of it, and the rule stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams

# How far the sent probabilities of one draft may sum from 1 (float32 rounding on the edge, not a second scheme).
PROBABILITY_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Verification:
    num_accepted: int
    next_token: int


@dataclass(frozen=True)
class DraftDistribution:
    """The sparse proposal q one draft was sampled from: ``probs[i]`` for ``token_ids[i]``, zero elsewhere."""

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    def to_proto(self) -> pb.DraftProbabilities:
        return pb.DraftProbabilities(token_ids=self.token_ids, probs=self.probs)


def draft_distributions(msg: pb.DraftRound, vocab_size: int) -> tuple[DraftDistribution | None, ...]:
    """The round's proposals, one per draft (None: a point mass); ValueError says what breaks the protocol."""
    entries = msg.draft_probabilities
    if not entries:
        return ()
    if len(entries) != len(msg.token_ids):
        raise ValueError(
            f"draft_probabilities has {len(entries)} entries for {len(msg.token_ids)} drafts; send one per draft "
            "(an empty entry for a point mass) or none"
        )
    out: list[DraftDistribution | None] = []
    for i, (draft, entry) in enumerate(zip(msg.token_ids, entries)):
        if not entry.token_ids and not entry.probs:
            out.append(None)
            continue
        where = f"draft_probabilities[{i}]"
        if len(entry.token_ids) != len(entry.probs):
            raise ValueError(f"{where} lists {len(entry.token_ids)} tokens but {len(entry.probs)} probabilities")
        if len(set(entry.token_ids)) != len(entry.token_ids):
            raise ValueError(f"{where} lists a token twice")
        if any(token >= vocab_size for token in entry.token_ids):
            raise ValueError(f"{where} lists a token id outside the vocabulary of {vocab_size}")
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in entry.probs):
            raise ValueError(f"{where} has a probability that is not a finite number in [0, 1]")
        total = math.fsum(entry.probs)
        if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise ValueError(
                f"{where} sums to {total:.6g}; the listed tokens are the whole support of q, so they must sum to 1"
            )
        q = dict(zip(entry.token_ids, entry.probs))
        if q.get(draft, 0.0) <= 0.0:
            raise ValueError(f"{where} gives the draft {draft} no probability, so it cannot have been sampled")
        out.append(DraftDistribution(tuple(entry.token_ids), tuple(entry.probs)))
    return tuple(out)


def dense_draft_probs(
    proposals: Sequence[DraftDistribution | None], drafts: Sequence[int], vocab: int, device: torch.device | str
) -> torch.Tensor:
    """Rows of q over the whole vocabulary, one per draft: a point mass where there is no proposal; each sparse
    proposal divided by its sum, as the edge's sampler does."""
    rows = torch.zeros(len(drafts), vocab, dtype=torch.float32, device=device)
    for i, token in enumerate(drafts):
        proposal = proposals[i] if i < len(proposals) else None
        if proposal is None:
            rows[i, token] = 1.0
        else:
            ids = torch.tensor(proposal.token_ids, dtype=torch.long, device=device)
            values = torch.tensor(proposal.probs, dtype=torch.float32, device=device)
            rows[i].index_copy_(0, ids, values / values.sum())
    return rows


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
    proposals: Sequence[DraftDistribution | None] = (),
) -> Verification:
    """``proposals``: the distribution each draft was sampled from (empty, or None for a draft: a point mass);
    greedy ignores them."""
    if params.greedy:
        return verify_greedy(logits, drafts)
    if generator is None:
        raise ValueError("sampling needs a generator")
    probs = target_distribution(logits, params)
    draft_probs = None
    if any(p is not None for p in proposals):
        draft_probs = dense_draft_probs(proposals, drafts, probs.shape[-1], probs.device)
    return verify_sampled(probs, drafts, generator, draft_probs)
