"""A generation session as the server sees it: its context and when it must stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_common.proto.wisp.v1 import wisp_pb2 as pb
from wisp_common.request import SamplingParams, Slo, StopCondition
from wisp_common.verification import Verification


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

    @property
    def generated(self) -> int:
        return len(self.context) - self.prompt_len

    @property
    def room(self) -> int:
        """Tokens this session may still commit."""
        return min(self.stop.max_new_tokens - self.generated, self.max_context_tokens - len(self.context))

    def commit(self, drafts: tuple[int, ...], verification: Verification) -> Commit:
        """Appends the verdict's tokens, truncated at the first stop token or the length limit."""
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
        accepted = min(verification.num_accepted, len(tokens))
        next_token = tokens[-1] if len(tokens) > accepted else None
        return Commit(accepted, next_token, reason)
