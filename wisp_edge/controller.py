"""`SpeculationController`: decides, token by token, when the edge stops drafting and sends (WISP §4).

Every draft token after the first one the target rejects is wasted work,
and a longer round also keeps the device waiting longer for its verdict.
The controller reads the draft's signals for each token it drafts (top-1
probability, entropy, top-1/top-2 margin, position in the round, whether
it was copied from earlier text, and the suffix index's own estimate where
that proposed it), and an `AcceptancePredictor`, a logistic
model, turns them into the chance that the target accepts that token.
A draft is sent while the chance that the whole run up to it is accepted
stays at least ``min_run_probability`` (the first draft always goes: its
verdict keeps the predictor learning). The next token is drafted only if it
pays for its drafting time, judged before it is drafted, as likely as the
last one was at its position:

* its run would stay at least ``min_run_probability`` (a token drafted only
  to be held back costs the round its whole drafting time), and
* the tokens it is expected to add per second of drafting beat the round's
  rate so far: expected committed tokens over the round's time, counting the
  measured round trip and the server's hints for queueing and verification.
  This is the length that minimizes the session's time per token; a fixed
  length is as good only where it happens to be that length, and it differs
  with the device, the load and the text;

and never more than ``max_drafts`` (or the server's goodput-optimal length).

The predictor is fitted from logged verdicts (`wisp-edge calibrate`), saved
as ``controller.json`` beside the draft, and keeps adapting online: each
verdict labels the tokens up to and including the first rejection, and each
label moves the weights one small gradient step.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wisp_edge.drafter import DraftSignals

PREDICTOR_FILE = "controller.json"
FEATURES = "bias top1 entropy margin position/8 lookup suffix"


def predictor_features(signals: DraftSignals, position: int) -> np.ndarray:
    """The model's inputs: a bias, the draft's confidence, how deep into the round the token is, whether it was
    copied (prompt lookup or suffix index), and the suffix index's probability for it (0 where it did not
    propose it). A predictor fitted before a feature existed reads it with weight 0: the shipped one learns the
    suffix weight online, and `wisp-edge calibrate` fits it."""
    return np.array(
        [1.0, signals.top1, signals.entropy, signals.margin, position / 8.0, float(signals.lookup), signals.suffix]
    )


def verdict_labels(signals: Sequence[DraftSignals], num_sent: int, num_accepted: int):
    """What a verdict teaches: (signals, position, accepted) for each draft up to and including the first rejection.

    Drafts after the first rejection were never verified, so they carry no label.
    """
    return [(signals[p], p, p < num_accepted) for p in range(min(num_sent, num_accepted + 1))]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, x))))


@dataclass
class AcceptancePredictor:
    """P(target accepts a draft token | the draft's signals): logistic regression."""

    # Before any data: the draft's own top-1 probability, roughly calibrated.
    weights: np.ndarray = field(default_factory=lambda: np.array([-2.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    learning_rate: float = 0.05  # online step size

    def probability(self, signals: DraftSignals, position: int) -> float:
        return _sigmoid(float(self.weights @ predictor_features(signals, position)))

    def update(self, signals: DraftSignals, position: int, accepted: bool) -> None:
        """One online gradient step on the log loss."""
        x = predictor_features(signals, position)
        self.weights += self.learning_rate * (float(accepted) - _sigmoid(float(self.weights @ x))) * x

    @classmethod
    def fit(cls, rows: Sequence[tuple[DraftSignals, int, bool]], l2: float = 1e-3, iterations: int = 50):
        """Maximum likelihood by Newton's method (IRLS) on (signals, position, accepted) rows."""
        x = np.stack([predictor_features(s, p) for s, p, _ in rows])
        y = np.array([float(a) for _, _, a in rows])
        w = np.zeros(x.shape[1])
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
            gradient = x.T @ (p - y) + l2 * w
            hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(w)

    def log_loss(self, rows: Sequence[tuple[DraftSignals, int, bool]]) -> float:
        probabilities = [self.probability(s, p) if a else 1 - self.probability(s, p) for s, p, a in rows]
        return -float(np.mean(np.log(np.array(probabilities) + 1e-9)))

    def save(self, path: str | Path) -> None:
        record = {"features": FEATURES, "weights": self.weights.tolist()}
        Path(path).write_text(json.dumps(record) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AcceptancePredictor:
        """A predictor fitted before the lookup or suffix features existed reads them with weight 0, as it was
        fitted."""
        weights = json.loads(Path(path).read_text())["weights"]
        return cls(np.array(weights + [0.0] * (len(FEATURES.split()) - len(weights)), dtype=float))

    @classmethod
    def beside(cls, model_path: str) -> AcceptancePredictor:
        """The predictor fitted for a draft, if one was saved in its directory, else the prior."""
        path = Path(model_path) / PREDICTOR_FILE
        return cls.load(path) if path.is_file() else cls()


@dataclass
class RoundTiming:
    """What a round costs besides drafting, in seconds: what decides whether one more draft pays for its time."""

    rtt: float = 0.0  # measured network round trip
    queue: float = 0.0  # the server's hint: waiting for a batch
    verify: float = 0.0  # the server's hint: verification
    draft_token: float = 0.0  # measured drafting time per token
    suggested_drafts: int | None = None  # the server's hint: the goodput-optimal drafts at its load (None: no hint)


class SpeculationController(ABC):
    """How many tokens a session's round drafts. Two named modes implement it: `AdaptiveSpeculation` (WISP) and
    `FixedLength` (SLED). A `SpeculationMode` makes one per session, for that session's cap on drafts per round."""

    def __init__(self, max_drafts: int):
        self.max_drafts = max_drafts

    @abstractmethod
    def round_length(self, signals: Sequence[DraftSignals], timing: RoundTiming, can_draft_more: bool) -> int | None:
        """How many of the drafts with ``signals`` to send now; None asks for one more draft first."""

    @abstractmethod
    def keeps_pipelining(self, signals: Sequence[DraftSignals]) -> bool:
        """Whether to draft one more token while the round of ``signals`` (and the ones after it) is out."""

    @abstractmethod
    def observe(self, signals: Sequence[DraftSignals], num_sent: int, num_accepted: int) -> None:
        """Learns from a verdict: the drafts sent with ``signals``, how many went and how many were accepted."""


SpeculationMode = Callable[[int], SpeculationController]  # max drafts per round -> a session's controller


class FixedLength(SpeculationController):
    """SLED: every round drafts ``max_drafts`` tokens, whatever the draft's confidence, and pipelines regardless."""

    def round_length(self, signals: Sequence[DraftSignals], timing: RoundTiming, can_draft_more: bool) -> int | None:
        return None if len(signals) < self.max_drafts and can_draft_more else min(len(signals), self.max_drafts)

    def keeps_pipelining(self, signals: Sequence[DraftSignals]) -> bool:
        return True

    def observe(self, signals: Sequence[DraftSignals], num_sent: int, num_accepted: int) -> None:
        """A fixed length has nothing to learn."""


class AdaptiveSpeculation(SpeculationController):
    """WISP: the acceptance predictor and what the round costs decide where each round stops."""

    def __init__(
        self,
        max_drafts: int,
        predictor: AcceptancePredictor,
        min_run_probability: float = 0.25,
        adapt_online: bool = True,
    ):
        super().__init__(max_drafts)
        self.predictor = predictor
        self.min_run_probability = min_run_probability
        self.adapt_online = adapt_online

    @classmethod
    def mode_with(cls, predictor: AcceptancePredictor, min_run_probability: float = 0.25) -> SpeculationMode:
        """The adaptive mode for an edge: its sessions share ``predictor``, so what one learns serves the next."""
        return lambda max_drafts: cls(max_drafts, predictor, min_run_probability)

    def round_length(self, signals: Sequence[DraftSignals], timing: RoundTiming, can_draft_more: bool) -> int | None:
        """Never past the server's goodput-optimal length: at its load, more drafts would lower everyone's
        throughput (0: the round goes without drafts)."""
        cap = self.max_drafts if timing.suggested_drafts is None else min(self.max_drafts, timing.suggested_drafts)
        if cap == 0:
            return 0
        run, expected = 1.0, 1.0  # chance that every draft so far is accepted; tokens the round commits
        for position, s in enumerate(signals[:cap]):
            p = self.predictor.probability(s, position)
            # The first draft always goes: its verdict is what keeps the predictor learning. Drafts that
            # exist already (pipelined while the last round was out) cost no more time, so only the
            # chance of the run decides whether they go.
            if position > 0 and run * p < self.min_run_probability:
                return position
            run *= p
            expected += run
        length = min(len(signals), cap)
        if length == cap or not can_draft_more or (length and not self._pays_to_draft(signals, run, expected, timing)):
            return length
        return None

    def keeps_pipelining(self, signals: Sequence[DraftSignals]) -> bool:
        """A pipelined draft is kept only if every draft before it is accepted, and a draft step still running
        when the verdict arrives delays the next round. So, as in the foreground, pipelining goes on only
        while the run drafted so far stays likely."""
        run = math.prod(self.predictor.probability(s, position) for position, s in enumerate(signals))
        return run >= self.min_run_probability

    def _pays_to_draft(self, signals: Sequence[DraftSignals], run: float, expected: float, timing: RoundTiming) -> bool:
        """Whether drafting one more token after ``signals`` (a run accepted with chance ``run``, a round expected
        to commit ``expected`` tokens) pays for its time.

        Its chance is taken as the last token's at the next position: confidence comes in stretches. Drafting it
        costs ``draft_token`` seconds and adds ``run * p`` tokens on average; it pays while that beats the
        round's committed tokens per second so far. Before the round's costs are known (the first verdict brings
        them), only the chance of its run decides.
        """
        length = len(signals)
        gain = run * self.predictor.probability(signals[-1], length)
        if gain < self.min_run_probability:
            return False
        round_seconds = timing.rtt + timing.queue + timing.verify + length * timing.draft_token
        if round_seconds <= 0 or timing.draft_token <= 0:
            return True
        return gain * round_seconds > expected * timing.draft_token

    def observe(self, signals: Sequence[DraftSignals], num_sent: int, num_accepted: int) -> None:
        """The accepted tokens, and the first rejected one, are labelled; each label is one online step."""
        if not self.adapt_online:
            return
        for row in verdict_labels(signals, num_sent, num_accepted):
            self.predictor.update(*row)
