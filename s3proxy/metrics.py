"""Prometheus metrics, owned by the app (one registry per app, so tests can run several).

No label ever carries an asset name or a token.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_FIRST_BYTE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """With server.workers > 1 the supervisor sets PROMETHEUS_MULTIPROC_DIR before any
    worker imports prometheus_client: values then live in files there, and a scrape of
    any worker reports the whole process group."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: prometheus-client validates and locks
        on every `labels()` call, which the hot path pays per request otherwise. Label
        values are bounded sets (methods aiohttp parses, statuses, tiers, sources)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "s3proxy_requests_total", "HTTP requests answered", ["method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "s3proxy_request_duration_seconds",
            "Time from request to the last byte sent",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.response_bytes = Counter(
            "s3proxy_response_bytes", "Body bytes sent to clients", registry=r
        )
        self.inflight = Gauge(
            "s3proxy_inflight_requests",
            "Requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.auth_failures = Counter(
            "s3proxy_auth_failures_total", "Rejected requests", ["reason"], registry=r
        )
        self.upstream_requests = Counter(
            "s3proxy_upstream_requests_total",
            "S3 requests by operation and outcome",
            ["op", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "s3proxy_upstream_request_duration_seconds",
            "Time until S3 answered (headers for a GET)",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_bytes = Counter(
            "s3proxy_upstream_bytes", "Body bytes read from S3", registry=r
        )
        self.cache_hits = Counter(
            "s3proxy_cache_hits_total", "Blocks found in a cache tier", ["tier"], registry=r
        )
        self.cache_misses = Counter(
            "s3proxy_cache_misses_total", "Blocks not found in a cache tier", ["tier"], registry=r
        )
        self.cache_evictions = Counter(
            "s3proxy_cache_evictions_total",
            "Blocks evicted from a cache tier",
            ["tier"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "s3proxy_cache_bytes",
            "Block bytes held by a cache tier",
            ["tier"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_max_bytes = Gauge(
            "s3proxy_cache_max_bytes",
            "Bound of a cache tier",
            ["tier"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_corrupt_blocks = Counter(
            "s3proxy_cache_corrupt_blocks_total",
            "Block files discarded for a wrong length or checksum (then refetched)",
            ["tier"],
            registry=r,
        )
        self.coalesced_waits = Counter(
            "s3proxy_coalesced_waits_total",
            "Block reads that joined a fetch already in flight",
            registry=r,
        )
        self.readahead_blocks = Counter(
            "s3proxy_readahead_blocks_total",
            "Blocks fetched ahead of a sequential reader",
            registry=r,
        )
        self.readahead_wasted_bytes = Counter(
            "s3proxy_readahead_wasted_bytes",
            "Bytes fetched ahead and never read: evicted from memory unread, dropped with "
            "their version, or received for a block its fetch did not finish",
            registry=r,
        )
        self.readahead_unread_bytes = Gauge(
            "s3proxy_readahead_unread_bytes",
            "Bytes fetched ahead that are in memory and not read yet",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_disk_writes_dropped = Counter(
            "s3proxy_cache_disk_writes_dropped_total",
            "Blocks not written to the file tier: too many writes were pending, or it failed",
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "s3proxy_time_to_first_byte_seconds",
            "From a request to its first body byte, by where that byte came from",
            ["source"],
            buckets=_FIRST_BYTE_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "s3proxy_ready",
            "1 while the upstream answered a probe recently",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.build_info = Gauge(
            "s3proxy_build_info",
            "The running version (always 1)",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(version=__version__).set(1)
        for source in ("memory", "disk", "upstream"):
            self.time_to_first_byte.labels(source=source)
        if not os.environ.get(MULTIPROC_ENV):  # else added at each scrape (see exposition)
            _add_process_collectors(r)
        for tier in ("memory", "disk", "shared"):
            for family in (
                self.cache_hits,
                self.cache_misses,
                self.cache_evictions,
                self.cache_bytes,
                self.cache_max_bytes,
            ):
                family.labels(tier=tier)
        self.cache_corrupt_blocks.labels(tier="disk")
        self.cache_corrupt_blocks.labels(tier="shared")
        for reason in ("missing", "invalid", "expired", "forbidden"):
            self.auth_failures.labels(reason=reason)
        for op in ("head", "get"):
            for outcome in ("ok", "not_found", "not_modified", "changed", "invalid", "error"):
                self.upstream_requests.labels(op=op, outcome=outcome)

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            _add_process_collectors(registry)  # of the worker that answers the scrape
            return generate_latest(registry)
        return generate_latest(self.registry)


def fix_process_identity() -> None:
    """In a worker, before its first metric: in multiprocess mode prometheus-client asks
    the kernel for the pid at every update of every value, to notice a fork (a memory
    hit makes 7 updates; each took 1.2 us here, 0.7 us without the system call). A
    worker never forks a process that updates metrics, so its pid is read once here; the
    files keep their names (`counter_<pid>.db`): the supervisor's `mark_process_dead`
    still applies."""
    from prometheus_client import values

    pid = os.getpid()
    values.ValueClass = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]


def _add_process_collectors(registry: CollectorRegistry) -> None:
    """prometheus-client's process_* and python_* families (CPU, memory, fds, GC)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


_JOB_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_LAG_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
INGEST_OUTCOMES = ("ready", "failed", "skipped", "released")


class IngestMetrics:
    """`s3proxy ingest`'s own registry (a separate process from the proxy's)."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.jobs = Counter(
            "s3proxy_ingest_jobs_total",
            "Ingest jobs ended, by outcome (released: given back, to be taken again)",
            ["outcome"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "s3proxy_ingest_job_seconds",
            "Time from taking an upload to its outcome",
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("s3proxy_ingest_inflight", "Jobs running", registry=r)
        self.queue_lag = Histogram(
            "s3proxy_ingest_queue_lag_seconds",
            "Time from an upload to its job's start",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "s3proxy_ingest_queue_depth", "Uploads waiting for a job, as last seen", registry=r
        )
        self.webhooks = Counter(
            "s3proxy_ingest_webhooks_total",
            "Webhook events, by outcome (delivered, failed)",
            ["outcome"],
            registry=r,
        )
        self.ready = Gauge("s3proxy_ready", "1 while the work source answered recently", registry=r)
        Gauge(
            "s3proxy_build_info", "The running version (always 1)", ["version"], registry=r
        ).labels(version=__version__).set(1)
        _add_process_collectors(r)
        for outcome in INGEST_OUTCOMES:
            self.jobs.labels(outcome=outcome)
        for outcome in ("delivered", "failed"):
            self.webhooks.labels(outcome=outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
