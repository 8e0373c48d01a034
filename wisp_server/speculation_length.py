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

from collections.abc import Callable

from wisp_server.estimator import SequenceShape


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
