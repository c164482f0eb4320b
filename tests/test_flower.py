"""Flower sees the worker and its tasks: the same ``celery ... flower`` command compose runs.

Flower only knows the tasks whose events it received, so it starts first; then the test waits until
Flower's event receiver has heard the worker's heartbeat (so it is subscribed), runs fresh tasks,
and polls Flower's API with a bounded deadline (events arrive asynchronously).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from shared import client
from shared.stack import FLOWER_AUTH_ENV, flower_command
from tests.processes import free_port, wait_until
from tests.tiny_clip import noise_image

pytestmark = pytest.mark.integration

USER, PASSWORD = "ops", uuid.uuid4().hex


class Flower:
    def __init__(self, port: int, process: subprocess.Popen, log_path: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, *, auth: bool = True) -> tuple[int, object]:
        request = urllib.request.Request(self.base + path)
        if auth:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            return error.code, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"flower exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.get("/healthcheck", auth=False)[0] == 200
        except OSError:  # not listening yet
            return False


@pytest.fixture(scope="module")
def flower(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("flower-logs") / "flower.log"
    env = {
        **os.environ,
        "REALSCORE_BROKER_URL": redis_url,
        "REALSCORE_RESULT_BACKEND": redis_url,
        # The test's own switch for Flower 2's API; with basic auth set (as compose sets it) the
        # API still demands credentials, which the test checks.
        "FLOWER_UNAUTHENTICATED_API": "true",
        FLOWER_AUTH_ENV: f"{USER}:{PASSWORD}",
        "PYTHONUNBUFFERED": "1",
    }
    command = flower_command(port=port, address="127.0.0.1")
    assert command[0] == "celery"
    argv = [sys.executable, "-m", *command]  # `celery` from this interpreter's environment
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Flower(port, process, log_path)
    try:
        wait_until(server.answers, 60, "flower answers /healthcheck", interval=0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def test_flower_api_needs_the_basic_auth_credentials(flower: Flower) -> None:
    assert flower.get("/api/workers", auth=False)[0] == 401
    assert flower.get("/api/tasks", auth=False)[0] == 401
    assert flower.get("/api/workers?status=true")[0] == 200


def test_flower_sees_the_worker_online_and_its_tasks_succeed(
    flower: Flower, request: pytest.FixtureRequest, served_dir: Path
) -> None:
    worker = request.getfixturevalue("worker")  # after Flower is up (it may run already)
    node = worker.node

    def heartbeat_seen() -> bool:  # Flower's event receiver is subscribed and hears this worker
        status, alive = flower.get("/api/workers?status=true")
        return status == 200 and alive.get(node) is True

    wait_until(heartbeat_seen, 60, f"flower hears {node}'s heartbeats", interval=0.5)

    folder = served_dir / f"flower-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    paths = []
    for seed in range(3):
        path = folder / f"img{seed}.png"
        noise_image(300 + seed, (240, 240)).save(path)
        paths.append(str(path))

    singles = [client.submit(path, timeout=60) for path in paths[:2]]
    (many,) = client.submit_many(paths, timeout=60)
    for handle in singles:
        assert handle.get(timeout=60)["ok"]
    assert all(result["ok"] for result in many.get(timeout=60))
    expected = {handle.id: "realscore.score" for handle in singles} | {many.id: "realscore.score_many"}

    def tasks_succeeded() -> dict | None:
        status, tasks = flower.get("/api/tasks?limit=1000")
        if status != 200:
            return None
        done = {
            task_id: tasks[task_id]
            for task_id in expected
            if task_id in tasks and tasks[task_id].get("state") == "SUCCESS"
        }
        return done if len(done) == len(expected) else None

    seen = wait_until(tasks_succeeded, 30, "flower shows the tasks as SUCCESS", interval=0.5)
    for task_id, name in expected.items():
        assert seen[task_id]["name"] == name
        assert seen[task_id]["worker"] == node

    # Online by inspection too (Flower's workers page), with our tasks registered.
    status, workers = flower.get("/api/workers?refresh=true")
    assert status == 200, flower.log()
    assert node in workers, sorted(workers)
    assert {"realscore.score", "realscore.score_many"} <= set(workers[node].get("registered", []))
