"""The gRPC service: the contract in proto/wisp/v1/wisp.proto, enforced.

Each Speculate stream is one session. Its handler validates every message,
hands rounds to the `BatchScheduler` and turns results into verdicts. A bad
message ends only its own stream, with a status code and a message a person
can act on; other sessions never notice.

A session runs in one of two paces. Edge-paced (the default), each round
waits for the edge's DraftRound and each verdict answers one. Server-paced
(OpenSession.server_paced), the server decodes the session step after step
as Generate does, and each step verifies the newest drafts the edge has
streamed that still fit the committed text: the server never waits for the
edge's drafting or its round trip, and drafts it gets cost it only their
verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import queue
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError, Message

from wisp_common import __version__
from wisp_common.config import ServerConfig
from wisp_common.features import encode_features
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import RETRY_AFTER_KEY, SamplingParams, Slo, StopCondition
from wisp_common.verification import draft_distributions
from wisp_server.engines.base import EngineFull, RoundRequest, VerificationEngine
from wisp_server.estimator import SequenceShape
from wisp_server.ngram import NgramSpeculation
from wisp_server.scheduler import (
    BatchScheduler,
    ExpectedRound,
    PendingRound,
    RoundWithdrawn,
    SchedulerStopped,
    computed_shape,
)
from wisp_server.session import Session
from wisp_server.speculation_length import Load, goodput_optimal_drafts

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)


DRAINING = "the server is shutting down; resume the session on another server (or this one once it is back)"

_GONE = object()  # in a stream's inbox: the edge left (cancelled, disconnected, killed)
_DRAIN = object()  # in a stream's inbox: the server is shutting down
# A server-paced session's streamed rounds that a step looks through for one that fits, newest first.
STREAMED_ROUNDS_KEPT = 4
# Below it a sampled session's logits / temperature overflow float32; as the proto's float holds it.
MIN_TEMPERATURE = struct.unpack("<f", struct.pack("<f", 1e-5))[0]


class MalformedRequest:
    """A request whose bytes are no valid message. gRPC answers a deserializer's exception with INTERNAL; this
    stands in for the message instead, so the service refuses it with INVALID_ARGUMENT."""

    def __init__(self, error: DecodeError):
        self.error = error

    def refusal(self) -> RequestError:
        return RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid wisp.v1 message ({self.error}); send messages built from wisp.proto",
        )


def tolerant(parse: Callable[[bytes], Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """A request deserializer that returns a `MalformedRequest` where ``parse`` fails."""

    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return parse(data)
        except DecodeError as error:
            return MalformedRequest(error)

    return deserialize


class RequestError(Exception):
    """A request the server refuses; carries the gRPC status to answer with, and for capacity a retry hint."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms


class _EdgeLeft(Exception):
    """The edge is gone: nobody is left to answer, only the session to free."""


@dataclass(frozen=True)
class _StreamedRound:
    """A server-paced session's DraftRound, checked: drafts that follow its first ``position`` tokens."""

    round: int
    position: int
    drafts: tuple[int, ...]
    proposals: tuple  # one DraftDistribution | None per draft, or empty: all point masses
    branch: tuple[int, ...] = ()  # the second guess after the same position (point masses)


def resumed_seed(seed: int, committed: int) -> int:
    """The sampler seed of a seeded session resumed after ``committed`` tokens.

    Restarting the original seed's stream would reuse the random numbers that already chose the committed
    tokens, so the tokens after the resume would depend on those before in a way the target's distribution does
    not. A seed derived from both is a fresh stream, and the same one wherever the session resumes at that point.
    """
    digest = hashlib.blake2b(f"{seed}:{committed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 would mean "let the server choose"


class WispService(pb_grpc.WispServicer):
    def __init__(self, config: ServerConfig, engine: VerificationEngine, scheduler: BatchScheduler):
        self.config = config
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = scheduler.metrics
        self.ngram = NgramSpeculation.parse(config.generate_speculation)
        self._sessions: dict[str, Session] = {}
        self._warned_drafts: set[str] = set()  # target fingerprints of mismatched drafts already logged
        self._inboxes: dict[str, queue.Queue] = {}  # by session: its stream's requests, and _GONE / _DRAIN
        self._draining = False
        self._lock = threading.Lock()
        self._load: tuple[int, Load] | None = None  # the open sessions' load, as the verdicts of one batch see it

    # --- RPCs -----------------------------------------------------------------

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.refusal()))
        return pb.ServerInfo(
            target_model=self._target_identity(),
            engine=self.engine.name,
            policy=self.scheduler.policy.name,
            max_draft_tokens=self.config.max_draft_tokens,
            max_context_tokens=self.config.max_context_tokens,
            max_sessions=self.config.max_sessions,
            version=__version__,
        )

    def Speculate(
        self, request_iterator: Iterator[pb.SpeculateRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SpeculateResponse]:
        """One session. Its requests are read on a thread of their own into an inbox, so the handler wakes at once
        when the edge leaves (`context.add_callback`) or the server drains, and closes a session whose edge has
        sent nothing for `session_idle_timeout` (a stalled edge)."""
        session, in_flight = None, None  # in_flight: a step the server queued on its own for the session
        inbox: queue.Queue = queue.Queue()
        pump = (request_iterator, inbox, self.metrics.messages_received)
        threading.Thread(target=_pump, args=pump, name="wisp-stream", daemon=True).start()
        context.add_callback(lambda: self._edge_left(inbox, session))
        try:
            first = self._next_request(inbox)
            if first is None or first.WhichOneof("kind") != "open":
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "unknown session: a Speculate stream must start with an `open` message",
                )
            session = self._open(first.open, inbox)
            self.metrics.messages_sent.inc()
            yield pb.SpeculateResponse(
                opened=pb.SessionOpened(
                    session_id=session.session_id,
                    target_model=self._target_identity(),
                    position=len(session.context),
                    max_draft_tokens=self.config.max_draft_tokens,
                )
            )
            if first.open.server_paced:
                yield from self._paced(session, inbox, context)
                return
            while (message := self._next_request(inbox)) is not None:
                if (draft := self._draft_of(session, message)) is None:
                    return
                pending = self._submit_round(session, draft)
                session.round_arrived(pending.arrival)
                round_number = message.draft.round
                while pending is not None:  # the edge's round, then those the server decodes on its own
                    try:
                        verdict = self._verdict(session, round_number, pending)
                        if self._decodes_itself(session, verdict, context):
                            # Queued before the verdict is sent, so the next batch has it, as Generate does.
                            verdict.server_decoding, in_flight = True, self._queue_decode_step(session)
                        self.metrics.messages_sent.inc()
                        yield pb.SpeculateResponse(verdict=verdict)  # resumes once gRPC has sent it
                        if not (verdict.finished or verdict.server_decoding):
                            self._expect_next_round(session)  # before the engine thread chooses its next batch
                    finally:
                        pending.handled.set()
                    if verdict.finished:
                        return
                    if self._draining:  # the round in flight is done; the edge resumes elsewhere
                        raise RequestError(grpc.StatusCode.UNAVAILABLE, DRAINING)
                    if round_number != message.draft.round:
                        self.metrics.server_decoded_tokens.inc(verdict.HasField("next_token"))
                    # Verdict.round is a uint32: rounds the server decodes on its own after round 2**32-1 wrap.
                    pending, in_flight, round_number = in_flight, None, (round_number + 1) % 2**32
        except RequestError as error:
            self.metrics.refused.labels(error.code.name).inc()
            if session is not None:
                session.error_code = error.code.name
            if error.retry_after_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(error.retry_after_ms)),))
            context.abort(error.code, str(error))
        except _EdgeLeft:
            return
        finally:
            self._settle(in_flight)
            if session is not None:
                self._close(session)

    def _paced(
        self, session: Session, inbox: queue.Queue, context: grpc.ServicerContext
    ) -> Iterator[pb.SpeculateResponse]:
        """A server-paced session: a step per batch, each verifying the newest streamed drafts that still fit.

        A step is queued as the last one's verdict goes out, so its drafts are those streamed by then: one step
        old. They fit where their leading tokens are what that last step committed; the rest are verified, up
        to the goodput-optimal number at this load (`Session.next_drafts`)."""
        # The newest streamed rounds: an edge streams its guess of the step in flight (with a second guess, its
        # branch) and then more of it, and the step after verifies whichever fits.
        recent: deque[_StreamedRound] = deque(maxlen=STREAMED_ROUNDS_KEPT)
        rounds: deque[tuple[int, bool]] = deque()  # the DraftRound each queued step verifies drafts of; its branch?

        def step() -> PendingRound | None:
            while (item := _next_now(inbox)) is not _NOTHING:
                if item is None:
                    continue  # the edge's requests ended: no more drafts, the steps go on to the end
                if (draft := self._draft_of(session, self._request_of(item))) is None:
                    return None  # the edge closed the session
                recent.append(self._streamed(session, draft))
            drafts, proposals, verifies = (), (), (0, False)
            for streamed in reversed(recent):
                if (fitting := self._fitting(session, streamed)) is not None:
                    drafts, proposals, branch = fitting
                    verifies = (streamed.round, branch)
                    break
            rounds.append(verifies)
            return self._queue(session, drafts, proposals)

        with contextlib.closing(self._decode_steps(session, step, context)) as steps:
            for verdict, pending in steps:
                verdict.round, verdict.branch = rounds.popleft()
                verdict.accepted_token_ids.extend(pending.request.drafts[: verdict.num_accepted])
                self.metrics.server_decoded_tokens.inc(not pending.request.drafts and verdict.HasField("next_token"))
                self.metrics.messages_sent.inc()
                yield pb.SpeculateResponse(verdict=verdict)

    def _streamed(self, session: Session, draft: pb.DraftRound) -> _StreamedRound:
        """A server-paced session's DraftRound, checked: it may follow an older position, never a later one."""
        if draft.position > len(session.context):
            raise _misplaced(session, draft)
        branch = tuple(draft.branch_token_ids)
        self._check_drafts(branch, "branch")
        return _StreamedRound(draft.round, draft.position, *self._round_tokens(draft), branch)

    @staticmethod
    def _fitting(session: Session, streamed: _StreamedRound) -> tuple[tuple[int, ...], tuple, bool] | None:
        """The streamed drafts to verify now, their proposals, and whether they are the round's branch: those
        after what was committed since the round's position, from its first guess if its leading drafts are that
        and some follow, else from its branch if that fits so; at most `Session.next_drafts`."""
        committed = tuple(session.context[streamed.position :])
        start, end = len(committed), len(committed) + session.next_drafts
        for drafts, proposals, branch in ((streamed.drafts, streamed.proposals, False), (streamed.branch, (), True)):
            if len(drafts) > start and drafts[:start] == committed:
                return drafts[start:end], proposals[start:end], branch
        return None

    def _decode_steps(
        self,
        session: Session,
        queue_step: Callable[[], PendingRound | None],
        context: grpc.ServicerContext,
        advise: bool = True,
    ) -> Iterator[tuple[pb.Verdict, PendingRound]]:
        """Continuous batching: the session's steps, each queued before the last one's verdict is answered, so
        the next batch has it. ``queue_step`` queues one (None: the session ends after this verdict); ``advise``:
        the verdicts carry hints (a `Generate` stream has no edge to advise)."""
        in_flight = queue_step()
        try:
            while in_flight is not None:
                current, in_flight = in_flight, None
                try:
                    verdict = self._verdict(session, 0, current, advise)
                    if not verdict.finished and context.is_active():
                        in_flight = queue_step()
                    yield verdict, current
                finally:
                    current.handled.set()
        finally:
            self._settle(in_flight)

    def _next_request(self, inbox: queue.Queue) -> pb.SpeculateRequest | None:
        """The stream's next request (None: the edge closed its side), within the idle timeout."""
        timeout = self.config.session_idle_timeout
        try:
            item = inbox.get(timeout=timeout)
        except queue.Empty:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request from the edge in {timeout:g}s: the session is closed; reopen it with its committed "
                "tokens to resume",
            ) from None
        return self._request_of(item)

    @staticmethod
    def _request_of(item) -> pb.SpeculateRequest | None:
        """An inbox item as the request it is; raises for the edge leaving, the server draining, bad bytes."""
        if item is _DRAIN:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, DRAINING)
        if item is _GONE or isinstance(item, BaseException):
            raise _EdgeLeft
        if isinstance(item, MalformedRequest):
            raise item.refusal()
        return item

    @staticmethod
    def _draft_of(session: Session, message: pb.SpeculateRequest | None) -> pb.DraftRound | None:
        """An open session's request as its DraftRound; None where the edge closes the session."""
        kind = None if message is None else message.WhichOneof("kind")
        if message is None or kind == "close":
            return None
        if kind is None:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a SpeculateRequest sets none of `open`, `draft` or `close`; set exactly one",
            )
        if kind != "draft":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session.session_id} is already open; send `draft` or `close`, or open another "
                "session on a new stream",
            )
        return message.draft

    def _edge_left(self, inbox: queue.Queue, session: Session | None) -> None:
        """gRPC's callback when the stream ends; for an edge that left, the scheduler forgets its session at once
        (no batch held for its next round, its waiting round taken out) and the handler wakes to free it."""
        inbox.put(_GONE)
        if session is not None:
            self.scheduler.withdraw(session.session_id)

    def drain(self, grace: float) -> None:
        """Graceful shutdown: admits no more sessions, tells every session waiting for its edge UNAVAILABLE at
        once and the others as soon as their round in flight is answered, and waits up to ``grace`` seconds for
        them all to end."""
        with self._lock:
            self._draining = True
            inboxes = list(self._inboxes.values())
        for inbox in inboxes:
            inbox.put(_DRAIN)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._sessions:
                    return
            time.sleep(0.02)
        log.warning("%d sessions still open after the %gs grace period", len(self._sessions), grace)

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _decodes_itself(self, session: Session, verdict: pb.Verdict, context: grpc.ServicerContext) -> bool:
        """Whether the server decodes the session's next token itself: no draft pays at this load, and the edge
        said it accepts that. It saves the session a round trip per token until drafting pays again."""
        return (
            session.accept_server_decoding and session.next_drafts == 0 and not verdict.finished and context.is_active()
        )

    @staticmethod
    def _settle(in_flight: PendingRound | None) -> None:
        """A step queued for a client that left ends before its session does."""
        if in_flight is not None:
            with contextlib.suppress(Exception):
                in_flight.future.result()
            in_flight.handled.set()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        """The target alone: every round is an empty draft, or vLLM's n-gram proposals (--generate-speculation)."""
        session = None
        self.metrics.messages_received.inc()  # the request: a stream of one
        try:
            if isinstance(request, MalformedRequest):
                raise request.refusal()
            session = self._start_session(request.prompt_token_ids, [], request.sampling, request.stop, request.slo)
            steps = self._decode_steps(session, partial(self._queue_generate_step, session), context, advise=False)
            with contextlib.closing(steps):  # a step still queued is settled before the session closes
                for verdict, step in steps:
                    accepted = list(step.request.drafts[: verdict.num_accepted])
                    self.metrics.messages_sent.inc()
                    yield pb.GenerateResponse(
                        token_ids=accepted + ([verdict.next_token] if verdict.HasField("next_token") else []),
                        finished=verdict.finished,
                        finish_reason=verdict.finish_reason,
                    )
        except RequestError as error:
            self.metrics.refused.labels(error.code.name).inc()
            if session is not None:
                session.error_code = error.code.name
            if error.retry_after_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(error.retry_after_ms)),))
            context.abort(error.code, str(error))
        except _EdgeLeft:
            return
        finally:
            if session is not None:
                self._close(session)

    # --- sessions ---------------------------------------------------------------

    def _target_identity(self) -> pb.ModelIdentity:
        info = self.engine.info
        return pb.ModelIdentity(
            name=info.model_name,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            vocab_size=info.vocab_size,
            target_fingerprint=info.target_fingerprint,
        )

    def _check_draft_target(self, draft: pb.ModelIdentity) -> None:
        """A draft trained for other weights of the same tokenizer verifies losslessly but is rarely accepted."""
        ours = self.engine.info.target_fingerprint
        if not draft.target_fingerprint or not ours or draft.target_fingerprint == ours:
            return
        message = (
            f"draft {draft.name!r} was trained for target weights {draft.target_fingerprint!r}, but this server's "
            f"target {self.engine.info.model_name!r} has {ours!r}: its drafts would rarely be accepted; train a "
            "draft for this target (wisp-distill), or start the server with --draft-check warn to serve it anyway"
        )
        if self.config.draft_check == "refuse":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)
        if self.config.draft_check == "warn" and draft.target_fingerprint not in self._warned_drafts:
            self._warned_drafts.add(draft.target_fingerprint)
            log.warning(message)

    def _open(self, open_msg: pb.OpenSession, inbox: queue.Queue) -> Session:
        draft = open_msg.draft_model
        target = self.engine.info
        if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer mismatch: draft model {draft.name!r} has tokenizer fingerprint "
                f"{draft.tokenizer_fingerprint!r} but target {target.model_name!r} has "
                f"{target.tokenizer_fingerprint!r}; use a draft that shares the target's tokenizer",
            )
        self._check_draft_target(draft)
        sampling = open_msg.sampling
        if open_msg.committed_token_ids and sampling.seed:
            sampling = pb.SamplingParams()
            sampling.CopyFrom(open_msg.sampling)
            sampling.seed = resumed_seed(open_msg.sampling.seed, len(open_msg.committed_token_ids))
        session = self._start_session(
            open_msg.prompt_token_ids,
            open_msg.committed_token_ids,
            sampling,
            open_msg.stop,
            open_msg.slo,
            features=open_msg.return_features,
            known_features=open_msg.known_features,
            feature_layers=tuple(open_msg.feature_layers),
        )
        session.accept_server_decoding = open_msg.accept_server_decoding
        session.device_kind = open_msg.device.kind
        with self._lock:
            self._inboxes[session.session_id] = inbox
            if self._draining:  # began while the session was being admitted
                inbox.put(_DRAIN)
        return session

    def _start_session(
        self,
        prompt: Sequence[int],
        committed: Sequence[int],
        sampling: pb.SamplingParams,
        stop: pb.StopCondition,
        slo: pb.Slo,
        features: bool = False,
        known_features: int = 0,
        feature_layers: tuple[int, ...] = (),
    ) -> Session:
        if not prompt:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty; send at least one token")
        if len(prompt) + len(committed) >= self.config.max_context_tokens:  # first: a huge prompt costs no more
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"context of {len(prompt) + len(committed)} tokens leaves no room under the server's "
                f"max_context_tokens={self.config.max_context_tokens}; shorten the prompt",
            )
        if known_features > len(prompt) + len(committed):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"known_features={known_features} is more than the context's {len(prompt) + len(committed)} "
                "positions; send how many leading positions' features the edge holds",
            )
        if feature_layers and not features:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "feature_layers come with the features: set return_features too, or send no feature_layers",
            )
        prompt, committed = list(prompt), list(committed)
        self._check_token_ids(prompt + committed, "prompt")
        self._check_sampling(sampling)
        self._check_slo(slo)
        params = SamplingParams.from_proto(sampling)  # valid: `_check_sampling` is stricter than its `validate`
        session = Session(
            session_id=uuid.uuid4().hex,
            prompt_len=len(prompt),
            context=prompt + committed,
            sampling=params,
            stop=StopCondition.from_proto(stop, self.engine.info.eos_token_id, self.config.default_max_new_tokens),
            max_context_tokens=self.config.max_context_tokens,
            slo=Slo.from_proto(slo),
        )
        if session.room <= 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens is already reached")
        with self._lock:
            if self._draining or self.scheduler.stopped:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, DRAINING)
            if len(self._sessions) >= self.config.max_sessions:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is at its limit of {self.config.max_sessions} sessions; retry later",
                    self.config.retry_after_ms,
                )
            self._sessions[session.session_id] = session
            self.metrics.sessions_active.set(len(self._sessions))
        max_tokens = min(len(session.context) + session.room, self.config.max_context_tokens)
        try:
            self.engine.add_session(
                session.session_id,
                session.context,
                params,
                max_tokens,
                features,
                known_features if features else 0,
                feature_layers,
            )
        except (EngineFull, ValueError) as error:  # full, or a session this engine cannot serve
            with self._lock:
                self._sessions.pop(session.session_id, None)
                self.metrics.sessions_active.set(len(self._sessions))
            if isinstance(error, EngineFull):
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), self.config.retry_after_ms) from None
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        self.metrics.sessions.inc()
        return session

    def _expect_next_round(self, session: Session) -> None:
        """Tells the scheduler when the session's next round should arrive, so it may hold a batch for it."""
        session.verdict_sent_at = time.monotonic()
        if session.turnaround is None:  # known from the session's second round on
            return
        expected = ExpectedRound(
            at=session.verdict_sent_at + session.turnaround,
            turnaround=session.turnaround,
            shape=SequenceShape(len(session.context) - 1, 1 + session.next_drafts),
            expected_tokens=session.expected_tokens(session.next_drafts),
            deadline=session.deadline,
        )
        self.scheduler.expect(session.session_id, expected)

    def _close(self, session: Session) -> None:
        self.scheduler.expect(session.session_id, None)
        with self._lock:
            self._sessions.pop(session.session_id, None)
            self._inboxes.pop(session.session_id, None)
            self.metrics.sessions_active.set(len(self._sessions))
        self.engine.remove_session(session.session_id)
        self._record_end(session)

    def _record_end(self, session: Session) -> None:
        """How the session ended, for the metrics: its stop condition, a refusal, or its edge leaving first."""
        reason = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}.get(session.finish_reason)
        if reason is None:
            errors = {"": "cancelled", "UNAVAILABLE": "unavailable", "DEADLINE_EXCEEDED": "timeout"}
            reason = errors.get(session.error_code, "error")
        first, last, tokens = session.first_token_at, session.last_token_at, session.committed_here
        ttft = None if first is None else first - session.opened_at
        tpot = (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
        self.metrics.session_ended(session.device_kind, reason, session.slo, ttft, tpot, tokens)

    def _check_sampling(self, sampling: pb.SamplingParams) -> None:
        """Parameters the sampler cannot use would fail the whole batch the session is verified in."""
        temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
        vocab = self.engine.info.vocab_size
        if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
            problem = f"temperature {temperature:g} must be 0 (greedy) or finite and at least {MIN_TEMPERATURE:.0e}"
        elif not 0 <= top_p <= 1:
            problem = f"top_p {top_p:g} must be in (0, 1] (0 or 1: off)"
        elif top_k > vocab:
            problem = f"top_k {top_k} exceeds the target's vocabulary of {vocab} (0: off)"
        else:
            return
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid sampling parameters: {problem}")

    @staticmethod
    def _check_slo(slo: pb.Slo) -> None:
        """A NaN or infinite SLO would make the session's deadlines, and the scheduler's order, meaningless."""
        for name in ("ttft_seconds", "tpot_seconds"):
            value = getattr(slo, name)
            if not 0 <= value < math.inf:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"invalid SLO: {name} {value:g} must be finite and at least 0 seconds (0: none)",
                )

    def _check_token_ids(self, tokens: list[int], what: str) -> None:
        vocab = self.engine.info.vocab_size
        bad = [t for t in tokens if t >= vocab]
        if bad:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} has token ids outside the target's vocabulary of {vocab}: {bad[:5]}",
            )

    def _submit_round(self, session: Session, draft: pb.DraftRound) -> PendingRound:
        """Validates a round and queues it for verification; `_verdict` waits for it."""
        arrival = time.monotonic()  # the round's wait for the engine starts here, GIL included
        if draft.position != len(session.context):
            raise _misplaced(session, draft)
        return self._queue(session, *self._round_tokens(draft), arrival)

    def _round_tokens(self, draft: pb.DraftRound) -> tuple[tuple[int, ...], tuple]:
        """A round's drafts and their proposals, checked against the server's limits and the vocabulary."""
        self._check_drafts(draft.token_ids, "draft")
        try:
            return tuple(draft.token_ids), draft_distributions(draft, self.engine.info.vocab_size)
        except ValueError as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _check_drafts(self, drafts: Sequence[int], what: str) -> None:
        if len(drafts) > self.config.max_draft_tokens:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} of {len(drafts)} tokens exceeds the server's max_draft_tokens="
                f"{self.config.max_draft_tokens} (see GetServerInfo)",
            )
        self._check_token_ids(list(drafts), what)

    def _queue(
        self, session: Session, drafts: tuple[int, ...], proposals: tuple, arrival: float | None = None
    ) -> PendingRound:
        """Queues the session's next step, verifying ``drafts``; `_verdict` waits for it."""
        arrival = time.monotonic() if arrival is None else arrival
        # Drafts beyond the session's room could never be committed; don't verify them.
        drafts = drafts[: max(session.room - 1, 0)]
        proposals = () if session.sampling.greedy else proposals[: len(drafts)]
        uncached = self.engine.uncached_tokens(session.session_id)
        shape = SequenceShape(len(session.context) - uncached, uncached + len(drafts))
        pending = PendingRound(
            RoundRequest(session.session_id, drafts, proposals),
            shape,
            first=session.first_token_at is None,  # no round committed yet: the engine has not seen the session
            deadline=session.deadline,
            expected_tokens=session.expected_tokens(len(drafts)),
            arrival=arrival,
        )
        try:
            self.scheduler.submit(pending)
        except SchedulerStopped as error:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{error}; resume on another server") from None
        return pending

    def _queue_decode_step(self, session: Session) -> PendingRound:
        """Queues a target-only step (an empty draft)."""
        return self._queue(session, (), ())

    def _queue_generate_step(self, session: Session) -> PendingRound:
        """Queues a step of the target alone: an empty draft, or vLLM's n-gram proposals where they are on."""
        drafts = self.ngram.propose(session.context, session.room) if self.ngram else []
        return self._queue(session, tuple(drafts), ())

    def _verdict(self, session: Session, round_number: int, pending: PendingRound, advise: bool = True) -> pb.Verdict:
        """Waits for the round's verification, commits it to the session and builds the verdict, with hints for
        the edge's next round where ``advise``."""
        drafts = pending.request.drafts
        try:
            result = pending.future.result()
        except SchedulerStopped as error:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{error}; resume on another server") from None
        except RoundWithdrawn:
            raise _EdgeLeft from None
        except Exception as error:  # only this batch's sessions end; the engine serves on
            log.exception("round of session %s failed", session.session_id)
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"verification failed: {error!r}; the session is closed"
            ) from None
        commit = session.commit(drafts, result.verification)
        verdict = pb.Verdict(
            round=round_number,
            num_drafts=len(drafts),
            num_accepted=commit.num_accepted,
            finished=commit.finished,
            finish_reason=commit.finish_reason,
            position=len(session.context),
            timings=pb.Timings(
                queue_seconds=result.queue_seconds,
                verify_seconds=result.verify_seconds,
                batch_size=result.batch_size,
            ),
            hints=self._hints(session, result.batch) if advise else None,
        )
        if commit.next_token is not None:
            verdict.next_token = commit.next_token
        features = result.verification.features
        if features is not None:  # rows from the first position this round computed, up to the newest token's
            first = computed_shape(pending, result.verification).context_tokens
            verdict.features.CopyFrom(encode_features(first, features[: len(session.context) - 1 - first]))
        m = self.metrics
        m.rounds.inc()
        m.draft_tokens.inc(len(drafts))
        m.accepted_tokens.inc(commit.num_accepted)
        m.output_tokens.inc(commit.num_accepted + (commit.next_token is not None))
        m.round_verified(session.device_kind, len(drafts), commit.num_accepted)
        if pending.first:  # its context was looked up in the prefix cache
            m.prefix_cache_queries.inc(pending.shape.context_tokens + pending.shape.new_tokens - len(drafts))
            m.prefix_cache_hits.inc(result.verification.reused_tokens)
        if pending.first:
            m.first_token(session.device_kind, session.first_token_at - session.opened_at)
        waited = result.queue_seconds + result.verify_seconds  # from arrival to the batch's end
        verdict.timings.server_seconds = time.monotonic() - pending.arrival  # the verdict is built: it goes now
        m.round_overhead_seconds.observe(verdict.timings.server_seconds - waited)
        return verdict

    def _hints(self, session: Session, batch: int) -> pb.Hints:
        """What the edge's controller needs to size its next round: the goodput-optimal number of drafts at this
        load (the open sessions as the verdicts of ``batch`` see them), and what the round is expected to spend
        waiting and being verified."""
        with self._lock:
            if self._load is None or self._load[0] != batch:
                self._load = (batch, Load.of(s.next_round for s in self._sessions.values()))
            load = self._load[1]
        estimator = self.scheduler.estimator
        others_tokens, batch_seconds = load.others(session.session_id, estimator, self.config.max_batch_sessions - 1)
        session.next_drafts = goodput_optimal_drafts(
            session.acceptance, len(session.context), self.config.max_draft_tokens, others_tokens, batch_seconds
        )
        return pb.Hints(
            suggested_draft_tokens=session.next_drafts,
            active_sessions=len(load.shapes),
            est_queue_seconds=estimator.estimate(self.scheduler.waiting_shapes()),
            est_verify_seconds=batch_seconds(SequenceShape(len(session.context), 1 + session.next_drafts)),
        )


def _misplaced(session: Session, draft: pb.DraftRound) -> RequestError:
    return RequestError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"draft round {draft.round} follows position {draft.position}, but session {session.session_id} has "
        f"{len(session.context)} committed tokens",
    )


_NOTHING = object()  # what `_next_now` returns from an empty inbox


def _next_now(inbox: queue.Queue):
    """The inbox's next item without waiting, else `_NOTHING`."""
    try:
        return inbox.get_nowait()
    except queue.Empty:
        return _NOTHING


def _pump(requests: Iterator[pb.SpeculateRequest], inbox: queue.Queue, received: Counter) -> None:
    """Moves a stream's requests into its inbox, counting them (``received``: a counter); then None when the edge
    closes its side, or the error."""
    try:
        for request in requests:
            received.inc()
            inbox.put(request)
        inbox.put(None)
    except grpc.RpcError as error:  # the stream ended under it: cancelled, or the server aborted it
        inbox.put(error)
