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


@contextmanager
def private_redis(password: str | None = None) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its URL (with the password,
    if it asks for one: ``requirepass``, as the compose file runs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    auth = ["--requirepass", password] if password else []
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *auth],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, "private redis-server")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def app_for(url: str) -> Celery:
    """A Celery app configured like ``shared.celery_app.app`` but on another Redis."""
    from shared.celery_app import configure
    from shared.settings import load_settings

    app = configure(Celery("realscore-test"), load_settings(broker_url=url, result_backend=url))
    # This Redis goes away with its test; results collected after that must not retry for long.
    options = dict(app.conf.result_backend_transport_options)
    app.conf.result_backend_transport_options = {**options, "retry_policy": {"max_retries": 0}}
    return app
