"""Prometheus metrics of one worker process, served when ``REALSCORE_METRICS_PORT`` is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

BATCH_SIZE = Histogram(
    "realscore_batch_size",
    "Images per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_WAIT = Histogram(
    "realscore_queue_wait_seconds",
    "Time an image waited in the batcher before its forward pass",
    ["lane"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FORWARD_TIME = Histogram(
    "realscore_forward_seconds",
    "Duration of one forward pass",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCHER_QUEUED = Gauge(
    "realscore_batcher_queued_images", "Images waiting in the batcher for their forward pass"
)
LATE_STARTS = Counter(
    "realscore_late_task_starts_total",
    "Tasks whose images started after more than half of REALSCORE_VISIBILITY_TIMEOUT in this "
    "worker's hands (prefetched, waiting for a bulk slot): near redelivery to another worker",
)
BROKER_FULL_PUT_BACKS = Counter(
    "realscore_broker_full_put_backs_total",
    "Messages popped from a full broker Redis that it refused to record as unacknowledged, put "
    "back in their queue (about one a second per worker while Redis stays full)",
)
IMAGES_SCORED = Counter("realscore_images_scored_total", "Images scored successfully")
ERRORS = Counter("realscore_errors_total", "Images that became error results", ["code"])
CACHE_LOOKUPS = Counter(
    "realscore_cache_lookups_total",
    "Result-cache lookups by outcome (hit, miss, skipped after an error); a failed lookup is "
    "counted in realscore_cache_errors_total{op=get} instead",
    ["outcome"],
)
CACHE_ERRORS = Counter(
    "realscore_cache_errors_total", "Result-cache operations that failed (get, put)", ["op"]
)


def serve(port: int) -> None:
    """Expose ``/metrics`` on ``port`` from a daemon thread."""
    start_http_server(port)
