"""`EdgeClient`: runs one generation as a Speculate session against the server.

Each round the drafter proposes tokens until the `SpeculationController`
says send; the server's verdict says how many stand and which token
follows, and the drafter rolls back to match. With pipelining on, the edge
keeps drafting while a round is out for verification, as if every draft will
be accepted; that work is kept when the verdict proves it right (all drafts
accepted and the bonus token guessed), else dropped. Callers see only
committed tokens, which are exactly the target's own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from wisp_common.features import decode_features
from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import SamplingParams, Slo
from wisp_edge.controller import FixedLength, RoundTiming, SpeculationController, SpeculationMode
from wisp_edge.drafter import Drafter


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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.sent if self.sent else 0.0

    @property
    def wasted(self) -> int:
        """Drafted tokens that never made it into the output: rejected, after a rejection, or discarded."""
        return self.drafted - self.accepted

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> dict[str, float]:
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
        }


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
    ):
        """``server_decoding``: let the server decode the session itself where no draft pays at its load."""
        self.stub = pb_grpc.WispStub(channel)
        self.drafter = drafter
        self.draft_identity = draft_identity
        self.device = device or pb.DeviceInfo()
        self.speculation = speculation
        self.pipeline = pipeline
        self.server_decoding = server_decoding
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
    ) -> GenerationResult:
        """Generates up to ``max_new_tokens`` tokens; ``draft_tokens`` caps a round; ``on_tokens`` sees commits."""
        stats = GenerationStats()
        started = time.monotonic()
        requests: queue.Queue[pb.SpeculateRequest | None] = queue.Queue()
        responses = self.stub.Speculate(_drain(requests))
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_read, args=(responses, inbox), daemon=True).start()
        try:
            requests.put(
                pb.SpeculateRequest(
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
                        accept_server_decoding=self.server_decoding,
                    )
                )
            )
            opened = _next(inbox)[1].opened
            controller = self.speculation(min(draft_tokens, opened.max_draft_tokens))
            timing = RoundTiming(tpot_slo=slo.tpot_seconds)
            self.drafter.start(prompt_ids)
            generated: list[int] = []
            position = opened.position
            server_decoding = False  # the server is decoding on its own: its verdicts come without rounds
            while True:
                room = max_new_tokens - len(generated) - 1  # the verdict's own token always comes on top
                count = 0 if server_decoding else self._round_length(controller, timing, room, stats)
                drafts, signals = self.drafter.pending[:count], self.drafter.signals[:count]
                if not server_decoding:
                    round_ = pb.DraftRound(round=stats.rounds, position=position, token_ids=drafts)
                    requests.put(pb.SpeculateRequest(draft=round_))
                sent_at, pipelined = time.monotonic(), stats.pipelined
                arrived, response = self._await_verdict(inbox, controller, count, room, stats)
                verdict, pipelined = response.verdict, stats.pipelined - pipelined
                decoded_by_server = server_decoding
                if decoded_by_server:
                    stats.server_decoded += verdict.HasField("next_token")
                else:
                    # Up to the verdict's arrival: a draft step running then is the edge's time, not the trip's.
                    stats.round_trip_seconds += arrived - sent_at
                    round_trip = arrived - sent_at - verdict.timings.queue_seconds - verdict.timings.verify_seconds
                    timing.rtt = 0.8 * timing.rtt + 0.2 * max(0.0, round_trip) if stats.rounds else max(0.0, round_trip)
                    controller.observe(signals, count, verdict.num_accepted)
                timing.queue, timing.verify = verdict.hints.est_queue_seconds, verdict.hints.est_verify_seconds
                timing.suggested_drafts = verdict.hints.suggested_draft_tokens
                server_decoding = verdict.server_decoding

                next_token = verdict.next_token if verdict.HasField("next_token") else None
                features = decode_features(verdict.features) if verdict.HasField("features") else None
                self.drafter.commit(verdict.num_accepted, next_token, features)
                stats.pipelined_kept += min(pipelined, len(self.drafter.pending))
                if self.round_log is not None:
                    self.round_log.append((signals, count, verdict.num_accepted))
                committed = drafts[: verdict.num_accepted] + ([] if next_token is None else [next_token])
                if not generated:
                    stats.ttft_seconds = time.monotonic() - started
                generated += committed
                position = verdict.position
                stats.rounds += not decoded_by_server  # verification rounds: the server's own steps are not
                stats.sent += count
                stats.accepted += verdict.num_accepted
                stats.server_queue_seconds += verdict.timings.queue_seconds
                stats.server_verify_seconds += verdict.timings.verify_seconds
                if on_tokens is not None:
                    on_tokens(committed)
                if verdict.finished:
                    break
            requests.put(pb.SpeculateRequest(close=pb.CloseSession()))
            stats.generated = len(generated)
            stats.wall_seconds = time.monotonic() - started
            reason = pb.FinishReason.Name(verdict.finish_reason).removeprefix("FINISH_REASON_").lower()
            return GenerationResult(generated, reason, stats)
        finally:
            requests.put(None)
            responses.cancel()

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
        self, inbox: queue.Queue, controller, sent: int, room: int, stats
    ) -> tuple[float, pb.SpeculateResponse]:
        """Waits for the round's verdict (returns its arrival time too); with pipelining, drafts meanwhile."""
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
        response = _next(inbox)
        stats.idle_seconds += time.monotonic() - started
        return response


def _next(inbox: queue.Queue) -> tuple[float, pb.SpeculateResponse]:
    arrived, item = inbox.get()
    if isinstance(item, BaseException):
        raise item
    if item is None:
        raise RuntimeError("the server closed the stream before the verdict")
    return arrived, item


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
