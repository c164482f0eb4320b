"""The result cache: identical bytes are scored once, by any worker sharing the cache's Redis.

A key is the content's sha256 under a namespace that hashes everything else that changes the score:
the result's ``model`` string (tower and head hashes), the dtype and the preprocessing (decode)
mode. Only the raw score is stored; threshold and label are applied when a result is produced, so
a new ``REALSCORE_THRESHOLD`` never needs a flush. Every key is written with a TTL.

The cache is an optimisation and never a dependency: any Redis error counts
``realscore_cache_errors_total{op}`` and the image is scored as if there were no cache. After an
error the cache is skipped for a few seconds, so a Redis that hangs costs one short socket timeout
per few seconds, not one per image.

Within one process, lookups of bytes already being scored wait for that score instead of scoring
them again (:class:`SingleFlight`): a burst of copies of one image costs one forward, not one each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import Future

import redis

from worker.serving import metrics

log = logging.getLogger(__name__)
# Label children looked up once: get() runs per image.
_HIT, _MISS, _SKIPPED = (metrics.CACHE_LOOKUPS.labels(outcome) for outcome in ("hit", "miss", "skipped"))
KEY_PREFIX = "realscore:score:v1:"
SOCKET_TIMEOUT_S = 0.25
BACKOFF_S = 5.0


def cache_namespace(model: str, dtype: str, decode_mode: str) -> str:
    """The key prefix of one scoring identity: ``realscore:score:v1:<16 hex>:``."""
    identity = json.dumps([model, dtype, decode_mode], separators=(",", ":"))
    return f"{KEY_PREFIX}{hashlib.sha256(identity.encode()).hexdigest()[:16]}:"


class SingleFlight:
    """The first of several concurrent misses on one key scores it; the others wait for its
    score (``None`` if it failed: they then score on their own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Future] = {}

    def join(self, key: str) -> tuple[bool, Future]:
        """``(True, future)`` for the first caller, who must :meth:`finish`; else
        ``(False, the first caller's future)``."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return False, flight
            flight = self._flights[key] = Future()
            return True, flight

    def finish(self, key: str, score: float | None) -> None:
        with self._lock:
            flight = self._flights.pop(key)
        flight.set_result(score)


class ScoreCache:
    """Raw scores by content sha256 for one scoring identity, in Redis, each key with a TTL."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        model: str,
        dtype: str,
        decode_mode: str,
        ttl_s: int,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("a cache key always needs a TTL of at least one second")
        self._client = client
        self.namespace = cache_namespace(model, dtype, decode_mode)
        self.ttl_s = ttl_s
        self._backoff_s = backoff_s
        self._skip_until = 0.0
        self._lock = threading.Lock()
        self.flights = SingleFlight()

    @classmethod
    def from_url(cls, url: str, **identity_and_ttl: object) -> ScoreCache:
        """A cache on the Redis at ``url``, with short socket timeouts and no retries: a miss is
        cheaper than waiting for a struggling Redis."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry_on_timeout=False,
            health_check_interval=30,
        )
        return cls(client, **identity_and_ttl)  # type: ignore[arg-type]

    def key(self, sha256: str) -> str:
        return self.namespace + sha256

    def get(self, sha256: str) -> float | None:
        """The cached raw score of these bytes, or ``None`` (a miss, or the cache is failing)."""
        if self._skipping():
            _SKIPPED.inc()
            return None
        try:
            value = self._client.get(self.key(sha256))
            score = None if value is None else float(value)
        except (redis.RedisError, OSError, ValueError) as error:
            self._failed("get", error)  # counted there only, not as a lookup outcome too
            return None
        (_MISS if score is None else _HIT).inc()
        return score

    def put(self, sha256: str, score: float) -> None:
        """Store a raw score for ``ttl_s`` seconds; a failure is counted, never raised."""
        if self._skipping():
            return
        try:
            self._client.set(self.key(sha256), repr(float(score)), ex=self.ttl_s)
        except (redis.RedisError, OSError) as error:
            self._failed("put", error)

    def close(self) -> None:
        self._client.close()

    def _skipping(self) -> bool:
        return time.monotonic() < self._skip_until

    def _failed(self, op: str, error: BaseException) -> None:
        metrics.CACHE_ERRORS.labels(op).inc()
        with self._lock:
            first = not self._skipping()
            self._skip_until = time.monotonic() + self._backoff_s
        if first:
            log.warning(
                "result cache %s failed (%r): scoring without the cache for %.0f s",
                op, error, self._backoff_s,
            )
