"""The goodput-optimal speculation length: how many drafts a session's next round should carry at this load.

Drafts cost verification compute. While a batch is bound by reading the weights (a GPU at small batches),
the extra tokens are nearly free and longer rounds commit more per step; once it is bound by compute (large
batches, and always on a CPU), a draft that is likely rejected lowers everyone's throughput. SmartSpec
(Liu et al., arXiv 2406.14066) chooses the length per step to maximize goodput, the tokens committed per
second of batch time. Here each session's length is chosen against the rest of the batch it will join, from
the `VerificationTimeEstimator` (what the engine really pays) and the session's own acceptance so far, down
to zero drafts when no draft pays. The edge's adaptive controller never drafts past it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from wisp_server.estimator import SequenceShape, VerificationTimeEstimator, features, sequence_features


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Tokens a round of ``drafts`` drafts commits: the correction or bonus, plus each draft reached and accepted
    (1 + a + a^2 + ... + a^drafts, drafts accepted independently with probability a)."""
    if acceptance >= 1.0:
        return drafts + 1.0
    return (1.0 - acceptance ** (drafts + 1)) / (1.0 - acceptance)


def goodput_optimal_drafts(
    acceptance: float,
    context_tokens: int,
    max_drafts: int,
    others_tokens: float,
    batch_seconds: Callable[[SequenceShape], float],
) -> int:
    """The number of drafts, 0 to ``max_drafts``, that maximizes the batch's committed tokens per second.

    The rest of the batch this round is expected to join commits ``others_tokens``; ``batch_seconds`` is the
    estimated time of that batch with this session's round of the given shape added. Ties go to fewer drafts.
    """
    best, best_goodput = 0, -1.0
    for drafts in range(max_drafts + 1):
        seconds = batch_seconds(SequenceShape(context_tokens, 1 + drafts))
        if seconds <= 0:  # nothing is known about the engine's costs yet: no reason to hold drafts back
            return max_drafts
        goodput = (others_tokens + expected_tokens(acceptance, drafts)) / seconds
        if goodput > best_goodput * (1 + 1e-9):
            best, best_goodput = drafts, goodput
    return best


@dataclass(frozen=True)
class NextRound:
    """A session's next round as its last hint sized it: what `Load` reads of each open session."""

    session_id: str
    shape: SequenceShape
    tokens: float  # what the round is expected to commit


@dataclass(frozen=True)
class Load:
    """Every open session's next round, as the verdicts of one batch see them (`of`, once per batch).

    A session's hint weighs its round against the rest of the batch it will join. Walking every other session
    for every verdict made the hints a third of the server's own time per round at 32 sessions; from this
    snapshot a hint costs the same whatever the number of sessions: the rest is the total less the session."""

    shapes: dict[str, SequenceShape]  # by session id: its next round, as its last hint sized it
    tokens: dict[str, float]  # by session id: what that round is expected to commit
    total: np.ndarray  # `features` of all the shapes, the launch term included
    total_tokens: float

    @classmethod
    def of(cls, rounds: Iterable[NextRound]) -> Load:
        rounds = list(rounds)
        shapes = {r.session_id: r.shape for r in rounds}
        tokens = {r.session_id: r.tokens for r in rounds}
        return cls(shapes, tokens, features(list(shapes.values())), sum(tokens.values()))

    def others(
        self, session_id: str, estimator: VerificationTimeEstimator, room: int
    ) -> tuple[float, Callable[[SequenceShape], float]]:
        """For a session's hint: the tokens the rest of its batch commits, and the batch's estimated seconds with
        the session's round of a given shape added. The rest is at most ``room`` sessions (the batch limit less
        one); where more are open, a typical ``room`` of them: the totals scaled down."""
        count = len(self.shapes) - (session_id in self.shapes)
        scale = min(1.0, room / count) if count else 0.0
        if estimator.padded:  # its cost follows the widest sequence, not a sum: measured per candidate
            rest = [shape for sid, shape in self.shapes.items() if sid != session_id][:room]
            return (self.total_tokens - self.tokens.get(session_id, 0.0)) * scale, estimator.with_others(rest)
        own = self.shapes.get(session_id)
        rest = self.total - (sequence_features(own) if own is not None else 0.0)
        rest[1:] *= scale
        return (self.total_tokens - self.tokens.get(session_id, 0.0)) * scale, estimator.with_features(rest)
