"""Counts deliveries per task id in Redis, so a message that keeps killing its worker is given up.

Redis keeps no delivery count and ``task_reject_on_worker_lost`` does nothing for the thread pool:
without this, a poison message would come back after every ``visibility_timeout``, forever.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)
KEY_PREFIX = "realscore:attempts:"


class AttemptCounter:
    def __init__(self, client: redis.Redis, max_attempts: int, ttl_seconds: int) -> None:
        self._redis = client
        self.max_attempts = max_attempts
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, url: str, max_attempts: int, ttl_seconds: int) -> AttemptCounter | None:
        """A counter on the Redis at ``url``; ``None`` for other brokers (no counting)."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            log.warning("attempt counting needs Redis; %s is not, so it is off", url.split("@")[-1])
            return None
        return cls(redis.Redis.from_url(url), max_attempts, ttl_seconds)

    def record(self, task_id: str) -> int:
        """Count one more delivery of ``task_id``; returns the attempt number (1 for the first)."""
        key = KEY_PREFIX + task_id
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, self.ttl_seconds)
            attempt, _ = pipe.execute()
        return int(attempt)

    def exhausted(self, attempt: int) -> bool:
        return attempt > self.max_attempts

    def done(self, task_id: str) -> None:
        """The task finished: forget its count."""
        self._redis.delete(KEY_PREFIX + task_id)
