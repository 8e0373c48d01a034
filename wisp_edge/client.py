"""`EdgeClient`: runs one generation as a Speculate session against the server.

Each round the drafter proposes tokens, the server's verdict says how many
stand and which token follows, and the drafter rolls back to match. Callers
see only committed tokens, which are exactly the target's own.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.proto.wisp.v1 import wisp_pb2_grpc as pb_grpc
from wisp_common.request import SamplingParams, Slo
from wisp_edge.drafter import Drafter


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    ttft_seconds: float = 0.0
    wall_seconds: float = 0.0
    draft_seconds: float = 0.0
    server_queue_seconds: float = 0.0
    server_verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

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
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_round": round(self.tokens_per_round, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "ttft_seconds": round(self.ttft_seconds, 4),
            "wall_seconds": round(self.wall_seconds, 3),
        }


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class EdgeClient:
    def __init__(
        self,
        channel: grpc.Channel,
        drafter: Drafter,
        draft_identity: pb.ModelIdentity,
        device: pb.DeviceInfo | None = None,
    ):
        self.stub = pb_grpc.WispStub(channel)
        self.drafter = drafter
        self.draft_identity = draft_identity
        self.device = device or pb.DeviceInfo()

    def server_info(self, timeout: float = 10.0) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout)

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
        """Generates up to ``max_new_tokens`` tokens; ``on_tokens`` sees each round's commit."""
        stats = GenerationStats()
        started = time.monotonic()
        requests: queue.Queue[pb.SpeculateRequest | None] = queue.Queue()
        responses = self.stub.Speculate(_drain(requests))
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
                    )
                )
            )
            opened = next(responses).opened
            draft_len = min(draft_tokens, opened.max_draft_tokens)
            self.drafter.start(prompt_ids)
            generated: list[int] = []
            position = opened.position
            while True:
                t0 = time.monotonic()
                drafts = self.drafter.draft(min(draft_len, max_new_tokens - len(generated) - 1))
                stats.draft_seconds += time.monotonic() - t0
                requests.put(
                    pb.SpeculateRequest(draft=pb.DraftRound(round=stats.rounds, position=position, token_ids=drafts))
                )
                verdict = next(responses).verdict
                next_token = verdict.next_token if verdict.HasField("next_token") else None
                self.drafter.commit(drafts, verdict.num_accepted, next_token)
                committed = drafts[: verdict.num_accepted] + ([] if next_token is None else [next_token])
                if not generated:
                    stats.ttft_seconds = time.monotonic() - started
                generated += committed
                position = verdict.position
                stats.rounds += 1
                stats.drafted += len(drafts)
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


def _drain(requests: queue.Queue[pb.SpeculateRequest | None]) -> Iterator[pb.SpeculateRequest]:
    while (item := requests.get()) is not None:
        yield item
