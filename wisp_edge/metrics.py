"""The edge daemon's figures: per request in vLLM's shape, and as Prometheus metrics named ``wisp_edge_*``.

The speculative decoding counters mirror vLLM's (``vllm:spec_decode_num_drafts``,
``..._num_draft_tokens``, ``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos``)
so dashboards built for one read the other. A "draft" there is one verification
round that carried draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wisp_edge.client import GenerationStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class SpecDecodeStats:
    """One request's speculative decoding, with vLLM's names (its SpecDecodingStats)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    per_step_drafted: list[int] = field(default_factory=list)
    per_step_accepted: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, stats: GenerationStats) -> SpecDecodeStats:
        return cls(
            stats.draft_rounds,
            stats.sent,
            stats.accepted,
            list(stats.accepted_per_position),
            list(stats.per_step_drafted),
            list(stats.per_step_accepted),
        )

    def speculative_decoding(self, max_drafts: int) -> dict:
        """The response's ``metrics.speculative_decoding``, as vLLM's ``--per-request-spec-decode-metrics
        detailed`` writes it, so tools that read vLLM's (AIPerf) read ours."""
        k = max([max_drafts, *self.per_step_drafted])
        histogram = [0] * (k + 1)  # steps that accepted exactly j drafts
        for accepted in self.per_step_accepted:
            histogram[accepted] += 1
        steps = self.num_drafts
        return {
            "num_spec_steps": steps,
            "num_spec_tokens": k,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_draft_tokens": self.num_accepted_tokens,
            "mean_acceptance_length": 1 + self.num_accepted_tokens / steps if steps else 1.0,
            "draft_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            "acceptance_histogram": histogram,
            "num_accepted_tokens_per_pos": self.num_accepted_tokens_per_pos,
            "per_step_drafted": self.per_step_drafted,
            "per_step_accepted": self.per_step_accepted,
        }


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request adds to the metrics."""

    endpoint: str  # chat or completions
    outcome: str  # stop, length, cancelled (the HTTP client left), error
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float | None  # None: no token came
    tpot_seconds: float | None  # None: fewer than two tokens
    rounds: int
    spec_decode: SpecDecodeStats


class EdgeMetrics:
    """Prometheus metrics of one edge daemon, in a registry of their own (never the process-wide one)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "wisp_edge_requests", "Requests answered, by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.rejected = Counter(
            "wisp_edge_requests_rejected", "Requests refused with 429, by reason", ["reason"], registry=r
        )
        self.running = Gauge("wisp_edge_requests_running", "Requests being generated now", registry=r)
        self.ttft = Histogram(
            "wisp_edge_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "wisp_edge_time_per_output_token_seconds",
            "Mean time between tokens after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("wisp_edge_prompt_tokens", "Prompt tokens sent to the server", registry=r)
        self.generation_tokens = Counter("wisp_edge_generation_tokens", "Tokens committed", registry=r)
        self.rounds = Counter("wisp_edge_rounds", "Verification rounds", registry=r)
        self.num_drafts = Counter(
            "wisp_edge_spec_decode_num_drafts", "Verification rounds that carried drafts", registry=r
        )
        self.num_draft_tokens = Counter("wisp_edge_spec_decode_num_draft_tokens", "Draft tokens sent", registry=r)
        self.num_accepted_tokens = Counter(
            "wisp_edge_spec_decode_num_accepted_tokens", "Draft tokens the server accepted", registry=r
        )
        self.accepted_per_pos = Counter(
            "wisp_edge_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by their position in the round",
            ["position"],
            registry=r,
        )

    def record(self, request: RequestRecord) -> None:
        self.requests.labels(request.endpoint, request.outcome).inc()
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.completion_tokens)
        if request.ttft_seconds is not None:
            self.ttft.observe(request.ttft_seconds)
        if request.tpot_seconds is not None:
            self.tpot.observe(request.tpot_seconds)
        self.rounds.inc(request.rounds)
        spec = request.spec_decode
        self.num_drafts.inc(spec.num_drafts)
        self.num_draft_tokens.inc(spec.num_draft_tokens)
        self.num_accepted_tokens.inc(spec.num_accepted_tokens)
        for position, accepted in enumerate(spec.num_accepted_tokens_per_pos):
            self.accepted_per_pos.labels(str(position)).inc(accepted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
