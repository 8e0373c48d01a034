"""`PromptLookup`: propose the token that followed the context's last few tokens where they occurred before.

Answers repeat their question and themselves (names, quoted phrases, list
patterns, code identifiers), and a small draft misses many such copies.
Prompt lookup decoding (Saxena, 2023) and LLMA (Yang et al., arXiv
2304.04487) draft them by matching the context's last n tokens against
earlier text. Here the lookup only overrides the draft where the draft is
unsure (its top-1 probability is below ``below``), so confident draft tokens
stay. Either way the target verifies every token: output is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wisp_common.config import EdgeConfig


@dataclass(frozen=True)
class PromptLookup:
    max_ngram: int  # the longest suffix, tried first: longer matches are right more often
    below: float  # override only drafts whose top-1 probability is below this
    min_ngram: int = 2  # a single token's earlier successor is right less often than the draft

    @classmethod
    def of(cls, config: EdgeConfig) -> PromptLookup | None:
        """The edge configuration's lookup; None where it is off."""
        return cls(config.lookup_ngram, config.lookup_below) if config.lookup_ngram else None

    def override(self, top1: float, tokens: Sequence[int]) -> int | None:
        """The token to propose instead of a draft whose top-1 probability is ``top1``, if any."""
        return self.propose(tokens) if top1 < self.below else None

    def propose(self, tokens: Sequence[int]) -> int | None:
        """The token after the latest earlier occurrence of the longest matching suffix, if any."""
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            key, last = list(tokens[-n:]), tokens[-1]
            for end in range(len(tokens) - 2, n - 2, -1):  # `end`: where an earlier copy of the suffix ends
                if tokens[end] == last and list(tokens[end - n + 1 : end + 1]) == key:
                    return tokens[end + 1]
        return None
