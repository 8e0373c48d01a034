"""`BatchScheduler`: turns rounds waiting from many sessions into engine batches.

gRPC handler threads `submit` rounds and wait on a future; one engine thread
asks the scheduling policy which waiting rounds form the next batch, runs
the engine on it, feeds the `VerificationTimeEstimator` the batch's real time
and resolves the futures. The engine is only ever driven from that thread.
Before the next batch it hands the core to the batch's handlers until each
says it is done with its result (`PendingRound.handled`): otherwise they
wait for the GIL behind the next forward pass, and every verdict leaves a
millisecond or more late (on this CPU, most of the server's own overhead).

Policies are plug-ins behind `SchedulingPolicy`, so the baselines run the
same code paths as WISP:

* `fcfs`: arrival order, as large a batch as the limits allow;
* `sled`: static batching as in SLED: wait until a fixed number of rounds
  are waiting or the oldest has waited a fixed window, then take them in order;
* `wisp`: SLO-aware. Least slack first among the urgent, then fill by
  expected committed tokens per unit of estimated time, and launch only a
  batch the estimator says finishes inside its members' deadlines. It also
  knows when each session's next round should be back (its verdict's send
  time plus the session's usual turnaround: network and drafting) and holds a
  batch for rounds due sooner than the separate batch they would otherwise
  need would cost: without that, sessions settle into alternating half
  batches, and a half batch costs nearly a full one.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from wisp_server.engines.base import EngineDead, RoundRequest, RoundVerdict, VerificationEngine
from wisp_server.estimator import SequenceShape, VerificationTimeEstimator
from wisp_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# The longest the engine thread waits for a batch's handlers before it starts the next batch anyway.
HANDOFF_TIMEOUT_SECONDS = 0.005


class SchedulerStopped(RuntimeError):
    """The server is shutting down; the round was not verified."""


class RoundWithdrawn(RuntimeError):
    """The round's session ended (its edge left) before the round was verified."""


@dataclass(frozen=True)
class BatchLimits:
    max_sessions: int
    max_tokens: int


@dataclass(eq=False)  # identity: two rounds are never "the same round"
class PendingRound:
    request: RoundRequest
    shape: SequenceShape
    deadline: float = float("inf")  # monotonic time by which the session needs its next token
    expected_tokens: float = 1.0  # tokens this round is expected to commit
    arrival: float = field(default_factory=time.monotonic)
    first: bool = False  # the session's first round: its shape's cached part is the engine's guess of its hit
    future: Future[RoundResult] = field(default_factory=Future)
    # Set by the handler once it no longer needs the core for this round (its verdict is sent).
    handled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class ExpectedRound:
    """A session's next round, not arrived yet: when it should, and what it will bring."""

    at: float  # monotonic time it is expected to arrive
    turnaround: float  # the session's usual time from its verdict's sending to its next round's arrival
    shape: SequenceShape
    expected_tokens: float
    deadline: float = float("inf")


@dataclass(frozen=True)
class RoundResult:
    verification: RoundVerdict
    queue_seconds: float
    verify_seconds: float
    batch_size: int
    batch: int  # the batch's number: the verdicts of one batch share it


def computed_shape(pending: PendingRound, verdict: RoundVerdict) -> SequenceShape:
    """What a round computed: as queued, but for a first round, which computed its context from where the prefix
    cache's hit ended (the engine guessed the hit when it was queued; blocks may have been evicted or cached since)."""
    if not pending.first:
        return pending.shape
    total = pending.shape.context_tokens + pending.shape.new_tokens
    return SequenceShape(verdict.reused_tokens, total - verdict.reused_tokens)


def within_limits(batch: Sequence[PendingRound], candidate: PendingRound, limits: BatchLimits) -> bool:
    """Whether ``candidate`` fits beside ``batch``; a lone round always fits, however large."""
    if not batch:
        return True
    tokens = sum(p.shape.new_tokens for p in batch) + candidate.shape.new_tokens
    return len(batch) < limits.max_sessions and tokens <= limits.max_tokens


class SchedulingPolicy(ABC):
    """Chooses the next batch from the rounds waiting."""

    name: str

    def __init__(self, limits: BatchLimits, estimator: VerificationTimeEstimator):
        self.limits = limits
        self.estimator = estimator

    @abstractmethod
    def select(
        self, waiting: Sequence[PendingRound], now: float, expected: Sequence[ExpectedRound] = ()
    ) -> list[PendingRound]:
        """A subset of ``waiting`` within the limits; empty means "not yet": ask again after `retry_after`.

        ``expected``: the rounds of sessions that are not waiting but should be back soon."""

    def retry_after(self, waiting: Sequence[PendingRound], now: float) -> float:
        return 0.001


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def select(
        self, waiting: Sequence[PendingRound], now: float, expected: Sequence[ExpectedRound] = ()
    ) -> list[PendingRound]:
        batch: list[PendingRound] = []
        for pending in sorted(waiting, key=lambda p: p.arrival):
            if not within_limits(batch, pending, self.limits):
                break
            batch.append(pending)
        return batch


class SLEDPolicy(FCFSPolicy):
    """Static batching: a full batch, or whatever is waiting once the oldest has waited `window` seconds."""

    name = "sled"

    def __init__(self, limits: BatchLimits, estimator: VerificationTimeEstimator, window: float = 0.05):
        super().__init__(limits, estimator)
        self.window = window

    def select(
        self, waiting: Sequence[PendingRound], now: float, expected: Sequence[ExpectedRound] = ()
    ) -> list[PendingRound]:
        oldest = min(p.arrival for p in waiting)
        if len(waiting) < self.limits.max_sessions and now - oldest < self.window:
            return []
        return super().select(waiting, now)

    def retry_after(self, waiting: Sequence[PendingRound], now: float) -> float:
        return max(0.0005, self.window - (now - min(p.arrival for p in waiting)))


class WispPolicy(SchedulingPolicy):
    """SLO-aware batching (WISP §5).

    A round is *urgent* when its slack (deadline minus now minus its estimated
    time alone) is under ``urgency`` seconds, and *late* when its deadline has
    passed. Urgent rounds go first, earliest deadline first. The remaining room
    is filled by value density: expected committed tokens per second of
    marginal estimated time, on-time rounds before late ones, so a round that
    can no longer make its deadline never displaces one that still can. A
    round that has waited ``max_wait`` seconds is admitted first whatever its
    state, so nothing starves. Before launch, non-urgent members whose
    presence would push the batch past an on-time member's deadline are
    taken out again.
    """

    name = "wisp"

    def __init__(
        self,
        limits: BatchLimits,
        estimator: VerificationTimeEstimator,
        urgency: float = 0.05,
        max_wait: float = 1.0,
    ):
        super().__init__(limits, estimator)
        self.urgency = urgency
        self.max_wait = max_wait
        self._hold_until: float | None = None  # the batch chosen last is held until then for rounds due back

    def select(
        self, waiting: Sequence[PendingRound], now: float, expected: Sequence[ExpectedRound] = ()
    ) -> list[PendingRound]:
        batch = self._batch(waiting, now)
        self._hold_until = self._hold(batch, now, expected)
        return [] if self._hold_until is not None else batch

    def retry_after(self, waiting: Sequence[PendingRound], now: float) -> float:
        return (
            max(0.0005, self._hold_until - now) if self._hold_until is not None else super().retry_after(waiting, now)
        )

    def _hold(self, batch: list[PendingRound], now: float, expected: Sequence[ExpectedRound]) -> float | None:
        """When to launch ``batch`` instead of now, or None for now.

        A round that misses the batch needs a batch of its own, which costs the launch again; a round the
        batch waits for costs the wait. Waiting for everyone also means everyone goes out together, so the
        engine idles a whole turnaround every cycle, where half batches would have interleaved. So the batch
        waits for a round only if both the wait and the round's turnaround cost less than the launch saved
        (nearly a whole step on a GPU reading its weights, much of one on these CPUs), only while no more
        deadlines are missed than launching now would miss (the joiners' included, in a batch of their own
        after this one), and within the limits.
        """
        if not batch or not expected:
            return None
        estimate = self.estimator.estimate
        shapes = [p.shape for p in batch]
        alone = estimate(shapes)
        deadlines = [p.deadline for p in batch]
        tokens = sum(p.shape.new_tokens for p in batch)
        joining: list[ExpectedRound] = []
        # A round a little late (jitter) is still coming; one late by half its turnaround is not counted on.
        coming = (replace(e, at=max(e.at, now)) for e in expected if e.at >= now - e.turnaround / 2)
        for due in sorted(coming, key=lambda e: e.at):
            tokens += due.shape.new_tokens
            if len(shapes) + len(joining) + 1 > self.limits.max_sessions or tokens > self.limits.max_tokens:
                break
            extra = [e.shape for e in joining] + [due.shape]
            together, separate = estimate(shapes + extra), estimate(extra)
            if max(due.at - now, due.turnaround) >= alone + separate - together:
                break  # waiting costs more than a batch of its own
            # Holding must not cost more deadlines than launching now would: then the joiners wait for a batch of
            # their own, and may miss theirs instead.
            joiners = [e.deadline for e in (*joining, due)]
            launched, on_their_own = now + alone, max(due.at, now + alone) + separate
            misses_now = sum(now <= d < launched for d in deadlines) + sum(now <= d < on_their_own for d in joiners)
            misses_held = sum(now <= d < due.at + together for d in (*deadlines, *joiners))
            if misses_held > misses_now:
                break
            joining.append(due)
        return joining[-1].at if joining else None

    def _batch(self, waiting: Sequence[PendingRound], now: float) -> list[PendingRound]:
        estimate, cost = self.estimator.estimate, self.estimator.sequence_cost
        starving = sorted((p for p in waiting if now - p.arrival >= self.max_wait), key=lambda p: p.arrival)
        urgent = sorted(
            (p for p in waiting if p.deadline >= now and p.deadline - now - estimate([p.shape]) < self.urgency),
            key=lambda p: p.deadline,
        )
        batch: list[PendingRound] = []
        for pending in starving + urgent:
            if pending not in batch and within_limits(batch, pending, self.limits):
                batch.append(pending)
        protected = list(batch)

        # The estimator is linear, so a round's marginal time, and hence its value density, is the same in any batch.
        density = {id(p): p.expected_tokens / cost(p.shape) for p in waiting}
        rest = sorted((p for p in waiting if p not in batch), key=lambda p: (p.deadline < now, -density[id(p)]))
        for pending in rest:
            if within_limits(batch, pending, self.limits):
                batch.append(pending)

        # Launch only what finishes in time for its on-time members: shed the least valuable extras first, but
        # only where shedding can save the earliest of them. Where a step costs about the same whatever it holds
        # (a GPU reading its weights), nothing can, and shedding would only send the others to a later batch.
        while True:
            finish = now + estimate([p.shape for p in batch])
            at_risk = [p for p in batch if now <= p.deadline < finish]
            removable = [p for p in batch if p not in protected]
            if not at_risk or not removable:
                return batch
            first = min(at_risk, key=lambda p: p.deadline)
            if now + estimate([p.shape for p in protected if p is not first] + [first.shape]) >= first.deadline:
                return batch
            batch.remove(min(removable, key=lambda p: density[id(p)]))


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FCFSPolicy, SLEDPolicy, WispPolicy)}


class BatchScheduler:
    def __init__(
        self,
        engine: VerificationEngine,
        policy: SchedulingPolicy,
        estimator: VerificationTimeEstimator,
        metrics: ServerMetrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ):
        """``on_fatal`` is told once when the engine is dead (`EngineDead`): the scheduler has stopped, and only a
        new process can serve again."""
        self.engine = engine
        self.policy = policy
        self.estimator = estimator
        self.metrics = metrics or ServerMetrics()
        self.on_fatal = on_fatal
        self._waiting: list[PendingRound] = []
        self._expected: dict[str, ExpectedRound] = {}  # by session: rounds due back soon
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = 0  # batches verified so far
        self._thread = threading.Thread(target=self._run, name="wisp-engine", daemon=True)
        self.metrics.rounds_waiting.set_function(lambda: len(self._waiting))
        self.metrics.kv_cache_usage.set_function(engine.kv_cache_usage)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def stopped(self) -> bool:
        """Whether it takes no more rounds: the server is stopping, or the engine died."""
        with self._cond:
            return self._stopped

    def submit(self, pending: PendingRound) -> Future[RoundResult]:
        with self._cond:
            if self._stopped:
                raise SchedulerStopped("the server is shutting down")
            self._waiting.append(pending)
            self._expected.pop(pending.request.session_id, None)
            self._cond.notify()
        return pending.future

    def expect(self, session_id: str, expected: ExpectedRound | None) -> None:
        """When a session's next round should arrive (None: it will not, e.g. it ended)."""
        with self._cond:
            if expected is None:
                if self._expected.pop(session_id, None) is not None:
                    self._cond.notify()  # a batch held for it launches now
            else:
                self._expected[session_id] = expected

    def withdraw(self, session_id: str) -> None:
        """Forgets a session that ended: its next round is no longer expected, and a round of it still waiting
        is taken out (its future fails with `RoundWithdrawn`) so no batch verifies it."""
        with self._cond:
            self._expected.pop(session_id, None)
            withdrawn = [p for p in self._waiting if p.request.session_id == session_id]
            self._waiting = [p for p in self._waiting if p.request.session_id != session_id]
            self._cond.notify()
        for pending in withdrawn:
            pending.future.set_exception(RoundWithdrawn(f"session {session_id} ended"))

    def waiting_shapes(self) -> list[SequenceShape]:
        with self._cond:
            return [p.shape for p in self._waiting]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._waiting:
                        now = time.monotonic()
                        batch = self.policy.select(self._waiting, now, list(self._expected.values()))
                        if batch:
                            choosing = time.monotonic() - now
                            break
                        self._cond.wait(self.policy.retry_after(self._waiting, now))
                    else:
                        self._cond.wait()
                if self._stopped:
                    for pending in self._waiting:
                        pending.future.set_exception(SchedulerStopped("the server is shutting down"))
                    return
                chosen = {id(p) for p in batch}
                self._waiting = [p for p in self._waiting if id(p) not in chosen]
            self._execute(batch, choosing)

    def _die(self, batch: list[PendingRound], error: EngineDead) -> None:
        """Stops taking rounds, fails the batch and everything waiting, and tells ``on_fatal``."""
        with self._cond:
            self._stopped = True
            failed, self._waiting = batch + self._waiting, []
        for pending in failed:
            pending.future.set_exception(SchedulerStopped(f"the server's engine failed ({error})"))
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _execute(self, batch: list[PendingRound], choosing: float) -> None:
        """Runs the batch and resolves its futures at once: the handlers wait on them, the bookkeeping can wait."""
        start = time.monotonic()
        try:
            verifications = self.engine.verify([p.request for p in batch])
        except EngineDead as error:  # nothing more can be verified in this process
            log.critical("the engine is dead: %s", error)
            self.metrics.engine_errors.inc()
            self._die(batch, error)
            return
        except Exception as error:  # a failed batch fails its rounds, never the server
            log.exception("verification batch of %d failed", len(batch))
            self.metrics.engine_errors.inc()
            for pending in batch:
                pending.future.set_exception(error)
            return
        elapsed = time.monotonic() - start
        self.batches += 1
        for pending, verification in zip(batch, verifications):
            pending.future.set_result(
                RoundResult(verification, start - pending.arrival, elapsed, len(batch), self.batches)
            )
        handoff_until = time.monotonic() + HANDOFF_TIMEOUT_SECONDS
        for pending in batch:  # waiting releases the GIL: the handlers run now, not behind the next batch
            pending.handled.wait(max(0.0, handoff_until - time.monotonic()))
        end = time.monotonic()
        # What the batch computed: a first round's prompt was computed from where its prefix-cache hit ended.
        shapes = [computed_shape(p, v) for p, v in zip(batch, verifications)]
        self.estimator.observe(shapes, elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(sum(s.new_tokens for s in shapes))
        self.metrics.verify_seconds.observe(elapsed)
        for pending in batch:
            self.metrics.queue_seconds.observe(start - pending.arrival)
        if self.estimator.mape is not None:
            self.metrics.estimator_mape.set(self.estimator.mape)
        self.metrics.schedule_seconds.observe(choosing + time.monotonic() - end)
