"""Helpers for the worker integration tests: Prometheus scraping, a private Redis, a private app.

A private ``redis-server`` (its own port, no persistence) is for tests about worker start-up and
shutdown: what they enqueue can only be taken by the worker they start, never by the session's
shared worker or by another engineer's concurrent test run.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from celery import Celery

from tests.processes import free_port, wait_until


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a worker's ``/metrics``: ``(name, sorted labels) -> value``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value, 0 when the series does not exist yet (a labelled child not yet used)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port that can be stopped and started again
    on the same port (an outage)."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.auth = ["--requirepass", password] if password else []
        host = f":{password}@127.0.0.1" if password else "127.0.0.1"
        self.url = f"redis://{host}:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *self.auth],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, 10, "private redis-server")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def private_redis(password: str | None = None) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its URL (with the password,
    if it asks for one: ``requirepass``, as the compose file runs it)."""
    server = RedisServer(password)
    try:
        yield server.start().url
    finally:
        server.stop()


def fill(store: redis.Redis) -> None:
    """16 MiB of ``filler:*`` keys, then ``maxmemory`` 4 MiB below what Redis now uses: full, with a
    margin that no freed client buffer closes (writing until the first refusal would leave it
    on the edge, where the next small write may pass)."""
    for i in range(16):
        store.set(f"filler:{i}", b"x" * 2**20)
    store.config_set("maxmemory", store.info("memory")["used_memory"] - 4 * 2**20)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        store.set("probe", b"1")


def app_for(url: str) -> Celery:
    """A Celery app configured like ``shared.celery_app.app`` but on another Redis."""
    from shared.celery_app import configure
    from shared.settings import load_settings

    app = configure(Celery("realscore-test"), load_settings(broker_url=url, result_backend=url))
    # This Redis goes away with its test; results collected after that must not retry for long.
    options = dict(app.conf.result_backend_transport_options)
    app.conf.result_backend_transport_options = {**options, "retry_policy": {"max_retries": 0}}
    return app
