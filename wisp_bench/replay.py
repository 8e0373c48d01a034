"""Replayed devices: what the real draft would propose, recorded once along the target's answers, replayed later.

In greedy decoding the committed text is the target's own answer, whatever the drafts. So the draft's
proposals can be recorded once along that answer: for every point of it, the chain of tokens (and the
signals the speculation controller reads) that the real drafter, the edge's prompt lookup included, drafts
right after a verdict has committed the answer up to there. A `ReplayDrafter` then plays the chain of the
point its session has reached, taking the device profile's time per token, instead of running a model on
the server's cores. Everything else on the device is the real edge: `EdgeClient`, the controller and its
pipelining.

Exact where the real drafter's proposals depend only on the committed context, which they do for the
feature-conditioned draft: after every verdict it keeps only the entries built from the target's features.
One approximation remains: drafts pipelined past a verdict and kept are followed by the chain of the new
point, not by what the real drafter would draft on top of those kept drafts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wisp_common.request import SamplingParams
from wisp_edge.drafter import Drafter, DraftSignals, runner_up_signals

log = logging.getLogger(__name__)


@dataclass
class Recording:
    """A prompt, the target's greedy answer to it, and the drafter's chain after each committed answer prefix.

    ``answer`` runs past the end-of-sequence token (as if EOS were ignored), so that drafts verified at the
    very end have a recorded target token too. ``chains[i]`` are the drafts (token, signals) proposed once
    ``prompt + answer[:i]`` is committed; the first is empty for a draft that needs the target's features.
    """

    prompt: list[int]
    answer: list[int]
    chains: list[list[tuple[int, DraftSignals]]]

    def to_json(self) -> dict:
        chains = [[[token, asdict(signals)] for token, signals in chain] for chain in self.chains]
        return {"prompt": self.prompt, "answer": self.answer, "chains": chains}

    @classmethod
    def from_json(cls, record: dict) -> Recording:
        chains = [[(token, DraftSignals(**signals)) for token, signals in chain] for chain in record["chains"]]
        return cls(record["prompt"], record["answer"], chains)


def record_chains(make_drafter, prompt: Sequence[int], answer: Sequence[int], features: torch.Tensor, depth: int):
    """The drafter's chain of ``depth`` drafts after each prefix of ``answer``, walking the answer one token at a
    time as verdicts would commit it, with the target's ``features`` (one row per position of prompt + answer,
    but the last) arriving as the server sends them."""
    drafter: Drafter = make_drafter()
    drafter.start(prompt)
    chains = []
    for i, token in enumerate(answer):
        drafter.draft(depth)
        chains.append(list(zip(drafter.pending, drafter.signals)))
        # The verdict commits `token`; it brings the features of every position computed so far but the newest.
        rows = features[: len(prompt)] if i == 0 else features[len(prompt) + i - 1 : len(prompt) + i]
        drafter.commit(0, token, rows.float())
    return chains


def synthetic_recordings(recordings: Sequence[Recording], accuracy: float, seed: int, depth: int) -> list[Recording]:
    """A what-if draft in place of the recorded one (`wisp-bench run --draft-accuracy`): at each position of an
    answer it proposes the target's token with probability ``accuracy``, independently (seeded), else a wrong one,
    whatever context it drafts from; so a round of n drafts commits 1 + a + ... + a^n tokens on average. Its
    signals are those of a calibrated draft that knows only its average: ``accuracy`` on its pick, the rest spread
    evenly over others, none likelier than it from 1% up; no runner-up (no second guesses). For planning what a
    better draft would buy, never for the draft's own figures. Its chains are built as `record_chains` builds the
    real one's: ``depth`` new drafts at each point, after those of the point before that the answer's token there
    kept."""
    others = max(3, math.ceil((1.0 - accuracy) / max(accuracy, 0.01)))
    rest = (1.0 - accuracy) / others
    entropy = -sum(p * math.log(p) for p in (accuracy, *[rest] * others) if p > 0)
    signals = DraftSignals(top1=accuracy, entropy=entropy, margin=max(0.0, accuracy - rest))
    synthetic = []
    for index, recording in enumerate(recordings):
        rng = random.Random(f"{seed}:{index}")
        answer = recording.answer
        drafted = [t if rng.random() < accuracy else (t - 1 if t > 0 else 1) for t in answer]
        lengths, kept = [], 0
        for i, chain in enumerate(recording.chains):
            length = 0 if not chain else kept + depth  # none before the first verdict's features, as recorded
            lengths.append(min(length, len(answer) - i))
            kept = length - 1 if length and drafted[i] == answer[i] else 0
        chains = [[(drafted[i + j], signals) for j in range(n)] for i, n in enumerate(lengths)]
        synthetic.append(Recording(recording.prompt, answer, chains))
    return synthetic


def recording_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_recordings(path: Path, recordings: list[Recording], settings: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "recordings": [r.to_json() for r in recordings]}
    path.with_suffix(".tmp").write_text(json.dumps(payload))
    path.with_suffix(".tmp").replace(path)


def load_recordings(path: Path) -> list[Recording]:
    return [Recording.from_json(r) for r in json.loads(path.read_text())["recordings"]]


def write_answers(path: Path, recordings: list[Recording]) -> None:
    """The target's recorded answers in the modeled engine's format (one JSON line per prompt)."""
    lines = (json.dumps({"prompt_token_ids": r.prompt, "answer_token_ids": r.answer}) for r in recordings)
    path.write_text("".join(line + "\n" for line in lines))


class ReplayDrafter(Drafter):
    """Plays the recorded chain of the point its session has reached, at ``seconds_per_token`` per draft.

    A drafting step takes the device's time even where the real drafter would be faster or slower here:
    the profile, not this machine, sets the pace. It sleeps until its own clock's next free moment, so
    short oversleeps do not add up.
    """

    def __init__(self, recordings: Sequence[Recording], seconds_per_token: float):
        super().__init__(SamplingParams())
        self._by_prompt = {tuple(r.prompt): r for r in recordings}
        self.seconds_per_token = seconds_per_token
        self._recording: Recording | None = None
        self._busy_until = 0.0

    def start(self, context: Sequence[int]) -> None:
        recording = self._by_prompt.get(tuple(context))
        if recording is None:
            raise KeyError("no recording for this prompt: record the workload first (wisp-bench record)")
        self._recording = recording
        super().start(context)

    def draft_one(self) -> int | None:
        chain = self._chain(0)
        if len(self.pending) >= len(chain):
            return None
        self._spend(1)
        token, signals = chain[len(self.pending)]
        self.pending.append(token)
        self.signals.append(signals)
        return token

    def branch(self, count: int) -> tuple[list[int], list[DraftSignals]] | None:
        """The recorded runner-up, then the chain recorded one point on. That chain followed the target's token
        there, so it is the branch's own only where the runner-up is that token: where the branch can fit at all.
        (It was drafted with the target's feature of the runner-up's position, which a real branch predicts.)"""
        if not self.pending or self.signals[0].runner_up is None:
            return None
        first = self.signals[0]
        after = self._chain(1)[: count - 1]
        self._spend(len(after))
        return [first.runner_up, *(t for t, _ in after)], [runner_up_signals(first), *(s for _, s in after)]

    def _chain(self, ahead: int) -> list[tuple[int, DraftSignals]]:
        """The chain recorded ``ahead`` points past the one the session has reached."""
        assert self._recording is not None
        point = len(self.tokens) - len(self._recording.prompt) + ahead
        chains = self._recording.chains
        return chains[point] if point < len(chains) else []

    def _spend(self, tokens: int) -> None:
        """Takes the device's time for ``tokens`` drafting steps."""
        self._busy_until = max(time.monotonic(), self._busy_until) + tokens * self.seconds_per_token
        while (left := self._busy_until - time.monotonic()) > 0:
            time.sleep(left)

    def _restart(self, kept: int) -> None:
        self._busy_until = 0.0

    def _next_logits(self):  # never called: `draft_one` replays instead of computing
        raise NotImplementedError

    def _sync(self, features: torch.Tensor | None) -> None:
        """Nothing to drop: the next chain is chosen by the point the session has reached."""
