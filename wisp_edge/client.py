"""`EdgeClient`: runs one generation as a Speculate session against the server.

Each round the drafter proposes tokens until the `SpeculationController`
says send; the server's verdict says how many stand and which token
follows, and the drafter rolls back to match. With pipelining on, the edge
keeps drafting while a round is out for verification, as if every draft will
be accepted; that work is kept when the verdict proves it right (all drafts
accepted and the bonus token guessed), else dropped. Callers see only
committed tokens, which are exactly the target's own.

Server-paced (``pacing``), the edge does not wait for verdicts to send:
the server decodes the session step after step, and the edge streams its
newest drafts (a run as far as the controller trusts) for the server to
verify in whichever step comes next. ``pacing="auto"`` chooses per session
from what the edge measured of this server (`server_pacing_pays`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from wisp_common.config import PACINGS, EdgeConfig
from wisp_common.features import decode_features
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import RETRY_AFTER_KEY, SERVER_LOADING_KEY, SamplingParams, Slo
from wisp_common.verification import DraftDistribution
from wisp_edge.controller import FixedLength, RoundTiming, SpeculationController, SpeculationMode
from wisp_edge.drafter import Drafter

log = logging.getLogger(__name__)

# Server-paced: a streamed round drafts this many tokens beyond what a step verifies, since the step in flight
# when it arrives commits about that many first.
PACE_LEAD = 2


def server_pacing_pays(timing: RoundTiming) -> bool:
    """Whether a server-paced session would get drafts verified: a streamed round must reach the server before the
    step after the one in flight is queued, so within one step the verdict comes back, the edge drafts the
    `PACE_LEAD` + 1 tokens a fitting round needs, and the round goes out. Where a server steps faster than that
    (a small target, a slow edge) it would decode alone while the edge drafts for nothing, and rounds paced by the
    edge are better. ``timing``: the server's step (its estimated verification) and the edge's round trip and
    time per draft, as measured in its last edge-paced session."""
    return timing.verify > timing.rtt + (PACE_LEAD + 1) * timing.draft_token


# Statuses after which a session is resumed on a new stream: the server is gone, restarting, draining, full or
# overdue. Others (a bad request, a failed batch: INTERNAL) would fail again the same way.
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class ResumePolicy:
    """How long the edge waits for the server, and how it backs off before resuming a broken session.

    A verdict is overdue after ``round_timeout`` seconds, or ``round_timeout_factor`` times what the server's
    last hints expect the round to take (queue, verification, network), whichever is longer: a hang, not
    slowness. Backoff is exponential with full jitter (so edges cut off together do not come back together),
    never shorter than the server's retry hint, and ``max_retries`` failures in a row without a committed token
    end the generation. A server still loading its target is coming up, not failing: its refusals count only
    once ``loading_timeout`` seconds of them have passed. Without ``wait_when_full``, a session a full server
    refuses (RESOURCE_EXHAUSTED) before its first token fails at once, for a caller that tells its own client to
    come back later (the daemon's 429).
    """

    round_timeout: float = 10.0
    round_timeout_factor: float = 8.0
    max_retries: int = 8
    backoff: float = 0.25
    backoff_max: float = 8.0
    loading_timeout: float = 600.0
    wait_when_full: bool = True

    @classmethod
    def of(cls, config: EdgeConfig) -> ResumePolicy:
        return cls(
            config.round_timeout,
            config.round_timeout_factor,
            config.max_retries,
            config.retry_backoff,
            config.retry_backoff_max,
        )

    def wait_limit(self, expected: float) -> float:
        """Seconds to wait for a verdict expected in ``expected`` seconds."""
        return max(self.round_timeout, self.round_timeout_factor * expected)

    def delay(self, failures: int, retry_after: float | None) -> float:
        """Backoff before the ``failures``-th attempt in a row; a server's hint is spread over up to 1.5x."""
        jittered = random.uniform(0.0, min(self.backoff_max, self.backoff * 2 ** (failures - 1)))
        return jittered if retry_after is None else max(jittered, retry_after * random.uniform(1.0, 1.5))


class RoundTimeout(grpc.RpcError):
    """The server did not answer in time (hung, or its network cut without a reset)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "the server did not answer by the round's deadline (see ResumePolicy)"


class _Interrupted(Exception):
    """The session's stream broke in a way a new stream can resume."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(str(error))
        self.error = error
        trailers = dict(getattr(error, "trailing_metadata", lambda: None)() or ())
        self.retry_after = int(trailers[RETRY_AFTER_KEY]) / 1000 if trailers.get(RETRY_AFTER_KEY) else None
        self.server_loading = SERVER_LOADING_KEY in trailers


@dataclass
class _Run:
    """One generation's state across the streams it takes: what is committed survives a broken stream."""

    open: pb.OpenSession
    max_new_tokens: int
    draft_tokens: int
    on_tokens: Callable[[list[int]], None] | None
    timing: RoundTiming
    started: float
    generated: list[int] = field(default_factory=list)
    controller: SpeculationController | None = None


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0  # every token the drafter proposed, pipelined ones included
    sent: int = 0  # drafts sent for verification
    accepted: int = 0
    pipelined: int = 0  # drafted while a round was out
    pipelined_kept: int = 0  # of those, still valid after the verdict
    server_decoded: int = 0  # tokens the server decoded on its own, where no draft paid
    generated: int = 0
    ttft_seconds: float = 0.0
    wall_seconds: float = 0.0
    draft_seconds: float = 0.0
    idle_seconds: float = 0.0  # waiting for verdicts with nothing to draft
    round_trip_seconds: float = 0.0  # from sending each round to its verdict's arrival
    server_queue_seconds: float = 0.0
    server_verify_seconds: float = 0.0
    server_paced: bool = False  # the server paced this session's steps (`EdgeClient.pacing`)
    branches: int = 0  # server-paced: second guesses streamed (`Drafter.branch`)
    branches_verified: int = 0  # of those, the ones whose drafts a step verified
    resumes: int = 0  # new streams after a broken one (server restarted or gone, draining, full, overdue)
    # Each round that carried drafts, in order: drafts sent and accepted (vLLM's per_step_drafted/_accepted).
    per_step_drafted: list[int] = field(default_factory=list)
    per_step_accepted: list[int] = field(default_factory=list)

    def record_round(self, sent: int, accepted: int) -> None:
        """Counts one verified round of ``sent`` drafts, the first ``accepted`` of them accepted."""
        if sent:
            self.per_step_drafted.append(sent)
            self.per_step_accepted.append(accepted)

    @property
    def draft_rounds(self) -> int:
        """Rounds that carried drafts: vLLM's num_drafts."""
        return len(self.per_step_drafted)

    @property
    def accepted_per_position(self) -> list[int]:
        """How often the draft at each position of a round was accepted: vLLM's num_accepted_tokens_per_pos."""
        longest = max(self.per_step_drafted, default=0)
        return [sum(accepted > position for accepted in self.per_step_accepted) for position in range(longest)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.sent if self.sent else 0.0

    @property
    def wasted(self) -> int:
        """Drafted tokens that never made it into the output: rejected, after a rejection, or discarded."""
        return self.drafted - self.accepted

    @property
    def tokens_per_round(self) -> float:
        """Tokens the verification rounds committed, per round: the server's own steps are neither."""
        return (self.generated - self.server_decoded) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> dict[str, float | bool]:
        return {
            "tokens": self.generated,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "sent": self.sent,
            "accepted": self.accepted,
            "wasted_drafts": self.wasted,
            "pipelined": self.pipelined,
            "pipelined_kept": self.pipelined_kept,
            "server_decoded": self.server_decoded,
            "server_paced": self.server_paced,
            "branches": self.branches,
            "branches_verified": self.branches_verified,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_round": round(self.tokens_per_round, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "ttft_seconds": round(self.ttft_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 3),
            "draft_seconds": round(self.draft_seconds, 3),
            "idle_seconds": round(self.idle_seconds, 3),
            "round_trip_seconds": round(self.round_trip_seconds, 3),
            "server_queue_seconds": round(self.server_queue_seconds, 3),
            "server_verify_seconds": round(self.server_verify_seconds, 3),
            "resumes": self.resumes,
        }


class Cancellation:
    """Ends a running `EdgeClient.generate` from any thread at once: its stream is cancelled, so the server
    closes the session, and ``generate`` raises `grpc.RpcError` (CANCELLED)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled, call = True, self._call
        if call is not None:
            call.cancel()

    def attach(self, call: grpc.Future) -> None:
        """The generation's stream; cancelled at once if the cancellation came first."""
        with self._lock:
            self._call = call
        if self.cancelled:
            call.cancel()


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class EdgeClient:
    """A session client; ``speculation`` is the edge's mode: `FixedLength` (SLED) or `AdaptiveSpeculation` (WISP)."""

    def __init__(
        self,
        channel: grpc.Channel,
        drafter: Drafter,
        draft_identity: pb.ModelIdentity,
        device: pb.DeviceInfo | None = None,
        speculation: SpeculationMode = FixedLength,
        pipeline: bool = False,
        server_decoding: bool = False,
        resume: ResumePolicy = ResumePolicy(),
        pacing: str = "edge",
        branch: bool = True,
    ):
        """``server_decoding``: let the server decode the session itself where no draft pays at its load.
        ``pacing`` (`wisp_common.config.PACINGS`): "edge", each round waits for the edge's drafts; "server", the
        server decodes at its own pace, verifying the drafts the edge streams; "auto", the first session edge-paced,
        then server-paced where `server_pacing_pays` on the figures the last edge-paced session measured.
        ``branch``: server-paced, also stream a second guess of the step in flight (`Drafter.branch`).

        ``channel`` may spread calls over several servers (`wisp_edge.connection.BalancedChannel`): a resumed
        session is a new call, so it starts on another server where the first is gone."""
        self.stub = pb_grpc.WispStub(channel)
        self.resume = resume
        self.drafter = drafter
        self.draft_identity = draft_identity
        self.device = device or pb.DeviceInfo()
        self.speculation = speculation
        self.pipeline = pipeline
        self.server_decoding = server_decoding
        if pacing not in PACINGS:
            raise ValueError(f"pacing must be one of {', '.join(PACINGS)}, not {pacing!r}")
        self.pacing = pacing
        self.branch = branch
        self.measured: RoundTiming | None = None  # this server's step and this edge's trip and drafting, last seen
        # When a list: each round's (signals of the sent drafts, drafts sent, drafts accepted), for calibration.
        self.round_log: list[tuple[list, int, int]] | None = None

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        draft_tokens: int = 4,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        slo: Slo = Slo(),
        on_tokens: Callable[[list[int]], None] | None = None,
        cancellation: Cancellation | None = None,
        stats: GenerationStats | None = None,
    ) -> GenerationResult:
        """Generates up to ``max_new_tokens`` tokens; ``draft_tokens`` caps a round; ``on_tokens`` sees commits.

        ``stats``, when given, is filled as the rounds go, so a caller that cancels still has the figures.

        A stream that breaks (the server restarted, gone, draining or full; the network cut; a verdict overdue) is
        resumed on a new stream after a backoff (`ResumePolicy`): the session is opened again with the tokens
        committed so far, so no token is lost or repeated, and the output is the target's as if nothing broke.
        """
        stats = GenerationStats() if stats is None else stats
        self.drafter.start(prompt_ids)
        run = _Run(
            open=pb.OpenSession(
                draft_model=self.draft_identity,
                prompt_token_ids=list(prompt_ids),
                sampling=sampling.to_proto(),
                stop=pb.StopCondition(
                    max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos
                ),
                slo=slo.to_proto(),
                device=self.device,
                return_features=self.drafter.wants_features,
                feature_layers=self.drafter.feature_layers,
                accept_server_decoding=self.server_decoding,
                server_paced=self.server_paced(),
            ),
            max_new_tokens=max_new_tokens,
            draft_tokens=draft_tokens,
            on_tokens=on_tokens,
            timing=RoundTiming(),
            started=time.monotonic(),
        )
        stats.server_paced = run.open.server_paced
        try:
            result = self._resuming(run, stats, cancellation)
        except grpc.RpcError:
            raise  # the server's or the network's: the drafter's state is whole, a retried turn reuses it
        except BaseException:
            self.drafter.forget()  # a drafting step may have raised midway: the next request starts afresh
            raise
        self._remember(run)
        return result

    def server_paced(self) -> bool:
        """Whether the next session is server-paced (`pacing`)."""
        if self.pacing == "auto":
            return self.measured is not None and server_pacing_pays(self.measured)
        return self.pacing == "server"

    def _remember(self, run: _Run) -> None:
        """Keeps what auto pacing decides by: the server's step and the edge's time per draft from any session,
        the round trip from an edge-paced one (a server-paced session does not wait on it, so does not measure it)."""
        timing, earlier = run.timing, self.measured
        rtt = earlier.rtt if run.open.server_paced and earlier is not None else timing.rtt
        self.measured = RoundTiming(rtt=rtt, verify=timing.verify, draft_token=timing.draft_token)

    def _resuming(self, run: _Run, stats: GenerationStats, cancellation: Cancellation | None) -> GenerationResult:
        """Runs the session, resuming it on a new stream each time one breaks, until it finishes or gives up."""
        failures, loading_since = 0, None
        while True:
            committed = len(run.generated)
            try:
                return self._stream(run, stats, cancellation)
            except _Interrupted as interrupted:
                loading_since = (loading_since or time.monotonic()) if interrupted.server_loading else None
                coming_up = loading_since is not None and time.monotonic() - loading_since < self.resume.loading_timeout
                failures = 0 if len(run.generated) > committed else failures + (not coming_up)
                refused_when_full = (
                    not run.generated
                    and not self.resume.wait_when_full
                    and interrupted.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                )
                cancelled = cancellation is not None and cancellation.cancelled
                if failures > self.resume.max_retries or refused_when_full or cancelled:
                    raise interrupted.error from None
                delay = self.resume.delay(failures, interrupted.retry_after)
                code = interrupted.error.code()
                log.log(
                    logging.WARNING if failures <= 1 else logging.DEBUG,  # one line per outage, not per attempt
                    "session interrupted after %d tokens (%s: %s); resuming in %.2fs",
                    len(run.generated),
                    code.name if code else "?",
                    interrupted.error.details(),
                    delay,
                )
                time.sleep(delay)
                stats.resumes += 1

    def _stream(self, run: _Run, stats: GenerationStats, cancellation: Cancellation | None) -> GenerationResult:
        """Runs the session on one Speculate stream until it finishes; raises `_Interrupted` where it breaks."""
        requests: queue.Queue[pb.SpeculateRequest | None] = queue.Queue()
        responses = self.stub.Speculate(_drain(requests))
        if cancellation is not None:
            cancellation.attach(responses)
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_read, args=(responses, inbox), daemon=True).start()
        try:
            opening = pb.OpenSession()
            opening.CopyFrom(run.open)
            opening.committed_token_ids.extend(run.generated)  # a resumed session: nothing lost, nothing twice
            opening.known_features = self.drafter.known_features if run.open.return_features else 0
            requests.put(pb.SpeculateRequest(open=opening))
            opened = _next(inbox, time.monotonic() + self.resume.round_timeout)[1].opened
            limit = min(run.draft_tokens, opened.max_draft_tokens)
            if run.controller is None or run.controller.max_drafts != limit:
                run.controller = self.speculation(limit)
            if run.open.server_paced:
                verdict = self._paced(run, stats, requests, inbox, opened)
            else:
                verdict = self._rounds(run, stats, requests, inbox, opened.position)
            requests.put(pb.SpeculateRequest(close=pb.CloseSession()))
            stats.generated = len(run.generated)
            stats.wall_seconds = time.monotonic() - run.started
            reason = pb.FinishReason.Name(verdict.finish_reason).removeprefix("FINISH_REASON_").lower()
            return GenerationResult(run.generated, reason, stats)
        finally:
            requests.put(None)
            responses.cancel()

    def _rounds(
        self, run: _Run, stats: GenerationStats, requests: queue.Queue, inbox: queue.Queue, position: int
    ) -> pb.Verdict:
        """Edge-paced: each round waits for the edge's drafts, each verdict answers one; returns the last."""
        controller, timing, generated = run.controller, run.timing, run.generated
        server_decoding = False  # the server is decoding on its own: its verdicts come without rounds
        while True:
            room = run.max_new_tokens - len(generated) - 1  # the verdict's own token always comes on top
            count = 0 if server_decoding else self._round_length(controller, timing, room, stats)
            drafts, signals = self.drafter.pending[:count], self.drafter.signals[:count]
            if not server_decoding:
                round_ = pb.DraftRound(
                    round=stats.rounds,
                    position=position,
                    token_ids=drafts,
                    draft_probabilities=draft_probabilities(self.drafter.proposals[:count]),
                )
                requests.put(pb.SpeculateRequest(draft=round_))
            sent_at, pipelined = time.monotonic(), stats.pipelined
            deadline = sent_at + self.resume.wait_limit(timing.queue + timing.verify + timing.rtt)
            arrived, response = self._await_verdict(inbox, controller, count, room, stats, deadline)
            verdict, pipelined = response.verdict, stats.pipelined - pipelined
            decoded_by_server = server_decoding
            if decoded_by_server:
                stats.server_decoded += verdict.HasField("next_token")
            else:
                # Up to the verdict's arrival: a draft step running then is the edge's time, not the trip's.
                stats.round_trip_seconds += arrived - sent_at
                # The network's part: the server's handling on a loaded host is not a trip the edge could save.
                spent = verdict.timings
                at_server = spent.server_seconds or spent.queue_seconds + spent.verify_seconds
                round_trip = arrived - sent_at - at_server
                timing.rtt = 0.8 * timing.rtt + 0.2 * max(0.0, round_trip) if stats.rounds else max(0.0, round_trip)
                controller.observe(signals, count, verdict.num_accepted)
            server_decoding = verdict.server_decoding

            next_token = verdict.next_token if verdict.HasField("next_token") else None
            features = decode_features(verdict.features) if verdict.HasField("features") else None
            self.drafter.commit(verdict.num_accepted, next_token, features)
            stats.pipelined_kept += min(pipelined, len(self.drafter.pending))
            if self.round_log is not None:
                self.round_log.append((signals, count, verdict.num_accepted))
            position = verdict.position
            stats.rounds += not decoded_by_server  # verification rounds: the server's own steps are not
            committed = drafts[: verdict.num_accepted] + ([] if next_token is None else [next_token])
            self._take(run, stats, verdict, committed, count)
            if verdict.finished:
                return verdict

    def _paced(
        self, run: _Run, stats: GenerationStats, requests: queue.Queue, inbox: queue.Queue, opened: pb.SessionOpened
    ) -> pb.Verdict:
        """Server-paced: verdicts come a step at a time, unasked. Between them the edge drafts a run of the
        server's suggested drafts plus `PACE_LEAD` (the tokens the step in flight commits first), and streams
        it twice: as soon as it can fit and have a draft verified, since a round must reach the server before
        the step after the one in flight is queued, and when it is whole or a verdict comes. Its first draft is
        its guess of the step in flight's token; with `branch`, the first streaming also carries a second guess
        from the draft's runner-up there (where the step rejects the first draft, or decodes alone, its token is
        often that), and the step after verifies whichever fits. Returns the last verdict."""
        controller, timing, drafter = run.controller, run.timing, self.drafter
        position, last = opened.position, None  # last: the (position, drafts) of the newest round streamed
        streamed: dict[int, tuple[int, list, list]] = {}  # by round: its position, its drafts' and branch's signals
        branched = -1  # the position of the last second guess
        while True:
            room = run.max_new_tokens - len(run.generated) - 1
            verified = controller.max_drafts
            if timing.suggested_drafts is not None:
                verified = min(verified, timing.suggested_drafts)
            depth = min(room, opened.max_draft_tokens, verified + PACE_LEAD) if verified else 0
            first = min(depth, PACE_LEAD + 1)  # enough to fit and have one verified: streamed at once
            while True:
                count = min(len(drafter.pending), depth)
                more = count < depth and inbox.empty()
                if count and (count == first or not more) and (position, count) != last:
                    last = (position, count)
                    drafts = drafter.pending[:count], drafter.signals[:count], drafter.proposals[:count]
                    branch = None
                    if self.branch and branched != position:
                        branched, branch = position, self._branch(stats, first)
                    self._stream_round(requests, streamed, position, *drafts, branch)
                if not more or not self._draft_one(stats, timing):
                    break
            waiting = time.monotonic()
            _, response = _next(inbox, waiting + self.resume.wait_limit(timing.queue + timing.verify))
            stats.idle_seconds += time.monotonic() - waiting
            verdict = response.verdict
            accepted = list(verdict.accepted_token_ids)
            committed = accepted + ([verdict.next_token] if verdict.HasField("next_token") else [])
            stats.branches_verified += verdict.num_drafts > 0 and verdict.branch
            if verdict.num_drafts and verdict.round in streamed:
                at, signals, branch_signals = streamed[verdict.round]
                signals = branch_signals if verdict.branch else signals
                start = verdict.position - len(committed) - at  # its drafts the step found committed already
                controller.observe(signals[start : start + verdict.num_drafts], verdict.num_drafts, len(accepted))
            features = decode_features(verdict.features) if verdict.HasField("features") else None
            drafter.advance(committed, features)
            position = verdict.position
            stats.rounds += verdict.num_drafts > 0  # verification rounds: a step without drafts is the server's own
            stats.server_decoded += verdict.num_drafts == 0 and verdict.HasField("next_token")
            self._take(run, stats, verdict, committed, verdict.num_drafts)
            if verdict.finished:
                return verdict

    @staticmethod
    def _stream_round(
        requests: queue.Queue,
        streamed: dict,
        position: int,
        drafts: list[int],
        signals: list,
        proposals: list,
        branch: tuple[list[int], list] | None = None,
    ) -> None:
        """Sends ``drafts`` (with their ``signals`` and q, `Drafter.proposals`), and a second guess ``branch``
        (its drafts and signals) if any, as a server-paced round after ``position``; keeps what its verdict
        needs."""
        number = max(streamed, default=-1) + 1
        branch_drafts, branch_signals = branch or ([], [])
        streamed[number] = (position, signals, branch_signals)
        streamed.pop(number - 16, None)  # a step verifies one of the newest rounds: older ones are not needed
        round_ = pb.DraftRound(
            round=number,
            position=position,
            token_ids=drafts,
            draft_probabilities=draft_probabilities(proposals),
            branch_token_ids=branch_drafts,
        )
        requests.put(pb.SpeculateRequest(draft=round_))

    def _branch(self, stats: GenerationStats, count: int) -> tuple[list[int], list] | None:
        """The drafter's second guess, ``count`` tokens long (point masses: a branch is greedy's), if it has one."""
        started = time.monotonic()
        branch = self.drafter.branch(count)
        if branch is not None:
            stats.draft_seconds += time.monotonic() - started
            stats.drafted += len(branch[0]) - 1  # its first token is the runner-up of a draft already counted
            stats.branches += 1
        return branch

    @staticmethod
    def _take(run: _Run, stats: GenerationStats, verdict: pb.Verdict, committed: list[int], verified: int) -> None:
        """What every verdict brings: its ``committed`` tokens (the drafts it accepted of ``verified``, then its
        own token) to the caller, the server's hints to the next rounds' timing, its figures to the stats."""
        run.timing.queue, run.timing.verify = verdict.hints.est_queue_seconds, verdict.hints.est_verify_seconds
        run.timing.suggested_drafts = verdict.hints.suggested_draft_tokens
        if not run.generated:
            stats.ttft_seconds = time.monotonic() - run.started
        run.generated += committed
        stats.sent += verified
        stats.accepted += verdict.num_accepted
        stats.record_round(verified, verdict.num_accepted)
        stats.server_queue_seconds += verdict.timings.queue_seconds
        stats.server_verify_seconds += verdict.timings.verify_seconds
        if run.on_tokens is not None:
            run.on_tokens(committed)

    def _draft_one(self, stats: GenerationStats, timing: RoundTiming | None = None) -> bool:
        started = time.monotonic()
        if self.drafter.draft_one() is None:
            return False
        elapsed = time.monotonic() - started
        stats.drafted += 1
        stats.draft_seconds += elapsed
        if timing is not None:
            timing.draft_token = 0.8 * timing.draft_token + 0.2 * elapsed if timing.draft_token else elapsed
        return True

    def _round_length(self, controller: SpeculationController, timing: RoundTiming, room: int, stats) -> int:
        """Drafts until the controller says send; returns how many pending drafts the round sends."""
        while True:
            can_draft = len(self.drafter.pending) < room
            count = controller.round_length(self.drafter.signals, timing, can_draft)
            if count is not None:
                return max(0, min(count, room))
            if not self._draft_one(stats, timing):
                return max(0, min(len(self.drafter.pending), room))

    def _await_verdict(
        self, inbox: queue.Queue, controller, sent: int, room: int, stats, deadline: float
    ) -> tuple[float, pb.SpeculateResponse]:
        """Waits for the round's verdict until ``deadline`` (returns its arrival time too); with pipelining,
        drafts meanwhile."""
        ahead = min(room, sent + controller.max_drafts)  # as far as the next round could reach
        while (
            self.pipeline
            and len(self.drafter.pending) < ahead
            and inbox.empty()
            and controller.keeps_pipelining(self.drafter.signals)
        ):
            if not self._draft_one(stats):
                break
            stats.pipelined += 1
        started = time.monotonic()
        response = _next(inbox, deadline)
        stats.idle_seconds += time.monotonic() - started
        return response


def draft_probabilities(proposals: Sequence[DraftDistribution | None]) -> list[pb.DraftProbabilities]:
    """The round's DraftRound.draft_probabilities: none when every draft is a point mass (what older edges send),
    else one entry per draft, empty for a point mass."""
    if all(proposal is None for proposal in proposals):
        return []
    return [pb.DraftProbabilities() if proposal is None else proposal.to_proto() for proposal in proposals]


def _next(inbox: queue.Queue, deadline: float) -> tuple[float, pb.SpeculateResponse]:
    """The stream's next response by ``deadline``; `_Interrupted` where the stream broke in a resumable way."""
    limit = deadline - time.monotonic()
    try:
        arrived, item = inbox.get(timeout=max(0.0, limit))
    except queue.Empty:
        raise _Interrupted(RoundTimeout()) from None
    if isinstance(item, grpc.RpcError) and item.code() in RESUMABLE:
        raise _Interrupted(item)
    if isinstance(item, BaseException):
        raise item
    if item is None:  # a server that ends the stream early is as gone as one that resets it
        raise _Interrupted(_StreamEnded())
    return arrived, item


class _StreamEnded(grpc.RpcError):
    """The server ended the stream without finishing the session."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server closed the stream before the session finished"


def _read(responses, inbox: queue.Queue) -> None:
    """Moves the server's responses into ``inbox`` with their arrival times, so the drafter can work meanwhile."""
    try:
        for response in responses:
            inbox.put((time.monotonic(), response))
        inbox.put((time.monotonic(), None))
    except grpc.RpcError as error:
        inbox.put((time.monotonic(), error))


def _drain(requests: queue.Queue[pb.SpeculateRequest | None]) -> Iterator[pb.SpeculateRequest]:
    while (item := requests.get()) is not None:
        yield item
