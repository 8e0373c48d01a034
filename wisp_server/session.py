"""A generation session as the server sees it: its context and when it must stop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams, Slo, StopCondition
from wisp_common.verification import Verification
from wisp_server.estimator import SequenceShape
from wisp_server.speculation_length import NextRound, expected_tokens


@dataclass(frozen=True)
class Commit:
    """What one verdict adds to the context, after the stop condition is applied."""

    num_accepted: int
    next_token: int | None
    finish_reason: int  # pb.FinishReason; FINISH_REASON_UNSPECIFIED while running

    @property
    def finished(self) -> bool:
        return self.finish_reason != pb.FINISH_REASON_UNSPECIFIED


@dataclass
class Session:
    session_id: str
    prompt_len: int
    context: list[int]  # prompt plus generated tokens
    sampling: SamplingParams
    stop: StopCondition
    max_context_tokens: int
    slo: Slo = field(default_factory=Slo)
    opened_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    drafted: int = 0
    accepted: int = 0
    next_drafts: int = 0  # the drafts its last hint suggested: its expected share of the next batch
    accept_server_decoding: bool = False  # the edge takes tokens the server decodes on its own
    verdict_sent_at: float | None = None  # when its last verdict left (monotonic)
    turnaround: float | None = None  # smoothed: from a verdict's sending to the next round's arrival
    device_kind: str = ""  # the edge's DeviceInfo.kind, for metric labels
    last_token_at: float | None = None  # when this stream last committed a token (monotonic)
    committed_here: int = 0  # tokens this stream committed (a resumed session's earlier ones are not counted)
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED  # of its last commit
    error_code: str = ""  # the gRPC status of the refusal that ended the stream, if one did

    def round_arrived(self, at: float) -> None:
        """Learns the session's turnaround (network both ways, drafting) from a round arriving at ``at``."""
        if self.verdict_sent_at is None:
            return
        took = at - self.verdict_sent_at
        self.turnaround = took if self.turnaround is None else 0.7 * self.turnaround + 0.3 * took

    @property
    def generated(self) -> int:
        return len(self.context) - self.prompt_len

    @property
    def room(self) -> int:
        """Tokens this session may still commit."""
        return min(self.stop.max_new_tokens - self.generated, self.max_context_tokens - len(self.context))

    @property
    def acceptance(self) -> float:
        """Smoothed per-draft acceptance rate, 0.5 before any evidence."""
        return (self.accepted + 1) / (self.drafted + 2)

    def expected_tokens(self, drafts: int) -> float:
        """Tokens a round with ``drafts`` drafts is expected to commit."""
        return expected_tokens(self.acceptance, drafts)

    @property
    def next_round(self) -> NextRound:
        """Its next round as the last hint sized it, for the server's `Load`."""
        return NextRound(
            self.session_id,
            SequenceShape(len(self.context), 1 + self.next_drafts),
            self.expected_tokens(self.next_drafts),
        )

    @property
    def deadline(self) -> float:
        """When the session needs its next token to stay on its SLO schedule (monotonic seconds).

        The first token is due TTFT after the session opened; token g+1 is due
        g TPOTs after the first. A session ahead of schedule has slack; one
        behind it is late. Without an SLO there is no deadline.
        """
        if self.first_token_at is None:
            return self.opened_at + self.slo.ttft_seconds if self.slo.ttft_seconds > 0 else math.inf
        if self.slo.tpot_seconds <= 0:
            return math.inf
        return self.first_token_at + self.slo.tpot_seconds * self.generated

    def commit(self, drafts: tuple[int, ...], verification: Verification) -> Commit:
        """Appends the verdict's tokens, truncated at the first stop token or the length limit."""
        self.drafted += len(drafts)
        self.accepted += verification.num_accepted
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        tokens = list(drafts[: verification.num_accepted]) + [verification.next_token]
        reason = pb.FINISH_REASON_UNSPECIFIED
        for i, token in enumerate(tokens):
            if token in self.stop.stop_token_ids:
                tokens, reason = tokens[: i + 1], pb.FINISH_REASON_STOP
                break
        if len(tokens) >= self.room:
            if reason == pb.FINISH_REASON_UNSPECIFIED or len(tokens) > self.room:
                reason = pb.FINISH_REASON_LENGTH
            tokens = tokens[: self.room]
        self.context += tokens
        self.committed_here += len(tokens)
        self.last_token_at = time.monotonic()
        self.finish_reason = reason
        accepted = min(verification.num_accepted, len(tokens))
        next_token = tokens[-1] if len(tokens) > accepted else None
        return Commit(accepted, next_token, reason)
