"""Delivery bookkeeping in Redis: how often a task id was delivered, which of its images was being
scored when a worker died, and the dead-letter list of what was given up.

Redis keeps no delivery count and ``task_reject_on_worker_lost`` does nothing for the thread pool:
without this, a poison message would come back after every ``visibility_timeout``, forever.

Keys (in the broker's Redis, all expiring on their own):
``realscore:attempts:<id>`` deliveries so far; ``realscore:attempts:<id>:at`` the index of the
image a last-attempt run was scoring; ``realscore:attempts:<id>:poison`` the indices that were
being scored when a worker died on its last attempts. ``realscore:dead-letter`` (a list, newest
first, capped at ``DEAD_LETTER_CAP``) records every given-up task as a JSON object.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from shared.redact import redact, redact_known

log = logging.getLogger(__name__)
KEY_PREFIX = "realscore:attempts:"
DEAD_LETTER_KEY = "realscore:dead-letter"
DEAD_LETTER_CAP = 10_000
# Forget a task id's keys unless a later delivery has counted since (the count is no longer ours).
# One round trip: a WATCH/GET/MULTI/EXEC transaction took three, on every task.
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return 0
"""


class AttemptCounter:
    def __init__(self, client: redis.Redis, max_attempts: int, ttl_seconds: int) -> None:
        self._redis = client
        self._forget = client.register_script(_FORGET)
        self.max_attempts = max_attempts
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, url: str, max_attempts: int, ttl_seconds: int) -> AttemptCounter | None:
        """A counter on the Redis at ``url``; ``None`` for other brokers (no counting)."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            log.warning("attempt counting needs Redis; %s is not, so it is off", redact(url))
            return None
        # Short socket timeouts: bookkeeping must never hold a task for long.
        return cls(
            redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5),
            max_attempts,
            ttl_seconds,
        )

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

    def careful(self, attempt: int) -> bool:
        """The last attempt and any after it: score image by image, marking each."""
        return attempt >= self.max_attempts

    def done(self, task_id: str, attempt: int) -> None:
        """Our delivery finished: forget the id, unless a later delivery has counted since."""
        key = KEY_PREFIX + task_id
        self._forget(keys=[key, key + ":at", key + ":poison"], args=[attempt])

    def hand_back(self, task_id: str) -> None:
        """This delivery did not really run (its worker was broken): do not count it."""
        self._redis.decr(KEY_PREFIX + task_id)

    def mark(self, task_id: str, index: int) -> None:
        """Image ``index`` of the task is being scored now (careful runs only); with the time,
        so a later delivery can tell a dead run's mark from a live duplicate's."""
        value = f"{index}:{time.time():.3f}"
        self._redis.set(KEY_PREFIX + task_id + ":at", value, ex=self.ttl_seconds)

    def poisoned(self, task_id: str, stale_after: float) -> tuple[set[int], bool, int | None]:
        """The images that were being scored when this task's workers died, whether another
        careful run of it is alive (Redis redelivered it meanwhile), and the image found
        poisoned just now (``None`` if none).

        A live careful run refreshes its mark at every image, so at least every ``stale_after``
        seconds (a fetch plus a forward). A mark that has not moved for longer was left by a run
        that died: its image joins the poisoned set. A fresher one is watched until it moves
        (alive) or grows stale (dead), so a crash is never mistaken for a slow run or back."""
        key = KEY_PREFIX + task_id
        raw = self._redis.get(key + ":at")
        live = False
        while raw is not None:
            age = time.time() - float(raw.decode().partition(":")[2] or 0)
            if age > stale_after:
                break
            time.sleep(min(0.5, stale_after - age + 0.01))  # polling a mark, bounded by stale_after
            again = self._redis.get(key + ":at")
            if again != raw:
                live = again is not None
                raw = None
        newly = None if raw is None else int(raw.decode().partition(":")[0])
        with self._redis.pipeline() as pipe:
            if newly is not None:  # stale: a dead run's last image
                pipe.delete(key + ":at")
                pipe.sadd(key + ":poison", newly)
                pipe.expire(key + ":poison", self.ttl_seconds)
            pipe.smembers(key + ":poison")
            members = pipe.execute()[-1]
        return {int(member) for member in members}, live, newly

    def dead_letter(self, task_id: str, task_name: str, reason: str, uris: list, attempt: int) -> None:
        """Record a given-up task (or images of one) where operators can read it."""
        entry = {
            "task_id": task_id,
            "task": task_name,
            "reason": redact_known(reason),
            "uris": [redact_known(uri if isinstance(uri, str) else repr(uri)) for uri in uris],
            "attempts": attempt,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._redis.pipeline() as pipe:
            pipe.lpush(DEAD_LETTER_KEY, json.dumps(entry))
            pipe.ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_CAP - 1)
            pipe.execute()


def read_dead_letters(client: redis.Redis, count: int = 100) -> list[dict]:
    """The newest ``count`` dead-letter entries."""
    return [json.loads(raw) for raw in client.lrange(DEAD_LETTER_KEY, 0, count - 1)]
