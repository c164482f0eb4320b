"""What a web backend sees when Redis is down: one documented exception, within the caller's
timeout, and the same process scoring again once Redis is back (nothing to restart)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery

from shared import client
from shared.celery_app import configure
from shared.settings import load_settings
from tests.processes import WorkerProcess, free_port
from tests.tiny_clip import noise_image
from tests.worker_helpers import RedisServer


@pytest.fixture()
def client_on(monkeypatch: pytest.MonkeyPatch):
    """Point :mod:`shared.client` at another Redis, configured exactly as in production."""

    def point(url: str) -> Celery:
        app = configure(Celery("realscore-outage"), load_settings(broker_url=url, result_backend=url))
        monkeypatch.setattr(client, "app", app)
        return app

    return point


def test_nothing_listening_is_broker_unavailable_within_the_timeout(client_on) -> None:
    client_on(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(client.BrokerUnavailable, match="unreachable") as caught:
        client.score("/data/photo.png", timeout=5)
    assert time.monotonic() - started < 5  # the contract: within the caller's timeout
    assert isinstance(caught.value, client.RealscoreError)
    assert isinstance(caught.value, ConnectionError)
    with pytest.raises(client.BrokerUnavailable):
        client.score_many(["/data/a.png", "/data/b.png"], timeout=5)
    with pytest.raises(client.BrokerUnavailable):
        client.submit("/data/photo.png", timeout=5)
    with pytest.raises(client.BrokerUnavailable):
        client.result("0b6f6d5c-0000-4000-8000-000000000000")


@pytest.mark.integration
def test_the_client_scores_again_once_redis_is_back(
    client_on, worker_env: dict, served_dir: Path, tmp_path: Path
) -> None:
    image = served_dir / "outage.png"
    noise_image(7, (64, 64)).save(image)
    server = RedisServer().start()
    app = client_on(server.url)
    env = {**worker_env, "REALSCORE_BROKER_URL": server.url, "REALSCORE_RESULT_BACKEND": server.url}
    env.pop("REALSCORE_METRICS_PORT", None)  # the session's worker serves that port
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready(app)
        assert client.score(str(image), timeout=60)["ok"]

        server.stop()
        started = time.monotonic()
        with pytest.raises(client.BrokerUnavailable):
            client.score(str(image), timeout=5)
        assert time.monotonic() - started < 5

        server.start()  # same port, empty
        # The worker reconnects on its own schedule (Celery's growing retry interval); waiting
        # for its ping keeps that out of the client's timeout. The client itself needs nothing.
        worker.wait_ready(app)
        assert client.score(str(image), timeout=60)["ok"], worker.log()
    finally:
        worker.stop()
        server.stop()
