"""``shared.client`` as a web backend uses it: torch-free, thread-safe, order-preserving, and
non-blocking where an async framework needs it; and ``realscore submit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from celery.signals import before_task_publish

from shared import client
from shared.task_names import BULK_QUEUE, INTERACTIVE_QUEUE, MAX_URIS_PER_TASK, SCORE
from tests.processes import wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import app_for, private_redis

TIMEOUT = 60
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(served_dir: Path) -> list[str]:
    folder = served_dir / "client"
    folder.mkdir(exist_ok=True)
    uris = []
    for i in range(4):
        path = folder / f"c{i}.png"
        noise_image(500 + i, (120 + 20 * i, 100)).save(path)
        uris.append(str(path))
    return uris


def test_the_client_side_imports_no_model_stack() -> None:
    """A web backend has no torch, transformers or Pillow: the client must not need them."""
    probe = """
import importlib.abc, json, sys
HEAVY = ("torch", "transformers", "PIL", "worker", "safetensors", "numpy")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
import shared.client, shared.celery_app, shared.cli, shared.submit_command
shared.cli.build_parser().parse_args(["submit", "/a.png"])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.integration
def test_32_threads_score_at_once(worker, images: list[str]) -> None:
    reference = {uri: client.score(uri, timeout=TIMEOUT)["score"] for uri in images}
    start = threading.Barrier(32)
    outcomes: dict[int, list] = {}

    def call(index: int) -> None:
        got = []
        try:
            start.wait(timeout=TIMEOUT)
            for round_ in range(2):  # a thread's second call reuses its state
                uri = images[(index + round_) % len(images)]
                got.append((uri, client.score(uri, timeout=TIMEOUT)))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            got.append(error)
        outcomes[index] = got

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    assert not any(thread.is_alive() for thread in threads), "a client.score call hung"
    errors = [item for got in outcomes.values() for item in got if isinstance(item, BaseException)]
    assert not errors, errors[:3]
    assert sum(len(got) for got in outcomes.values()) == 64
    for got in outcomes.values():
        for uri, result in got:
            assert result["uri"] == uri  # nobody got another thread's result
            assert result["ok"], result
            assert result["score"] == pytest.approx(reference[uri], abs=1e-4)


@pytest.mark.integration
def test_score_many_splits_long_lists_and_keeps_their_order(
    worker, images: list[str], served_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uris = [
        images[i % len(images)] if i % 13 == 0 else str(served_dir / "client" / f"missing-{i}.png")
        for i in range(2 * MAX_URIS_PER_TASK + 10)
    ]
    sent: list[tuple] = []
    real_send = client.app.send_task

    def counting_send(name, args=None, **options):
        sent.append((name, len(args[0]), options.get("queue")))
        return real_send(name, args=args, **options)

    monkeypatch.setattr(client.app, "send_task", counting_send)
    results = client.score_many(uris, timeout=TIMEOUT)

    assert [(n, q) for n, _, q in sent] == [("realscore.score_many", INTERACTIVE_QUEUE)] * 3
    assert [size for _, size, _ in sent] == [MAX_URIS_PER_TASK, MAX_URIS_PER_TASK, 10]
    assert [r["uri"] for r in results] == uris
    for i, result in enumerate(results):
        if i % 13 == 0:
            assert result["ok"], result
        else:
            assert result["error"]["code"] == "not_found", result
    assert client.score_many([], timeout=TIMEOUT) == []


@pytest.mark.integration
def test_result_never_blocks_and_returns_the_dict_once_done(worker, images: list[str]) -> None:
    assert client.result(str(uuid.uuid4())) is None  # unknown or still queued: PENDING

    # A task the worker holds until its ETA is really pending for a while.
    held = client.app.send_task(SCORE, args=[images[0]], countdown=1.5)
    started = time.monotonic()
    assert client.result(held.id) is None
    assert time.monotonic() - started < 1.0  # answered at once, not after the task
    value = wait_until(lambda: client.result(held.id), TIMEOUT, "held task's result")
    assert value["uri"] == images[0] and value["ok"]

    many = client.submit_many(images[:3])
    assert len(many) == 1
    rows = wait_until(lambda: client.result(many[0].id), TIMEOUT, "score_many result")
    assert [row["uri"] for row in rows] == images[:3]


def test_interactive_tasks_carry_expires_and_bulk_ones_do_not(celery_app) -> None:
    """Checked on the message as published (``before_task_publish``), with no worker needed."""
    seen: list[tuple[str, dict]] = []

    def record(sender=None, headers=None, routing_key=None, **_):
        seen.append((routing_key, dict(headers or {})))

    before_task_publish.connect(record)
    try:
        with private_redis() as url:
            app = app_for(url)
            original = client.app
            client.app = app
            try:
                sent_at = datetime.now(timezone.utc)
                client.submit("/x.png", timeout=5)
                client.submit_many(["/x.png"], timeout=7)
                client.submit_many(["/x.png"], timeout=None, queue=BULK_QUEUE)
            finally:
                client.app = original
    finally:
        before_task_publish.disconnect(record)
    assert [key for key, _ in seen] == [INTERACTIVE_QUEUE, INTERACTIVE_QUEUE, BULK_QUEUE]
    for (_, headers), timeout in zip(seen[:2], (5, 7)):
        expires = datetime.fromisoformat(headers["expires"])
        assert 0 < (expires - sent_at).total_seconds() <= timeout + 1
    assert seen[2][1].get("expires") is None


def test_score_raises_score_timeout_when_no_worker_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    with private_redis() as url:
        monkeypatch.setattr(client, "app", app_for(url))
        started = time.monotonic()
        with pytest.raises(client.ScoreTimeout):
            client.score("/x.png", timeout=0.5)
        assert time.monotonic() - started < 5
        # Three tasks: the first wait already uses the whole (shared) deadline and raises. The
        # bound only says the timeout is honoured (the default is 120 s) and stays loose for a
        # loaded machine; test_score_many_tasks_share_one_deadline checks the sharing itself.
        started = time.monotonic()
        with pytest.raises(client.ScoreTimeout):
            client.score_many(["/x.png"] * (2 * MAX_URIS_PER_TASK + 1), timeout=1.0)
        assert time.monotonic() - started < 10
    assert isinstance(client.ScoreTimeout("x"), TimeoutError)  # callers may catch either


def test_score_many_tasks_share_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each task answers late, within what is left: the next waits only for the rest.

    A deadline per task would give every wait the full timeout (3 tasks x 1 s, 3 s in all);
    the shared one leaves at most 1 - 2 x 0.3 s for the third. A loaded machine only makes the
    sleeps longer and the remaining time smaller, so the bound cannot flake.
    """
    waits: list[float] = []

    def late_answer(handle: object, timeout: float) -> list:
        waits.append(timeout)
        time.sleep(0.3)
        return []

    monkeypatch.setattr(client, "submit_many", lambda uris, **options: [object()] * 3)
    monkeypatch.setattr(client, "_wait", late_answer)
    client.score_many(["/x.png"] * (2 * MAX_URIS_PER_TASK + 1), timeout=1.0)
    assert len(waits) == 3
    assert waits[0] <= 1.0
    assert waits[2] <= 1.0 - 2 * 0.3


def test_celerys_given_up_result_consumer_is_broker_unavailable_whatever_its_cause() -> None:
    """Celery gives up reconnecting with a bare RuntimeError chained from the last of the result
    backend's connection errors, which include KeyError and any OSError, not only the
    ConnectionErrors: each is BrokerUnavailable. Other RuntimeErrors and Redis answering with an
    error (not unreachable) go through unchanged."""
    import redis
    from celery.backends.asynchronous import E_RETRY_LIMIT_EXCEEDED

    for cause in (redis.ConnectionError("Error 111"), KeyError("celery-task-meta-x"), TimeoutError("timed out")):
        with pytest.raises(client.BrokerUnavailable, match="unreachable"):
            with client.as_broker_unavailable():
                raise RuntimeError(E_RETRY_LIMIT_EXCEEDED) from cause
    for other in (
        RuntimeError("dictionary changed size during iteration"),
        redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
    ):
        with pytest.raises(Exception) as caught:
            with client.as_broker_unavailable():
                raise other
        assert caught.value is other


@pytest.mark.integration
def test_realscore_submit_prints_json_lines(worker, worker_env: dict, images: list[str]) -> None:
    missing = str(Path(images[0]).with_name("nope.png"))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "submit", images[0], missing, images[1], "--timeout", "60"],
        env={**os.environ, **worker_env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["uri"] for row in rows] == [images[0], missing, images[1]]
    assert [row["ok"] for row in rows] == [True, False, True]
    assert rows[1]["error"]["code"] == "not_found"
