"""Prometheus metrics of the ranking API: what an operator needs to see the request flow of
DESIGN.md (lookup → retrieve → features → predict → sort) per stage, and how often it bends.

Counters and histograms: requests by route and status, unexpected errors, degraded answers (the
ranker timed out or failed, so ads were ranked by retrieval score), fallbacks (cold-start vectors,
default features), candidates per request, stage latencies, release reloads (loaded / refused) and
a gauge per loaded release carrying its component versions as labels.

Per worker or aggregated: each uvicorn worker is its own process with its own counters. When
``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client`` is first imported (``serving.server
.run`` does this for more than one worker; it is prometheus-client's own convention), values are
written to per-process files in that folder and ``/metrics`` on any worker returns the sum over all
workers (gauges: one series per live worker, label ``pid``). Without it — one worker, tests —
``/metrics`` shows that process's registry. Each :class:`ServingMetrics` owns its registry, so
several apps in one process (tests) never collide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("lookup", "retrieve", "features", "predict", "sort", "total")
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Seconds; dense around the 15 ms p99 target of DESIGN.md."""
CANDIDATE_BUCKETS = (0, 10, 50, 100, 200, 300, 500, 750, 1000, 2000)


def multiprocess_dir() -> str | None:
    """The folder shared by all workers, when prometheus-client runs in multiprocess mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class ServingMetrics:
    """Every metric the API records, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "deepclick_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "deepclick_request_seconds", "HTTP request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "deepclick_rank_stage_seconds", "/v1/rank latency per stage", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "deepclick_errors", "unexpected errors (answered 500), by exception type", ["kind"],
            registry=r,
        )  # fmt: skip
        self.degraded = Counter(
            "deepclick_degraded", "answers ranked by retrieval score because the ranker "
            "timed out or failed", ["reason"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "deepclick_fallbacks", "fallbacks applied (cold-start vectors, default features, "
            "empty candidate sets)", ["kind"], registry=r,
        )  # fmt: skip
        self.candidates = Histogram(
            "deepclick_candidates", "candidates scored per /v1/rank request",
            buckets=CANDIDATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "deepclick_rejected", "/v1/rank requests answered 503 without ranking: overload "
            "(in-flight bound reached) or deadline (waited past it)", ["reason"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "deepclick_in_flight", "/v1/rank requests being served", multiprocess_mode="livesum",
            registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "deepclick_release_reloads",
            "release loads by outcome (loaded, refused, retry, fallback, degraded)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.release_loaded = Gauge(
            "deepclick_release_loaded", "1 for the release this worker serves, with its versions",
            ["release", "feature_spec", "embeddings", "index", "ranker"],
            multiprocess_mode="liveall", registry=r,
        )  # fmt: skip
        self._loaded_labels: tuple[str, ...] | None = None
        self.stage = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        """Each stage's latency series, resolved once (a ``labels`` lookup per stage and
        request cost more than the observation)."""

    def set_release(self, versions: Mapping[str, str]) -> None:
        """Point the loaded-release gauge at ``versions`` (the previous series drops to 0)."""
        labels = tuple(
            str(versions.get(k, ""))
            for k in ("release", "feature_spec", "embeddings", "index", "ranker")
        )
        if self._loaded_labels is not None and self._loaded_labels != labels:
            self.release_loaded.labels(*self._loaded_labels).set(0)
        self.release_loaded.labels(*labels).set(1)
        self._loaded_labels = labels

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type: all workers' values in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=folder)
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """One sample's value in this process (0 when absent) — for tests and health output."""
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if value is None else float(value)
