"""`ServerMetrics`: what the server exposes to Prometheus (names: `wisp_` prefix, units in the name).

One registry per server, so several servers can live in one process (tests,
benchmarks). The time split matters most: the engine's forward pass
(`wisp_verify_seconds`), the scheduler's own work per batch, choosing it and
recording its outcome (`wisp_schedule_seconds`) and the service's own bookkeeping per round
once its batch is verified (`wisp_round_overhead_seconds`: commit, building the verdict). A
round's wait (`wisp_queue_seconds`) runs from its arrival in the handler to its batch's start.

Per-session figures (TTFT, TPOT, SLO misses, how sessions ended, speculative
decoding) carry the labels `model_name`, `policy` and `device_kind`, the edge's
reported kind mapped to a fixed set by `wisp_common.device_kind.label_of`, so a
fleet of many devices never grows the number of series. The `wisp_spec_decode_*`
counters mirror vLLM's `vllm:spec_decode_*`, so the same dashboards read both.

`serve` answers `/metrics` and `/health` (200 while serving, 503 otherwise: the
model is loading, or the engine failed) on one port.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from wisp_common import __version__
from wisp_common.device_kind import label_of
from wisp_common.request import Slo

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SMALL_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
# vLLM's own TTFT and TPOT buckets, so the two servers' histograms line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
SESSION_LABELS = ("model_name", "policy", "device_kind")
# How a session ended: its stop condition (a stop token, the length limit); its edge closed or left first; the
# server went away under it (shutting down, or its engine failed: UNAVAILABLE, resume elsewhere); its edge went
# quiet (DEADLINE_EXCEEDED); or another refusal (its status is in wisp_refused_requests_total).
END_REASONS = ("stop", "length", "cancelled", "unavailable", "timeout", "error")


class ServerMetrics:
    def __init__(self, model_name: str = "", policy: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name, self.policy = model_name, policy
        r = self.registry
        self.sessions_active = Gauge("wisp_sessions_active", "Open Speculate and Generate sessions", registry=r)
        self.sessions = Counter("wisp_sessions_total", "Sessions opened", registry=r)
        self.refused = Counter("wisp_refused_requests_total", "Requests refused, by gRPC status", ["code"], registry=r)
        self.rounds = Counter("wisp_rounds_total", "Verification rounds", registry=r)
        self.draft_tokens = Counter("wisp_draft_tokens_total", "Draft tokens verified", registry=r)
        self.accepted_tokens = Counter("wisp_accepted_tokens_total", "Draft tokens accepted", registry=r)
        self.output_tokens = Counter("wisp_output_tokens_total", "Tokens committed to outputs", registry=r)
        messages = Counter(
            "wisp_stream_messages_total",
            "Messages of Speculate and Generate streams, by direction (each costs the server's Python gRPC a share of "
            "a core, whatever it carries)",
            ["direction"],
            registry=r,
        )
        self.messages_received, self.messages_sent = messages.labels("received"), messages.labels("sent")
        self.server_decoded_tokens = Counter(
            "wisp_server_decoded_tokens_total",
            "Tokens of Speculate sessions the server decoded on its own, where no draft paid",
            registry=r,
        )
        self.batch_size = Histogram(
            "wisp_batch_size", "Sessions per verification batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.batch_tokens = Histogram(
            "wisp_batch_tokens",
            "New tokens per verification batch: uncached context (prefill, last token) plus drafts",
            buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
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
        self.serving = Gauge(
            "wisp_serving",
            "1 while the server serves; 0 while its target loads, it shuts down or its engine failed",
            registry=r,
        )
        self.rounds_waiting = Gauge("wisp_rounds_waiting", "Rounds submitted and not yet in a batch", registry=r)
        self.kv_cache_usage = Gauge(
            "wisp_kv_cache_usage_ratio",
            "Share of the KV cache the open sessions have reserved, 0 to 1 (NaN: the engine does not bound it)",
            registry=r,
        )
        self.kv_cache_usage.set(float("nan"))
        self.engine_errors = Counter(
            "wisp_engine_errors_total", "Verification batches the engine failed (their rounds got INTERNAL)", registry=r
        )
        self.prefix_cache_queries = Counter(
            "wisp_prefix_cache_queries",
            "Context tokens of sessions' first rounds looked up in the engine's prefix cache (vLLM: "
            "prefix_cache_queries)",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "wisp_prefix_cache_hits",
            "Of those, tokens found there and not computed again: a conversation's earlier turns (vLLM: "
            "prefix_cache_hits; none on the hf engine or with --no-prefix-caching)",
            registry=r,
        )
        self.build = Info("wisp_build", "The server's release, target and policy", registry=r)
        self.build.info({"version": __version__, "model_name": model_name, "policy": policy})
        # Per session, labelled.
        self.ttft_seconds = Histogram(
            "wisp_ttft_seconds",
            "Time to first token: from a session's open to its first committed token, on the server",
            SESSION_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot_seconds = Histogram(
            "wisp_tpot_seconds",
            "Time per output token after the first, per session with at least two, on the server",
            SESSION_LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.slo_misses = Counter(
            "wisp_slo_misses_total",
            "Sessions that missed their SLO, by kind (ttft, tpot); one missing both counts in both",
            [*SESSION_LABELS, "kind"],
            registry=r,
        )
        self.slo_met = Counter(
            "wisp_slo_met_total",
            "Sessions with an SLO that ended by their stop condition and met both its TTFT and TPOT",
            SESSION_LABELS,
            registry=r,
        )
        self.slo_sessions = Counter(
            "wisp_slo_sessions_total", "Sessions with an SLO that ended, however they ended", SESSION_LABELS, registry=r
        )
        self.goodput_tokens = Counter(
            "wisp_goodput_tokens_total",
            "Output tokens of the sessions counted in wisp_slo_met_total",
            SESSION_LABELS,
            registry=r,
        )
        self.sessions_finished = Counter(
            "wisp_sessions_finished_total",
            f"Sessions that ended, by reason ({', '.join(END_REASONS)})",
            [*SESSION_LABELS, "reason"],
            registry=r,
        )
        self.spec_drafts = Counter(
            "wisp_spec_decode_num_drafts",
            "Rounds that carried drafts (vLLM: spec_decode_num_drafts)",
            SESSION_LABELS,
            registry=r,
        )
        self.spec_draft_tokens = Counter(
            "wisp_spec_decode_num_draft_tokens", "Draft tokens verified", SESSION_LABELS, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "wisp_spec_decode_num_accepted_tokens", "Draft tokens accepted", SESSION_LABELS, registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "wisp_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of their round (0: the first draft)",
            [*SESSION_LABELS, "position"],
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._http: WSGIServer | None = None

    def _labels(self, device_kind: str) -> tuple[str, str, str]:
        return self.model_name, self.policy, label_of(device_kind)

    def round_verified(self, device_kind: str, drafts: int, accepted: int) -> None:
        """A session's round: its drafts and how many of them, a prefix, the target accepted."""
        labels = self._labels(device_kind)
        if drafts:
            self.spec_drafts.labels(*labels).inc()
        self.spec_draft_tokens.labels(*labels).inc(drafts)
        self.spec_accepted_tokens.labels(*labels).inc(accepted)
        for position in range(accepted):
            self.spec_accepted_per_pos.labels(*labels, str(position)).inc()

    def first_token(self, device_kind: str, seconds: float) -> None:
        self.ttft_seconds.labels(*self._labels(device_kind)).observe(seconds)

    def session_ended(
        self, device_kind: str, reason: str, slo: Slo, ttft: float | None, tpot: float | None, tokens: int
    ) -> None:
        """How the session ended, and whether it met its SLO (``ttft``: None without a token; ``tpot``: None
        under two tokens, which cannot miss it)."""
        labels = self._labels(device_kind)
        self.sessions_finished.labels(*labels, reason).inc()
        if tpot is not None:
            self.tpot_seconds.labels(*labels).observe(tpot)
        if slo.ttft_seconds <= 0 and slo.tpot_seconds <= 0:
            return
        self.slo_sessions.labels(*labels).inc()
        missed_ttft = slo.ttft_seconds > 0 and (ttft is None or ttft > slo.ttft_seconds)
        missed_tpot = slo.tpot_seconds > 0 and tpot is not None and tpot > slo.tpot_seconds
        for kind, missed in (("ttft", missed_ttft), ("tpot", missed_tpot)):
            if missed:
                self.slo_misses.labels(*labels, kind).inc()
        if reason in ("stop", "length") and not (missed_ttft or missed_tpot):
            self.slo_met.labels(*labels).inc()
            self.goodput_tokens.labels(*labels).inc(tokens)

    def serve(self, host: str, port: int, serving: Callable[[], bool]) -> int:
        """Serves /metrics and /health over HTTP in a thread; returns the port (useful with 0).

        ``serving`` says whether the server serves now: /health answers 200 if so, else 503.
        """
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/health":
                up = serving()
                start_response("200 OK" if up else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"SERVING\n" if up else b"NOT_SERVING\n"]
            return metrics_app(environ, start_response)

        server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        self._http = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="wisp-metrics", daemon=True).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scraper never holds up a health probe."""

    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape and probe."""

    def log_message(self, format: str, *args: object) -> None:
        pass
