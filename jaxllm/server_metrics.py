"""The server's Prometheus metrics (``GET /metrics``, text format 0.0.4), one registry per server.

| metric | type | meaning |
|---|---|---|
| ``jaxllm_requests_total{finish_reason}`` | counter | completion requests that ended: ``stop``, ``length``, ``cancelled`` (shutdown deadline), ``disconnected`` (the client left), ``error`` (the engine failed) |
| ``jaxllm_requests_refused_total{status}`` | counter | completion requests answered with an error before they ran, by HTTP status |
| ``jaxllm_prompt_tokens_total`` | counter | prompt tokens of the requests admitted |
| ``jaxllm_generation_tokens_total`` | counter | tokens the engine generated |
| ``jaxllm_queue_length`` | gauge | requests admitted and waiting for a slot |
| ``jaxllm_running_requests`` | gauge | requests holding a slot |
| ``jaxllm_slot_occupancy`` | gauge | running requests / slots (0 to 1) |
| ``jaxllm_time_to_first_token_seconds`` | histogram | submit to first token, engine clock |
| ``jaxllm_time_between_tokens_seconds`` | histogram | between consecutive tokens of a request, engine clock |
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters and histograms updated by the server; gauges read when scraped."""

    def __init__(self, slots: int, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "jaxllm_requests", "Completion requests that ended", ["finish_reason"], registry=r
        )
        self.refused = Counter(
            "jaxllm_requests_refused",
            "Completion requests refused before they ran",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "jaxllm_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generated_tokens = Counter(
            "jaxllm_generation_tokens", "Tokens the engine generated", registry=r
        )
        Gauge("jaxllm_queue_length", "Requests waiting for a slot", registry=r).set_function(
            waiting
        )
        Gauge("jaxllm_running_requests", "Requests holding a slot", registry=r).set_function(
            running
        )
        Gauge("jaxllm_slot_occupancy", "Running requests / slots", registry=r).set_function(
            lambda: running() / slots
        )
        self.ttft = Histogram(
            "jaxllm_time_to_first_token_seconds",
            "Submit to first token (s)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tbt = Histogram(
            "jaxllm_time_between_tokens_seconds",
            "Between consecutive tokens of a request (s)",
            buckets=TBT_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
