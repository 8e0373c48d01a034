"""What a generation request asks for: sampling, when to stop, and its SLO.

These dataclasses are the typed form of the protocol messages of the same
names; every backend and both daemons use them rather than raw protos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb

# Trailing metadata of a refusal, part of wisp.v1 (docs/protocol.md): milliseconds to wait before trying again
# (capacity, rate limits, a server still loading its target), and, on a loading server's UNAVAILABLE, that the
# server is coming up rather than failing.
RETRY_AFTER_KEY = "retry-after-ms"
SERVER_LOADING_KEY = "wisp-server-loading"


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p >= 1 are off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_proto(self) -> pb.SamplingParams:
        return pb.SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    @classmethod
    def from_proto(cls, msg: pb.SamplingParams) -> SamplingParams:
        # proto3 cannot tell an unset top_p from 0; both mean "off".
        return cls(msg.temperature, msg.top_p if msg.top_p > 0 else 1.0, msg.top_k, msg.seed)


@dataclass(frozen=True)
class StopCondition:
    """The server's resolved stop condition: EOS is folded into ``stop_token_ids``."""

    max_new_tokens: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_proto(cls, msg: pb.StopCondition, eos_token_id: int | None, default_max: int) -> StopCondition:
        stops = set(msg.stop_token_ids)
        if not msg.ignore_eos and eos_token_id is not None:
            stops.add(eos_token_id)
        return cls(msg.max_new_tokens or default_max, frozenset(stops))


@dataclass(frozen=True)
class Slo:
    """Per-request targets; a request meets its SLO when it meets both."""

    ttft_seconds: float = 0.0
    tpot_seconds: float = 0.0

    def to_proto(self) -> pb.Slo:
        return pb.Slo(ttft_seconds=self.ttft_seconds, tpot_seconds=self.tpot_seconds)

    @classmethod
    def from_proto(cls, msg: pb.Slo) -> Slo:
        return cls(msg.ttft_seconds, msg.tpot_seconds)
