"""The `VerificationEngine` interface every target-model backend implements.

An engine keeps each session's KV cache resident between rounds. A round
hands it, per session, the drafts that follow the session's committed
context; the engine runs the target once over the whole batch, applies the
shared verification math, keeps the KV of the accepted prefix and drops the
rest. The token it returns is committed but not yet in the cache: it is fed
first in the session's next round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wisp_common.request import SamplingParams
from wisp_common.verification import DraftDistribution, Verification


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    vocab_size: int
    eos_token_id: int | None
    tokenizer_fingerprint: str
    target_fingerprint: str = ""  # wisp_common.models.target_fingerprint; "" where there are no safetensors


@dataclass(frozen=True)
class RoundRequest:
    """Verify ``drafts`` after the session's committed context (empty: decode one token).

    ``proposals``: the distribution each draft was sampled from, for a sampled session (empty, or None for a
    draft: a point mass)."""

    session_id: str
    drafts: tuple[int, ...]
    proposals: tuple[DraftDistribution | None, ...] = ()


@dataclass(frozen=True)
class RoundVerdict(Verification):
    """A verified round, plus the target's features when the session asked for them.

    ``features`` holds the target's last hidden state (after the final norm,
    what the output head reads), followed in each row by the session's feature
    layers (`wisp_common.features.unit_rms` of their outputs), at each context
    position this round computed and committed, in order: the session's uncached context tokens, then the
    accepted drafts. A feature-conditioned (EAGLE-style) draft needs them.
    ``reused_tokens`` leading uncached context tokens were found in the
    engine's prefix cache: they were not computed and have no features.
    """

    features: torch.Tensor | None = None
    reused_tokens: int = 0


MAX_FEATURE_LAYERS = 4  # EAGLE-3 reads two below the top; each costs a verdict as much again as the top layer


def check_feature_layers(layers: Sequence[int], depth: int) -> None:
    """Raises ValueError unless ``layers`` are distinct decoder layers below the top one of a ``depth``-layer
    target (the top one's output, normed, is the feature itself)."""
    if len(layers) > MAX_FEATURE_LAYERS or len(set(layers)) != len(layers):
        raise ValueError(f"feature_layers {list(layers)}: at most {MAX_FEATURE_LAYERS} distinct decoder layers")
    if not all(0 <= layer < depth - 1 for layer in layers):
        raise ValueError(
            f"feature_layers {list(layers)}: the target's decoder layers below its top one are 0 to {depth - 2}"
        )


class EngineFull(Exception):
    """The engine cannot hold another session now (its KV cache is committed)."""


class EngineDead(Exception):
    """The engine cannot verify anything more: its core is left unusable (a dead vLLM engine core, a lost
    device). Unlike an ordinary failed batch, which fails only its own sessions, this ends the process so a
    supervisor restarts it."""


class VerificationEngine(ABC):
    name: str
    info: EngineInfo
    pads_batches: bool = False  # every sequence of a batch is computed as wide as the widest (the estimator's model)
    cost_settings: str = ""  # the engine's own settings a step's time depends on (a saved estimator fit's key)
    verifies_any_prompt: bool = True  # False: only prompts it knows, so the start-up profile of random ones cannot run

    @abstractmethod
    def add_session(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        features: bool = False,
        known_features: int = 0,
        feature_layers: tuple[int, ...] = (),
    ) -> None:
        """Registers a session whose committed context (prompt and generated tokens) is ``context``.

        ``max_tokens`` bounds the session's context for its whole life; an engine
        with a bounded KV cache reserves room for it or raises `EngineFull`.
        With ``features`` each of its verdicts carries the target's features, with
        the outputs of decoder ``feature_layers`` (0-based) beside them; the
        edge already has those of the first ``known_features`` positions, so an
        engine with a prefix cache may reuse at most those. A session this
        engine cannot serve raises ValueError.
        """

    def kv_cache_usage(self) -> float:
        """The share of a bounded KV cache the open sessions hold or have reserved, 0 to 1 (a new session that
        does not fit gets `EngineFull`); NaN for an engine whose cache has no bound."""
        return math.nan

    @abstractmethod
    def remove_session(self, session_id: str) -> None:
        """Frees the session's KV cache; unknown ids are ignored."""

    @abstractmethod
    def uncached_tokens(self, session_id: str) -> int:
        """Committed tokens not yet in the session's KV cache: what a round computes besides the drafts (of a
        first round, less what it finds in a prefix cache: `RoundVerdict.reused_tokens`)."""

    @abstractmethod
    def verify(self, batch: Sequence[RoundRequest]) -> list[RoundVerdict]:
        """Runs one batched verification step; results are in ``batch`` order."""
