"""The Redis transport of ``realscore worker`` (``worker.serving.redis_transport``) on a real, full
``redis-server``: a message popped while Redis refuses to record it goes back to its queue, in
order, and the channel takes none until it tries again; nothing changes on a Redis with room.

kombu directly (a Consumer on a private Redis), no worker: the worker-level proof is
``tests/test_faults.py::test_a_message_taken_from_a_full_redis_is_not_lost``.
"""

from __future__ import annotations

import base64
import json
import socket
from urllib.parse import urlparse

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tests.worker_helpers import fill, private_redis, sample
from worker.serving import metrics, redis_transport

pytestmark = pytest.mark.integration
QUEUE = Queue("work", Exchange("work", type="direct"), routing_key="work")


def connect(url: str) -> Connection:
    # Hostname and port, not the URL: kombu takes the transport from a URL's scheme.
    parts = urlparse(url)
    return Connection(
        hostname=parts.hostname, port=parts.port, virtual_host="0",
        transport=redis_transport.Transport, transport_options={"visibility_timeout": 60},
    )


def bodies(store: redis.Redis) -> list[str]:
    """The queued message bodies, next to be taken first."""
    return [base64.b64decode(json.loads(raw)["body"]).decode() for raw in reversed(store.lrange("work", 0, -1))]


def refused_so_far() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("realscore_broker_full_put_backs_total") or 0.0


def test_a_message_popped_from_a_full_redis_goes_back_and_is_taken_once_there_is_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_transport, "PAUSE", 3600.0)  # paused until the test resumes it
    with private_redis() as url, connect(url) as connection:
        store = redis.Redis.from_url(url)
        store.config_set("maxmemory-policy", "noeviction")
        producer = connection.Producer(serializer="raw")
        for body in ("first", "second"):
            producer.publish(body, exchange=QUEUE.exchange, routing_key="work", declare=[QUEUE])
        taken: list[str] = []
        consumer = connection.Consumer(QUEUE, callbacks=[lambda body, message: (taken.append(body), message.ack())], accept=None)
        consumer.consume()
        before = refused_so_far()
        fill(store)

        connection.drain_events(timeout=10)  # BRPOP takes "first"; Redis refuses to record it
        assert taken == []
        assert bodies(store) == ["first", "second"]  # back where it was, in order
        assert not store.hlen("unacked") and not store.zcard("unacked_index")
        assert refused_so_far() == before + 1
        qos = consumer.channel.qos
        assert not qos.can_consume()  # no further pop while paused
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.5)
        assert bodies(store) == ["first", "second"]

        store.delete(*store.keys("filler:*"))
        qos.paused_until = 0.0  # what PAUSE seconds later would do
        connection.drain_events(timeout=10)
        connection.drain_events(timeout=10)
        assert taken == ["first", "second"]
        assert not store.llen("work") and not store.hlen("unacked")
        store.close()


def test_with_room_it_is_kombus_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message is recorded as unacknowledged while in hand, as kombu does, and no pause."""
    with private_redis() as url, connect(url) as connection:
        store = redis.Redis.from_url(url)
        producer = connection.Producer(serializer="raw")
        producer.publish("only", exchange=QUEUE.exchange, routing_key="work", declare=[QUEUE])
        held = []
        consumer = connection.Consumer(QUEUE, callbacks=[lambda body, message: held.append(message)], accept=None)
        consumer.consume()
        connection.drain_events(timeout=10)
        assert [message.body for message in held] == [b"only"]
        assert store.hlen("unacked") == 1 and not store.llen("work")
        assert consumer.channel.qos.can_consume()
        held[0].ack()
        assert not store.hlen("unacked")
        store.close()


def test_install_points_redis_urls_at_this_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    import kombu.transport

    for scheme in ("redis", "rediss", "sentinel"):
        monkeypatch.setitem(kombu.transport.TRANSPORT_ALIASES, scheme, kombu.transport.TRANSPORT_ALIASES[scheme])
    monkeypatch.setattr(kombu.transport, "_transport_cache", {})
    redis_transport.install()
    assert Connection("redis://127.0.0.1:1/0").transport_cls is not None
    assert kombu.transport.get_transport_cls("redis") is redis_transport.Transport
    assert kombu.transport.get_transport_cls("rediss") is redis_transport.Transport
    assert kombu.transport.get_transport_cls("sentinel") is redis_transport.SentinelTransport


def test_a_put_back_that_loses_the_connection_names_the_lost_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses to record the popped message, then goes away before it can be put back:
    the message exists only in this process. It is logged (body and all) as lost, and the
    connection error still reaches kombu (Celery's consumer then reconnects)."""
    import logging

    from kombu.transport import redis as kombu_redis

    from tests.worker_helpers import RedisServer

    server = RedisServer().start()
    refuse = kombu_redis.QoS.append

    def refused_then_redis_dies(self: object, message: object, delivery_tag: str) -> None:
        try:
            refuse(self, message, delivery_tag)  # the real refusal of a full Redis
        finally:
            server.stop()  # gone before put_back runs

    try:
        with connect(server.url) as connection:
            store = redis.Redis.from_url(server.url)
            store.config_set("maxmemory-policy", "noeviction")
            producer = connection.Producer(serializer="raw")
            producer.publish("stranded", exchange=QUEUE.exchange, routing_key="work", declare=[QUEUE])
            consumer = connection.Consumer(QUEUE, callbacks=[lambda body, message: message.ack()], accept=None)
            consumer.consume()
            fill(store)
            store.close()
            monkeypatch.setattr(kombu_redis.QoS, "append", refused_then_redis_dies)
            with caplog.at_level(logging.CRITICAL, logger=redis_transport.__name__):
                with pytest.raises(connection.connection_errors):
                    connection.drain_events(timeout=10)
    finally:
        server.stop()
    lost = [record.getMessage() for record in caplog.records if record.levelno == logging.CRITICAL]
    assert len(lost) == 1 and "lost" in lost[0]
    assert base64.b64encode(b"stranded").decode() in lost[0]  # the body, to replay it by hand
