"""`ServerMetrics`: what the server exposes to Prometheus (names: `wisp_` prefix, units in the name).

One registry per server, so several servers can live in one process (tests,
benchmarks). The time split matters most: the engine's forward pass
(`wisp_verify_seconds`), the scheduler's own work per batch, choosing it and
recording its outcome (`wisp_schedule_seconds`) and the service's own bookkeeping per round
once its batch is verified (`wisp_round_overhead_seconds`: commit, building the verdict). A
round's wait (`wisp_queue_seconds`) runs from its arrival in the handler to its batch's start.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SMALL_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("wisp_sessions_active", "Open Speculate and Generate sessions", registry=r)
        self.sessions = Counter("wisp_sessions_total", "Sessions opened", registry=r)
        self.refused = Counter("wisp_refused_requests_total", "Requests refused, by gRPC status", ["code"], registry=r)
        self.rounds = Counter("wisp_rounds_total", "Verification rounds", registry=r)
        self.draft_tokens = Counter("wisp_draft_tokens_total", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter("wisp_accepted_tokens_total", "Draft tokens accepted", registry=r)
        self.output_tokens = Counter("wisp_output_tokens_total", "Tokens committed to outputs", registry=r)
        self.server_decoded_tokens = Counter(
            "wisp_server_decoded_tokens_total",
            "Tokens of Speculate sessions the server decoded on its own, where no draft paid",
            registry=r,
        )
        self.batch_size = Histogram(
            "wisp_batch_size", "Sessions per verification batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.verify_seconds = Histogram(
            "wisp_verify_seconds", "Engine time per batch (forward, acceptance)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "wisp_queue_seconds", "From a round's arrival to its batch's start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.schedule_seconds = Histogram(
            "wisp_schedule_seconds",
            "Scheduler time per batch besides the engine: choosing it, then recording its outcome",
            buckets=SMALL_BUCKETS,
            registry=r,
        )
        self.round_overhead_seconds = Histogram(
            "wisp_round_overhead_seconds",
            "Service time per round after its batch: commit, building the verdict",
            buckets=SMALL_BUCKETS,
            registry=r,
        )
        self.estimator_mape = Gauge(
            "wisp_estimator_mape_percent", "Verification time estimator: recent mean absolute % error", registry=r
        )

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP; returns the port (useful with 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
