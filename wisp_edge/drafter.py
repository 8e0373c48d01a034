"""`Drafter`: the edge's small model, proposing tokens with a KV cache that rolls back.

The drafter mirrors the session's committed context. Drafting extends its KV
cache speculatively; when the verdict arrives, `commit` crops the cache back
to the accepted prefix and queues the server's token, so the next draft
continues from exactly what the target committed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from wisp_common.request import SamplingParams
from wisp_common.verification import target_distribution


class Drafter:
    def __init__(self, model: PreTrainedModel, sampling: SamplingParams = SamplingParams()):
        self.model = model
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if sampling.seed:
            self.generator.manual_seed(sampling.seed)
        self.tokens: list[int] = []
        self._cache = DynamicCache()

    def start(self, context: Sequence[int]) -> None:
        """Begins a new session whose committed context is ``context``."""
        self.tokens = list(context)
        self._cache = DynamicCache()

    @torch.inference_mode()
    def draft(self, n: int) -> list[int]:
        """Proposes ``n`` tokens after the committed context."""
        drafts: list[int] = []
        if n <= 0:
            return drafts
        feed = self.tokens[self._cache.get_seq_length() :]
        for _ in range(n):
            logits = self.model(
                input_ids=torch.tensor([feed], device=self.device),
                past_key_values=self._cache,
                use_cache=True,
            ).logits[0, -1]
            drafts.append(self._pick(logits))
            feed = drafts[-1:]
        return drafts

    def commit(self, drafts: Sequence[int], num_accepted: int, next_token: int | None) -> None:
        """Applies a verdict: keep the accepted drafts, drop the rest, append the server's token."""
        accepted = list(drafts[:num_accepted])
        excess = self._cache.get_seq_length() - (len(self.tokens) + num_accepted)
        if excess > 0:
            self._cache.crop(-excess)
        self.tokens += accepted + ([] if next_token is None else [next_token])

    def _pick(self, logits: torch.Tensor) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        probs = target_distribution(logits, self.sampling)
        return int(torch.multinomial(probs, 1, generator=self.generator))
