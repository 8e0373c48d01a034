"""What the server itself saw during a load point, from its Prometheus `/metrics` (read by Prometheus' own parser)."""

from __future__ import annotations

from urllib.request import urlopen


def scrape(port: int) -> dict[str, float]:
    """Every sample of the server's metrics, summed over label values."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def during(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """The server's figures between two scrapes: batches, their mean size and time, the estimator's error, the
    server's own time per round, and its messages and CPU time per output token."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches, tokens = delta("wisp_batch_size_count"), delta("wisp_output_tokens_total")
    messages = delta("wisp_stream_messages_total")  # both directions
    return {
        "batches": batches,
        "mean_batch_size": delta("wisp_batch_size_sum") / batches if batches else None,
        "mean_verify_ms": 1000 * delta("wisp_verify_seconds_sum") / batches if batches else None,
        "mean_queue_ms": 1000 * delta("wisp_queue_seconds_sum") / max(1.0, delta("wisp_queue_seconds_count")),
        "estimator_mape_percent": after.get("wisp_estimator_mape_percent"),
        # The server's own time per round once its batch is verified: committing it and building its verdict.
        "mean_round_overhead_ms": 1000
        * delta("wisp_round_overhead_seconds_sum")
        / max(1.0, delta("wisp_round_overhead_seconds_count")),
        "server_draft_tokens": delta("wisp_draft_tokens_total"),
        "server_accepted_tokens": delta("wisp_accepted_tokens_total"),
        "server_decoded_tokens": delta("wisp_server_decoded_tokens_total"),
        "refused": delta("wisp_refused_requests_total"),  # opens and calls refused (full, rate-limited, bad)
        # What each output token cost the server's host: its stream messages, and its process's CPU (the engine's
        # too where it computes in the process; the modeled engine's GPU time is a sleep, so there it is all host).
        "messages_per_token": messages / tokens if tokens else None,
        "server_cpu_ms_per_token": 1000 * delta("process_cpu_seconds_total") / tokens if tokens else None,
    }
