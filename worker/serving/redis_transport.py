"""kombu's Redis transport with one change: a message popped from a full Redis goes back to its queue.

Under ``maxmemory`` with ``noeviction``, Redis still runs ``BRPOP`` (a pop frees memory) but
refuses the writes with which kombu then records the message as unacknowledged: kombu 5.7's
``kombu.transport.redis.QoS.append`` runs ``ZADD unacked_index`` and ``HSET unacked`` in one
``MULTI``, refused whole. kombu raises that from the worker's event loop, after the pop: the message
is in neither the queue nor the unacknowledged set (lost), and Celery ends the worker
("Unrecoverable error").

Here that refusal puts the message back where it was popped from (the end of its queue that
``BRPOP`` takes next) with a script flagged ``allow-oom`` (Redis 7 or later), which Redis runs
even when full: it only takes back the memory the pop freed. Celery never sees the message, and
this channel takes no message for :data:`PAUSE` seconds (its QoS says it cannot consume, which
kombu's poller asks before each ``BRPOP``), then tries again: while Redis stays full, each worker
pops and puts back one message a second and takes no work. A message whose recording succeeds is
handled exactly as kombu does. A message that cannot be put back (Redis refuses even that, or
the connection fails first) is logged at CRITICAL with its body: it exists nowhere else. Two of kombu's once-a-second chores that a full Redis refuses (the
sweep for messages to redeliver, the refresh of binding expiries) log a debug line instead of a
traceback each time; kombu retries both.

Installed in a worker process by :func:`install` (kombu chooses its transport by the URL's
scheme, so the ``redis``, ``rediss`` and ``sentinel`` names are pointed at these classes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kombu.transport
import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from worker.serving import metrics

log = logging.getLogger(__name__)
PAUSE = 1.0  # seconds a channel takes no message after Redis refused to record one
# RPUSH: back at the end BRPOP pops from, where the message was. ``allow-oom`` lets a script write
# on a full Redis (a plain RPUSH is refused there too).
PUT_BACK = "#!lua flags=allow-oom\nreturn redis.call('RPUSH', KEYS[1], ARGV[1])"


class RecordRefused(Exception):
    """Redis refused to record a popped message as unacknowledged (it is full)."""

    def __init__(self, channel: Any, payload: dict, error: redis.RedisError) -> None:
        super().__init__(str(error))
        self.channel = channel
        self.payload = payload
        self.error = error


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a refused recording raises :class:`RecordRefused` and pauses consuming."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused_until = 0.0
        self.refusing = False  # Redis refused the last recording: log the next success

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except redis.exceptions.OutOfMemoryError as error:
            self.paused_until = time.monotonic() + PAUSE
            raise RecordRefused(self.channel, message._raw, error) from None
        if self.refusing:
            self.refusing = False
            log.info("Redis records messages again: this worker takes work again")

    def can_consume(self) -> bool:
        return time.monotonic() >= self.paused_until and super().can_consume()

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        # kombu's sweep for messages past their visibility timeout takes a lock with SET, refused
        # on a full Redis: every sweep (each second or so) then logged a traceback ("Error in
        # timer"). The messages stay unacknowledged in Redis; a later sweep redelivers them.
        try:
            super().restore_visible(*args, **kwargs)
        except redis.exceptions.OutOfMemoryError:
            log.debug("Redis is full: unacknowledged messages are redelivered once it has room")


def put_back(channel: Any, payload: dict, queue: str, error: redis.RedisError) -> None:
    """Push ``payload`` (popped from ``queue``) back where it was; log what happened."""
    qos = channel.qos
    key = channel._q_for_pri(queue, channel._get_message_priority(payload, reverse=False))
    body = dumps(payload)
    tag = payload.get("properties", {}).get("delivery_tag")
    try:
        with channel.conn_or_acquire() as client:
            try:
                client.register_script(PUT_BACK)(keys=[key], args=[body], client=client)
            except redis.ResponseError as refused:  # Redis 6 knows no script flags; scripts not allowed
                try:
                    client.rpush(key, body)  # passes if the pop brought Redis under its limit
                except redis.ResponseError:
                    log.critical(
                        "Redis is full (%r) and refused to take back message %s (%r): it is lost: %s",
                        error, tag, refused, body,
                    )
                    return
    except channel.connection_errors as gone:
        # The message is now only in this process: say so (with what it takes to replay it),
        # then let kombu see the connection error as usual (Celery's consumer reconnects).
        log.critical(
            "Redis is full (%r) and the connection to take back message %s failed (%r): it is "
            "lost: %s", error, tag, gone, body,
        )
        raise
    metrics.BROKER_FULL_PUT_BACKS.inc()
    if qos.refusing:
        log.debug("Redis is still full: message %s went back to its queue %s", tag, queue)
        return
    qos.refusing = True
    log.warning(
        "Redis is full (%r): message %s went back to its queue %s; this worker takes no work "
        "until Redis records messages again (it tries every %g s)", error, tag, queue, PAUSE,
    )


class _PutBackOnRefusal:
    """Transport mixin: a message whose recording was refused goes back to its queue."""

    def _deliver(self, message: dict, queue: str) -> None:
        try:
            super()._deliver(message, queue)
        except RecordRefused as refused:
            put_back(refused.channel, refused.payload, queue, refused.error)


class _GetPutsBack:
    """Channel mixin: ``basic_get`` (a single synchronous pop; Celery's worker consumes with
    ``BRPOP`` instead) puts back a message whose recording was refused, and answers nothing."""

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        except RecordRefused as refused:
            put_back(self, refused.payload, queue, refused.error)
            return None


class _QuietWhenFull:
    """Channel mixin: kombu refreshes binding expiries (the control queue's) with a script each
    second while one is due, which a full Redis refuses; kombu logs each refusal with a
    traceback. A debug line is enough: the refresh is retried each second, and re-creates a
    binding table that expired meanwhile (after an hour or more)."""

    def maybe_refresh_binding_expiry(self) -> None:
        try:
            super().maybe_refresh_binding_expiry()
        except redis.exceptions.OutOfMemoryError:
            log.debug("Redis is full: binding expiries are refreshed once it has room")


class Channel(_GetPutsBack, _QuietWhenFull, kombu_redis.Channel):
    QoS = QoS


class SentinelChannel(_GetPutsBack, _QuietWhenFull, kombu_redis.SentinelChannel):
    QoS = QoS


class Transport(_PutBackOnRefusal, kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(_PutBackOnRefusal, kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make kombu use these classes for Redis URLs in this process (before any connection)."""
    for scheme, name in (("redis", "Transport"), ("rediss", "Transport"), ("sentinel", "SentinelTransport")):
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        kombu.transport._transport_cache.pop(scheme, None)
