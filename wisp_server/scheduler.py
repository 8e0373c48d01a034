"""`BatchScheduler`: turns rounds waiting from many sessions into engine batches.

gRPC handler threads `submit` rounds and wait on a future; one engine thread
asks the scheduling policy which waiting rounds form the next batch, runs
the engine on it and resolves the futures. The engine is only ever driven from
that one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from wisp_common.verification import Verification
from wisp_server.engine import RoundRequest, VerificationEngine

log = logging.getLogger(__name__)


class SchedulerStopped(RuntimeError):
    """The server is shutting down; the round was not verified."""


@dataclass(frozen=True)
class BatchLimits:
    max_sessions: int
    max_tokens: int


@dataclass
class PendingRound:
    request: RoundRequest
    new_tokens: int  # uncached context tokens plus drafts: what the round computes
    arrival: float = field(default_factory=time.monotonic)
    future: Future[RoundResult] = field(default_factory=Future)


@dataclass(frozen=True)
class RoundResult:
    verification: Verification
    queue_seconds: float
    verify_seconds: float
    batch_size: int


class SchedulingPolicy(ABC):
    """Chooses the next batch from the rounds waiting; baselines and WISP plug in here."""

    name: str

    @abstractmethod
    def select(self, waiting: Sequence[PendingRound], limits: BatchLimits) -> list[PendingRound]:
        """Returns a non-empty subset of ``waiting`` within ``limits`` (or all if one alone exceeds them)."""


class FCFSPolicy(SchedulingPolicy):
    """Arrival order, as many rounds as the limits allow."""

    name = "fcfs"

    def select(self, waiting: Sequence[PendingRound], limits: BatchLimits) -> list[PendingRound]:
        batch: list[PendingRound] = []
        tokens = 0
        for pending in sorted(waiting, key=lambda p: p.arrival):
            if len(batch) == limits.max_sessions:
                break
            if batch and tokens + pending.new_tokens > limits.max_tokens:
                break
            batch.append(pending)
            tokens += pending.new_tokens
        return batch


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FCFSPolicy,)}


class BatchScheduler:
    def __init__(self, engine: VerificationEngine, policy: SchedulingPolicy, limits: BatchLimits):
        self.engine = engine
        self.policy = policy
        self.limits = limits
        self._waiting: list[PendingRound] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="wisp-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def submit(self, request: RoundRequest) -> Future[RoundResult]:
        pending = PendingRound(request, self.engine.uncached_tokens(request.session_id) + len(request.drafts))
        with self._cond:
            if self._stopped:
                raise SchedulerStopped("the server is shutting down")
            self._waiting.append(pending)
            self._cond.notify()
        return pending.future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for pending in self._waiting:
                        pending.future.set_exception(SchedulerStopped("the server is shutting down"))
                    return
                batch = self.policy.select(self._waiting, self.limits)
                chosen = {id(p) for p in batch}
                self._waiting = [p for p in self._waiting if id(p) not in chosen]
            self._execute(batch)

    def _execute(self, batch: list[PendingRound]) -> None:
        start = time.monotonic()
        try:
            verifications = self.engine.verify([p.request for p in batch])
        except Exception as error:  # a failed batch fails its rounds, never the server
            log.exception("verification batch of %d failed", len(batch))
            for pending in batch:
                pending.future.set_exception(error)
            return
        elapsed = time.monotonic() - start
        for pending, verification in zip(batch, verifications):
            pending.future.set_result(RoundResult(verification, start - pending.arrival, elapsed, len(batch)))
