"""`VerificationTimeEstimator`: predicts a batch's verification wall time from its composition.

WISP's scheduler needs to know, before launching a batch, whether it will
finish inside its members' deadlines. The cost of a verification step is
close to linear in a few counts (vLLM's and TGI's own schedulers reason in
the same terms): a fixed launch cost, a cost per sequence, per new token
(the weights are applied to every token), per new token times its context
(attention reads the KV of every earlier token), and per uncached prompt
token (prefill). The estimator fits those coefficients by least squares:
first from a short profile at start-up, then from every executed batch,
with older observations slowly forgotten so it follows the machine. The fit is
kept on disk (`fit_path`), so a server restarted on the same engine, target and
hardware starts from what the last one learnt instead of profiling again.

An engine that pads a batch to its widest sequence (the hf engine) pays for
every sequence as if it were that wide; the estimator then counts each one so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceShape:
    """One session's part of a batch."""

    context_tokens: int  # committed tokens whose KV is cached
    new_tokens: int  # tokens computed this round: uncached context plus drafts


FEATURES = ("launch", "sequences", "new_tokens", "attention", "prefill")
FIT_FORMAT = 1  # of a saved fit; a fit of another format is not read


def sequence_features(shape: SequenceShape, computed: SequenceShape | None = None) -> np.ndarray:
    """What one sequence adds to a batch's features (everything but the launch term).

    ``computed``: the shape the engine computes it at, when it pads the batch.
    """
    computed = computed or shape
    attention = computed.new_tokens * (computed.context_tokens + computed.new_tokens / 2) / 1000
    prefill = shape.new_tokens if shape.context_tokens == 0 else 0
    return np.array([0.0, 1.0, computed.new_tokens, attention, prefill])


def features(batch: Sequence[SequenceShape], padded: bool = False) -> np.ndarray:
    """A batch's features: the launch term plus each sequence's (`sequence_features`), summed in plain Python, since
    the scheduler and every verdict's hints ask for many small batches."""
    if not batch:
        return np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    prefill = sum(s.new_tokens for s in batch if s.context_tokens == 0)
    if padded:
        context, new = max(s.context_tokens for s in batch), max(s.new_tokens for s in batch)
        return np.array([1.0, len(batch), len(batch) * new, len(batch) * new * (context + new / 2) / 1000, prefill])
    new_tokens = sum(s.new_tokens for s in batch)
    attention = sum(s.new_tokens * (s.context_tokens + s.new_tokens / 2) for s in batch) / 1000
    return np.array([1.0, len(batch), new_tokens, attention, prefill])


class VerificationTimeEstimator:
    def __init__(self, padded: bool = False, forgetting: float = 0.995, ridge: float = 1e-6, window: int = 200):
        self.padded = padded  # the engine pads each batch to its widest sequence
        self.forgetting = forgetting
        self.ridge = ridge
        self._xtx = np.zeros((len(FEATURES), len(FEATURES)))
        self._xty = np.zeros(len(FEATURES))
        self._coef = np.zeros(len(FEATURES))
        self._errors: deque[float] = deque(maxlen=window)  # relative errors of predictions made before the fact
        self._lock = threading.Lock()
        self.observations = 0

    def estimate(self, batch: Sequence[SequenceShape]) -> float:
        """Seconds the batch is expected to take (0 before any observation)."""
        if not batch:
            return 0.0
        with self._lock:
            return max(0.0, float(features(batch, self.padded) @ self._coef))

    def with_others(self, others: Sequence[SequenceShape]) -> Callable[[SequenceShape], float]:
        """Estimates of ``others`` plus one more sequence, for many candidates of that one: the others are
        counted once (a padded engine's batch is re-measured per candidate, since its widest may change)."""
        if self.padded:
            return lambda shape: self.estimate([*others, shape])
        return self.with_features(features(others))

    def with_features(self, base: np.ndarray) -> Callable[[SequenceShape], float]:
        """`with_others` from the others' `features`, already summed (an engine that does not pad): a candidate
        costs a few float operations, since every verdict's hint tries one per number of drafts."""
        with self._lock:
            _, per_sequence, per_token, per_attention, per_prefill = self._coef
            fixed = float(base @ self._coef) + per_sequence

        def seconds(shape: SequenceShape) -> float:
            context, new = shape.context_tokens, shape.new_tokens
            attention = new * (context + new / 2) / 1000
            prefill = new if context == 0 else 0
            return max(0.0, fixed + per_token * new + per_attention * attention + per_prefill * prefill)

        return seconds

    def sequence_cost(self, shape: SequenceShape) -> float:
        """Seconds one sequence adds to any batch: the model is linear, so this does not depend on the batch.

        (For a padded engine it is what the sequence costs at its own width: a lower bound, used to rank.)
        """
        with self._lock:
            return max(1e-6, float(sequence_features(shape) @ self._coef))

    def observe(self, batch: Sequence[SequenceShape], seconds: float) -> None:
        """Records an executed batch: scores the prediction made before it, then refits."""
        x = features(batch, self.padded)
        with self._lock:
            if self.observations and seconds > 0:
                predicted = max(0.0, float(x @ self._coef))
                self._errors.append(abs(predicted - seconds) / seconds)
            self._xtx = self.forgetting * self._xtx + np.outer(x, x)
            self._xty = self.forgetting * self._xty + x * seconds
            self.observations += 1
            self._refit()

    def _refit(self) -> None:
        scale = np.trace(self._xtx) / len(FEATURES)
        regularised = self._xtx + self.ridge * scale * np.eye(len(FEATURES))
        self._coef = np.linalg.solve(regularised, self._xty)

    def save(self, path: Path, identity: dict[str, str | int]) -> None:
        """Writes the fit to ``path`` for the server ``identity`` describes: the least-squares sums, not only the
        coefficients, so that a server starting from it goes on learning where this one stopped."""
        with self._lock:
            state = {
                "format": FIT_FORMAT,
                "identity": identity,
                "features": FEATURES,
                "padded": self.padded,
                "observations": self.observations,
                "xtx": self._xtx.tolist(),
                "xty": self._xty.tolist(),
            }
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(state, out)
            os.replace(temporary, path)  # whole or not at all: another server may be reading it
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load(self, path: Path, identity: dict[str, str | int]) -> bool:
        """Starts from the fit saved at ``path``, if it was saved for this ``identity`` in this format; False (and
        nothing changed) where there is none, or it is for another server, or it cannot be read."""
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as error:
            log.warning("ignoring the saved estimator fit %s (%s); profiling instead", path, error)
            return False
        if not (
            isinstance(state, dict)
            and state.get("format") == FIT_FORMAT
            and state.get("identity") == json.loads(json.dumps(identity))
            and state.get("features") == list(FEATURES)
            and state.get("padded") == self.padded
        ):
            return False
        try:
            xtx, xty = np.array(state["xtx"], dtype=float), np.array(state["xty"], dtype=float)
            observations = int(state["observations"])
            if xtx.shape != (len(FEATURES),) * 2 or xty.shape != (len(FEATURES),):
                raise ValueError("not a fit of this estimator's features")
            if not (np.isfinite(xtx).all() and np.isfinite(xty).all()):
                raise ValueError("not finite")
        except (KeyError, TypeError, ValueError) as error:
            log.warning("ignoring the saved estimator fit %s (%s); profiling instead", path, error)
            return False
        with self._lock:
            self._xtx, self._xty, self.observations = xtx, xty, observations
            self._refit()
        return True

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error of recent predictions, or None before any."""
        with self._lock:
            return 100.0 * float(np.mean(self._errors)) if self._errors else None

    @property
    def coefficients(self) -> dict[str, float]:
        with self._lock:
            return dict(zip(FEATURES, map(float, self._coef)))


def fit_path(directory: str, identity: dict[str, str | int]) -> Path:
    """Where the fit of the server ``identity`` describes is kept in ``directory`` (auto: ``estimator/`` beside
    ``$WISP_CACHE_DIR``), by a hash of it."""
    from wisp_common.models import cache_dir

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return (cache_dir().parent / "estimator" if directory == "auto" else Path(directory)) / f"fit-{key}.json"


def profile(engine, estimator: VerificationTimeEstimator, max_sessions: int, max_context: int, max_drafts: int) -> None:
    """Times a small grid of synthetic batches so the estimator is useful from the first request.

    Sessions {1, 4, 16} x contexts {32, 256} x drafts {0, max}: 21 s (vllm) to 26 s (hf) for the default target on
    a 2-core CPU, most of it the 16 sessions' prefills; `--no-profile-estimator` skips it (it then learns online),
    and a server that finds a fit saved for it (`fit_path`) starts from that instead.
    """
    import random

    from wisp_common.request import SamplingParams
    from wisp_server.engines.base import RoundRequest

    rng = random.Random(0)
    vocab = engine.info.vocab_size
    for n in sorted({1, min(4, max_sessions), min(16, max_sessions)}):
        for context in (32, min(256, max_context // 2)):
            ids = [f"profile-{n}-{context}-{i}" for i in range(n)]
            for sid in ids:
                engine.add_session(sid, [rng.randrange(vocab) for _ in range(context)], SamplingParams(), max_context)
            cached = [0] * n
            try:
                for drafts in (0, 0, max_drafts, max_drafts, 0, max_drafts):
                    requests = [RoundRequest(sid, tuple(rng.randrange(vocab) for _ in range(drafts))) for sid in ids]
                    shapes = [SequenceShape(c, engine.uncached_tokens(sid) + drafts) for sid, c in zip(ids, cached)]
                    start = time.perf_counter()
                    results = engine.verify(requests)
                    estimator.observe(shapes, time.perf_counter() - start)
                    cached = [
                        s.context_tokens + s.new_tokens - drafts + r.num_accepted for s, r in zip(shapes, results)
                    ]
            finally:
                for sid in ids:
                    engine.remove_session(sid)
