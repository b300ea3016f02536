"""The server's Prometheus metrics, kept in a registry of the app's own (never the process-global
one), so several apps in one process count separately."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by route, method and status; request latency by route; images per forward pass
    and requests waiting, by model; reloads by model and outcome."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "defectscope_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "defectscope_request_duration_seconds",
            "Time from request to answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "defectscope_batch_size",
            "Images scored in one forward pass, by model",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "defectscope_queue_depth", "Requests waiting for a batch, by model", ["model"], registry=r
        )
        self.reloads = Counter(
            "defectscope_model_reloads",
            "Model reloads, by model and outcome (ok, failed)",
            ["model", "outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
