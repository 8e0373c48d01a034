"""The `VerificationEngine` interface every target-model backend implements.

An engine keeps each session's KV cache resident between rounds. A round
hands it, per session, the drafts that follow the session's committed
context; the engine runs the target once over the whole batch, applies the
shared verification math, keeps the KV of the accepted prefix and drops the
rest. The token it returns is committed but not yet in the cache: it is fed
first in the session's next round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from wisp_common.request import SamplingParams
from wisp_common.verification import Verification


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    vocab_size: int
    eos_token_id: int | None
    tokenizer_fingerprint: str


@dataclass(frozen=True)
class RoundRequest:
    """Verify ``drafts`` after the session's committed context (empty: decode one token)."""

    session_id: str
    drafts: tuple[int, ...]


class EngineFull(Exception):
    """The engine cannot hold another session now (its KV cache is committed)."""


class VerificationEngine(ABC):
    name: str
    info: EngineInfo

    @abstractmethod
    def add_session(self, session_id: str, context: Sequence[int], sampling: SamplingParams, max_tokens: int) -> None:
        """Registers a session whose committed context (prompt and generated tokens) is ``context``.

        ``max_tokens`` bounds the session's context for its whole life; an engine
        with a bounded KV cache reserves room for it or raises `EngineFull`.
        """

    @abstractmethod
    def remove_session(self, session_id: str) -> None:
        """Frees the session's KV cache; unknown ids are ignored."""

    @abstractmethod
    def uncached_tokens(self, session_id: str) -> int:
        """Committed tokens not yet in the KV cache: what a round computes besides the drafts."""

    @abstractmethod
    def verify(self, batch: Sequence[RoundRequest]) -> list[Verification]:
        """Runs one batched verification step; results are in ``batch`` order."""
