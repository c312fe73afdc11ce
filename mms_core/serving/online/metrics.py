"""Prometheus metrics of one online server (its own registry, so two servers in one process,
as in tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mms_requests", "HTTP prediction requests by endpoint and status code.",
            ["endpoint", "code"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "mms_errors", "Requests answered with an error, by error code.", ["code"], registry=r
        )
        self.rows = Counter("mms_rows", "Rows predicted, by model version.", ["version"], registry=r)
        self.latency = Histogram(
            "mms_request_latency_seconds", "End-to-end request latency in the server.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_rows = Histogram(
            "mms_batch_rows", "Rows per forward pass sent to a replica (dynamic batching).",
            ["version"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "mms_replica_queue_depth", "Requests queued or in flight per replica.", ["replica", "version"],
            registry=r,
        )  # fmt: skip
        self.replica_latency = Gauge(
            "mms_replica_latency_ms", "Recent (EWMA) batch latency per replica.", ["replica", "version"],
            registry=r,
        )  # fmt: skip
        self.replica_memory = Gauge(
            "mms_replica_memory_bytes", "Resident memory of each replica's worker process.",
            ["replica", "version"], registry=r,
        )  # fmt: skip
        self.replica_failures = Counter(
            "mms_replica_failures", "Replicas taken out after a failed call or health check.", ["version"],
            registry=r,
        )  # fmt: skip

    def render(self, replicas: list[dict[str, object]]) -> bytes:
        """Exposition text; per-replica gauges are refreshed from ``replicas`` at scrape time."""
        self.queue_depth.clear()
        self.replica_latency.clear()
        self.replica_memory.clear()
        for rep in replicas:
            labels = {"replica": str(rep["id"]), "version": str(rep["version"])}
            self.queue_depth.labels(**labels).set(int(rep["queued"]) + int(rep["inflight"]))
            self.replica_latency.labels(**labels).set(float(rep["latency_ms"]))
            if "rss_bytes" in rep:
                self.replica_memory.labels(**labels).set(float(rep["rss_bytes"]))
        return generate_latest(self.registry)
