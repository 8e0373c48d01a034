"""What one request looked like from its client: the raw record every metric is computed from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    """One request (a session or a centralized stream), timed on the benchmark's clock in seconds.

    ``token_times`` holds the arrival time at the client of every output token: the tokens of one verdict arrive
    together. Counters of speculation are zero for centralized requests.
    """

    config: str  # wisp, sled, fcfs, centralized, ...
    device: str  # the emulated device's id
    device_class: str  # its profile, e.g. jetson-orin-nano
    prompt_index: int
    category: str  # the prompt's category ("" if the prompt file has none)
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds
    sent_at: float  # when the client issued the request
    token_times: list[float] = field(default_factory=list)
    rounds: int = 0  # verification rounds
    drafted: int = 0  # draft tokens the device produced
    sent: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the target accepted
    server_decoded: int = 0  # output tokens the server decoded itself (no drafts)
    idle_seconds: float = 0.0  # time the device waited for verdicts with nothing to draft
    branches: int = 0  # server-paced: second guesses streamed (`Drafter.branch`)
    branches_verified: int = 0  # of those, the ones a step verified drafts of
    # Where a round's time goes, summed over the request's rounds (`round_anatomy`):
    round_trip_seconds: float = 0.0  # from sending each round to its verdict's arrival
    queue_seconds: float = 0.0  # of that, waiting for a batch (the server's timing)
    verify_seconds: float = 0.0  # of that, the batch's verification
    draft_seconds: float = 0.0  # drafting, pipelined drafts included
    error: str = ""  # non-empty: the request failed (its status and message)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)
