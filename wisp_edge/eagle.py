"""`EagleDrafter`: drafts from the target's features (the model and its format: `wisp_common.eagle`)."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from wisp_common.eagle import EagleDraftModel
from wisp_common.request import SamplingParams
from wisp_edge.drafter import Drafter, crop_cache
from wisp_edge.lookup import PromptLookup
from wisp_edge.suffix import SuffixDecoder


class EagleDrafter(Drafter):
    """Drafts from the target's features: none before the first verdict brings them.

    Cache entry i holds the pair (feature at i, token at i+1). Entries built
    from the target's real features stay valid for the whole session, and
    for the next one as far as its context begins the same (a conversation's
    next turn: the server then need not send them again); those
    built from the draft's own predictions are dropped at each verdict and
    rebuilt lazily from the real features that came with it.
    """

    wants_features = True

    def __init__(
        self,
        model: EagleDraftModel,
        sampling: SamplingParams = SamplingParams(),
        lookup: PromptLookup | None = None,
        suffix: SuffixDecoder | None = None,
        draft_probabilities: bool = True,
    ):
        self.device = model.head.device
        super().__init__(sampling, self.device, lookup, suffix, draft_probabilities)
        self.model = model
        self.feature_layers = model.feature_layers
        self._features = torch.empty(0, model.feature_width, device=self.device)  # real, positions 0..n-1
        self._cache = DynamicCache()
        self._real_entries = 0  # leading cache entries built from real features
        self._entries = 0
        self._last: torch.Tensor | None = None  # (predicted feature, logits) of the newest entry

    def _restart(self, kept: int) -> None:
        # The feature at position i depends on tokens 0..i; entry i also on token i+1.
        self._features = self._features[:kept]
        self._real_entries = self._entries = max(0, min(self._real_entries, kept - 1))
        crop_cache(self._cache, self._entries)
        self._last = None

    @property
    def known_features(self) -> int:
        return len(self._features)

    def _sync(self, features: torch.Tensor | None) -> None:
        if features is not None and len(features):
            start = len(self.tokens) - 1 - len(features)  # they end just before the newest committed token
            if not 0 <= start <= len(self._features):
                raise ValueError(f"features for positions {start}.. do not follow the {len(self._features)} known")
            if features.shape[1] != self.model.feature_width:  # a server from before OpenSession.feature_layers
                raise ValueError(
                    f"the server sent features {features.shape[1]} wide where this draft reads "
                    f"{self.model.feature_width} (its feature layers {list(self.feature_layers)}): upgrade the server"
                )
            self._features = torch.cat([self._features[:start], features.to(self._features)])
        if self._entries > self._real_entries:
            crop_cache(self._cache, self._real_entries)
            self._entries, self._last = self._real_entries, None

    def _save(self) -> object:
        """The cache entries built from the draft's own predictions are rebuilt one draft step each: copied
        instead (two small layers' keys and values)."""
        return copy.deepcopy(self._cache), self._real_entries, self._entries, self._last

    def _load(self, state: object) -> None:
        self._cache, self._real_entries, self._entries, self._last = state

    @torch.inference_mode()
    def _next_logits(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        sequence = self.tokens + self.pending
        real = min(len(self._features), len(sequence) - 1)
        if real == 0 or real < len(self.tokens) - 1:
            # Nothing to condition on before the first verdict, or committed positions without features yet (a
            # next turn's new tokens): the verdict brings them, faster than drafting through them one by one.
            return None
        if self._last is None or self._real_entries < real:  # entries from the real features, in one pass
            start = min(self._real_entries, real - 1)
            crop_cache(self._cache, start)
            self._step(self._features[start:real], sequence[start + 1 : real + 1], start)
            self._real_entries = self._entries = real
        while self._entries < len(sequence) - 1:  # then the draft's own predictions, one token at a time
            assert self._last is not None
            self._step(self._last[0][None], [sequence[self._entries + 1]], self._entries)
            self._entries += 1
        assert self._last is not None
        return self._last[1], self.model.head_ids

    def _step(self, features: torch.Tensor, tokens: list[int], start: int) -> None:
        positions = torch.arange(start, start + len(tokens), device=self.device)[None]
        token_ids = torch.tensor([tokens], device=self.device)
        predicted, logits = self.model(features[None], token_ids, self._cache, positions)
        self._last = (predicted[0, -1], logits[0, -1])
