"""`Drafter`: the edge's small model, proposing tokens that the server verifies.

A drafter mirrors the session's committed context and keeps a tail of
*pending* drafts: proposed, not yet confirmed. `draft_one` extends the tail
by one token; a verdict (`commit`) moves the accepted drafts and the server's
own token into the context. Drafts after them survive only where the
server's token equals the draft in its place: that is pipelined drafting
paying off (the drafter guessed the bonus token and kept going).

For a sampled session a drafter samples each draft from the top
`PROPOSAL_TOKENS` tokens of its temperature/top-k/top-p-adjusted distribution,
renormalised, and keeps that sparse q (`proposals`): the edge sends it, and the
server accepts the draft with probability min(1, p/q) (wisp_common.verification).
Copied drafts (prompt lookup, suffix index) are deterministic: point masses,
sent without q.

Two kinds share this logic:

* `ModelDrafter`: any HuggingFace causal LM with the target's tokenizer,
  its KV cache cropped back to what stays valid after each verdict;
* `wisp_edge.eagle.EagleDrafter`: a head conditioned on the target's
  features, which the server sends with each verdict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache, PreTrainedModel

from wisp_common.request import SamplingParams
from wisp_common.verification import DraftDistribution, target_distribution
from wisp_edge.lookup import PromptLookup
from wisp_edge.suffix import SuffixDecoder

# The support of a sampled draft's q: its likeliest tokens. Few enough to send cheaply (8 bytes a token),
# enough that little of the draft's mass is cut off.
PROPOSAL_TOKENS = 16


@dataclass(frozen=True)
class DraftSignals:
    """How sure the draft was of one token: what the speculation controller reads."""

    top1: float  # probability of its most likely token
    entropy: float  # nats
    margin: float  # top-1 minus top-2 probability
    lookup: bool = False  # the token was copied (prompt lookup or suffix index), not the draft's own pick
    suffix: float = 0.0  # where the suffix index proposed it: its estimated probability, else 0
    runner_up: int | None = None  # the draft's likeliest other token there (a server-paced `Drafter.branch`)


def runner_up_signals(first: DraftSignals) -> DraftSignals:
    """The signals of a draft's runner-up in its place: the second-likeliest token's (a branch's first token)."""
    return replace(first, top1=first.top1 - first.margin, margin=0.0, lookup=False, runner_up=None)


def signals_of(logits: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> tuple[DraftSignals, list[int]]:
    """The draft's confidence in its likeliest token, and its two likeliest tokens' ids (in the vocabulary)."""
    probs = logits.float().softmax(-1)
    entropy = -float((probs * probs.clamp_min(1e-12).log()).sum())
    if probs.numel() == 1:
        return DraftSignals(float(probs[0]), entropy, float(probs[0])), []
    top = probs.topk(2)
    ids = top.indices if vocab_ids is None else vocab_ids[top.indices]
    (first, second), best = top.values.tolist(), [int(i) for i in ids]
    return DraftSignals(first, entropy, first - second), best


class Drafter(ABC):
    wants_features = False  # whether sessions must ask the server for target features
    feature_layers: tuple[int, ...] = ()  # the target's decoder layers asked for beside them

    def __init__(
        self,
        sampling: SamplingParams = SamplingParams(),
        device: str | torch.device = "cpu",
        lookup: PromptLookup | None = None,
        suffix: SuffixDecoder | None = None,
        draft_probabilities: bool = True,
    ):
        """``draft_probabilities``: sample drafts from a sparse q kept in `proposals` (off: from the whole
        distribution, every draft sent as a point mass, as edges before draft probabilities did)."""
        self.sampling = sampling
        self.lookup = lookup
        self.suffix = suffix
        self.draft_probabilities = draft_probabilities
        self.generator = torch.Generator(device=device)
        if sampling.seed:
            self.generator.manual_seed(sampling.seed)
        self.tokens: list[int] = []  # committed context
        self.pending: list[int] = []  # drafted, not confirmed yet
        self.signals: list[DraftSignals] = []  # one per pending draft
        self.proposals: list[DraftDistribution | None] = []  # one per pending draft: its q, None for a point mass

    def start(self, context: Sequence[int]) -> None:
        """Begins a session whose committed context is ``context``. Model state of the leading tokens it shares
        with the last session's context is kept: a conversation's next turn does not recompute its history."""
        if self.suffix is not None:
            self.suffix.start(context, previous=self.tokens)
        kept = shared_prefix(self.tokens, context)
        self.tokens, self.pending, self.signals, self.proposals = list(context), [], [], []
        self._restart(kept)

    def forget(self) -> None:
        """Drops every kept state: a step that raised midway may have left a model cache half-written."""
        self.tokens = []
        self.start(())

    @property
    def known_features(self) -> int:
        """Leading context positions whose target features the drafter holds (what the server need not send)."""
        return 0

    def draft_one(self) -> int | None:
        """Proposes the token after the pending drafts, or None when the drafter cannot yet."""
        out = self._next_logits()
        if out is None:
            return None
        logits, vocab_ids = out
        signals, best = signals_of(logits, vocab_ids)
        copied = self._copied(signals.top1)
        proposal = None
        if copied is not None:
            token, signals = copied[0], replace(signals, lookup=True, suffix=copied[1])
        else:
            token, proposal = self._pick(logits, vocab_ids)
        if best:
            signals = replace(signals, runner_up=best[1] if best[0] == token else best[0])
        self.pending.append(token)
        self.signals.append(signals)
        self.proposals.append(proposal)
        return token

    def draft(self, n: int) -> list[int]:
        """Proposes up to ``n`` more tokens (fewer only when the drafter cannot draft yet)."""
        drafted: list[int] = []
        while len(drafted) < n and (token := self.draft_one()) is not None:
            drafted.append(token)
        return drafted

    def branch(self, count: int) -> tuple[list[int], list[DraftSignals]] | None:
        """A server-paced session's second guess: the first pending draft's runner-up, then up to ``count`` - 1
        drafts after it, with their signals; the drafter's own state is as it was. None where there is none (no
        pending draft, a copied one's source had no runner-up, or a sampled session: its drafts must be drawn
        from the q they are sent with, and the runner-up is not)."""
        if not self.sampling.greedy or not self.pending or self.signals[0].runner_up is None:
            return None
        first = self.signals[0]
        saved = self.pending, self.signals, self.proposals, self._save()
        self.pending = [first.runner_up]
        self.signals = [runner_up_signals(first)]
        self.proposals = [None]
        try:
            self._sync(None)  # the model state past the committed text is the main chain's
            self.draft(count - 1)
            return self.pending, self.signals
        finally:
            self.pending, self.signals, self.proposals, state = saved
            self._load(state)

    def commit(self, num_accepted: int, next_token: int | None, features: torch.Tensor | None = None) -> None:
        """Applies a verdict on the leading pending drafts; ``features`` start at the first uncomputed position."""
        rest = self.pending[num_accepted:]
        self.tokens += self.pending[:num_accepted]
        kept = 0
        if next_token is not None:
            self.tokens.append(next_token)
            if rest and rest[0] == next_token:
                kept = len(rest) - 1
        self.pending, self.signals = rest[len(rest) - kept :], self.signals[len(self.signals) - kept :]
        self.proposals = self.proposals[len(self.proposals) - kept :]
        self._sync(features)

    def advance(self, tokens: Sequence[int], features: torch.Tensor | None = None) -> None:
        """Commits ``tokens``, the target's, whatever drafts they came from (a server-paced verdict): pending
        drafts survive as far as they match them. ``features`` as for `commit`, after the last token."""
        for i, token in enumerate(tokens):
            self.commit(0, token, features if i == len(tokens) - 1 else None)

    def _copied(self, top1: float) -> tuple[int, float] | None:
        """A token copied from earlier text instead of a draft with top-1 probability ``top1``, and the suffix
        index's probability for it (0: the prompt lookup's). The suffix index goes first, where it is surer than
        the draft; the prompt lookup then where the draft is unsure."""
        if self.suffix is not None:
            proposed = self.suffix.propose(self.tokens, self.pending)
            if proposed is not None and proposed[1] > top1:
                return proposed
        token = None if self.lookup is None else self.lookup.override(top1, self.tokens + self.pending)
        return None if token is None else (token, 0.0)

    def _pick(self, logits: torch.Tensor, vocab_ids: torch.Tensor | None) -> tuple[int, DraftDistribution | None]:
        """The draft token and the q it was sampled from (None: greedy, or a point mass is sent)."""
        if self.sampling.greedy:
            index = int(logits.argmax())
            return (index if vocab_ids is None else int(vocab_ids[index])), None
        probs = target_distribution(logits, self.sampling)
        if not self.draft_probabilities:
            index = int(torch.multinomial(probs, 1, generator=self.generator))
            return (index if vocab_ids is None else int(vocab_ids[index])), None
        top = probs.topk(min(PROPOSAL_TOKENS, probs.numel()))
        kept = top.values > 0
        q, indices = top.values[kept], top.indices[kept]
        q = q / q.sum()  # float32: exactly what is sent, and the server divides by the sum too
        token_ids = indices if vocab_ids is None else vocab_ids[indices]
        choice = int(torch.multinomial(q, 1, generator=self.generator))
        return int(token_ids[choice]), DraftDistribution(tuple(token_ids.tolist()), tuple(q.tolist()))

    @abstractmethod
    def _restart(self, kept: int) -> None:
        """A new session starts whose first ``kept`` committed tokens are the last one's: forgets the model
        state of the others."""

    def _save(self) -> object:
        """Model state that `branch` must give back (None: rebuilding it from the pending drafts is cheap)."""
        return None

    def _load(self, state: object) -> None:
        """Gives back what `_save` returned; by default drops the branch's model state past the committed text."""
        self._sync(None)

    @abstractmethod
    def _next_logits(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Logits for the token after ``tokens + pending``, and the vocabulary ids of their entries (None: all)."""

    @abstractmethod
    def _sync(self, features: torch.Tensor | None) -> None:
        """Drops model state that the verdict made invalid; takes the verdict's target features."""


class ModelDrafter(Drafter):
    """A standalone causal LM; its KV cache keeps the longest prefix still valid."""

    def __init__(
        self,
        model: PreTrainedModel,
        sampling: SamplingParams = SamplingParams(),
        lookup: PromptLookup | None = None,
        suffix: SuffixDecoder | None = None,
        draft_probabilities: bool = True,
    ):
        device = next(model.parameters()).device
        super().__init__(sampling, device, lookup, suffix, draft_probabilities)
        self.model = model
        self.device = device
        self._cache = DynamicCache()
        self._cached: list[int] = []  # the tokens whose KV is in the cache

    @torch.inference_mode()
    def _next_logits(self) -> tuple[torch.Tensor, None]:
        sequence = self.tokens + self.pending
        if len(self._cached) == len(sequence):  # the last token's logits are needed again
            self._crop(len(sequence) - 1)
        feed = sequence[len(self._cached) :]
        logits = self.model(
            input_ids=torch.tensor([feed], device=self.device), past_key_values=self._cache, use_cache=True
        ).logits[0, -1]
        self._cached = sequence
        return logits, None

    def _restart(self, kept: int) -> None:
        self._sync(None)  # keeps the KV of the longest cached prefix of the new context

    def _sync(self, features: torch.Tensor | None) -> None:
        self._crop(shared_prefix(self._cached, self.tokens + self.pending))

    def _crop(self, length: int) -> None:
        crop_cache(self._cache, length)
        self._cached = self._cached[:length]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keeps the first ``length`` positions of every layer, also of layers a failed step left longer than others.
    (`crop` now takes how many to remove; its old form, the length to keep, is deprecated and could never crop to
    zero.)"""
    for layer in cache.layers:
        layer.crop(min(0, length - layer.get_seq_length()))


class CopyDrafter(Drafter):
    """No model: drafts only what the prompt lookup or the suffix index copies from earlier text, and nothing
    where they have nothing. What those sources are worth on their own (benchmarks)."""

    def draft_one(self) -> int | None:
        copied = self._copied(0.0)
        if copied is None:
            return None
        token, probability = copied
        # A suffix token carries its estimated probability as its confidence; a lookup token makes no estimate.
        confidence = probability or 1.0
        self.pending.append(token)
        self.signals.append(DraftSignals(confidence, 0.0, confidence, lookup=True, suffix=probability))
        self.proposals.append(None)
        return token

    def _restart(self, kept: int) -> None:
        """No model state."""

    def _next_logits(self) -> None:
        return None

    def _sync(self, features: torch.Tensor | None) -> None:
        """No model state."""
