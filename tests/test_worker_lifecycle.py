"""The worker's life: refusing to start without a model, one process per GPU, giving up on a
message that keeps coming back, dropping expired work, and a warm shutdown with work in flight.

Tests that start their own worker give it a private ``redis-server``: what they enqueue can only
reach the worker under test.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fakeredis
import pytest
import redis
from celery.result import AsyncResult

from shared import client
from shared.task_names import INTERACTIVE_QUEUE, SCORE, SCORE_MANY
from tests.processes import WorkerProcess, free_port, wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import app_for, private_redis, sample, scrape
from worker.serving.attempts import KEY_PREFIX, AttemptCounter

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _private_env(worker_env: dict, url: str, **extra: str) -> dict:
    env = {**worker_env, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url}
    env.pop("REALSCORE_METRICS_PORT", None)  # one port per process: the session worker has it
    env.update(extra)
    return env


def _run_cli(args: list[str], env: dict, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
    """``realscore ARGS`` in its own session; fails the test if it or its children outlive it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"realscore {' '.join(args)} still running after {timeout} s:\n{output}")
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        pass  # the whole process group is gone: no orphaned children
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"realscore {' '.join(args)} left processes behind")
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


# Start-up -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_worker_without_its_weights_exits_with_the_reason_and_takes_nothing(
    worker_env: dict, served_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "modelo_final.pth"
    noise_image(0, (64, 64)).save(served_dir / "lifecycle-never.png")
    with private_redis() as url:
        app = app_for(url)
        queued = app.send_task(SCORE, args=[str(served_dir / "lifecycle-never.png")])
        broker = redis.Redis.from_url(url)
        assert broker.llen(INTERACTIVE_QUEUE) == 1

        process = WorkerProcess(
            _private_env(worker_env, url, REALSCORE_HEAD_WEIGHTS=str(missing)), tmp_path / "w.log"
        ).start()
        try:
            code = process.process.wait(START_TIMEOUT)
        finally:
            process.stop()
        log = process.log()
        assert code != 0, log
        assert "cannot load the model" in log and str(missing) in log, log
        assert broker.llen(INTERACTIVE_QUEUE) == 1, "the message left the queue"
        assert not broker.hlen("unacked"), "the message was delivered"
        assert AsyncResult(queued.id, app=app).state == "PENDING"
        broker.close()


@pytest.mark.integration
def test_gpus_list_on_a_machine_without_cuda_stops_every_child_and_fails(worker_env: dict) -> None:
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    with private_redis() as url:
        done = _run_cli(["worker", "--gpus", "0,1"], _private_env(worker_env, url))
    assert done.returncode != 0, done.stdout
    # The first child to fail makes the supervisor SIGTERM the other, which may die before it
    # prints its own reason: at least one reason, never a silent failure.
    assert done.stdout.count("CUDA is not available") >= 1, done.stdout


def test_gpus_all_without_a_gpu_is_a_usage_error(worker_env: dict) -> None:
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    done = _run_cli(["worker", "--gpus", "all"], {"HF_HUB_OFFLINE": "1"}, timeout=60)
    assert done.returncode == 2, done.stdout
    assert "no CUDA GPU" in done.stdout


def test_a_bad_celery_argument_is_a_usage_error_not_a_traceback(worker_env: dict) -> None:
    with private_redis() as url:
        done = _run_cli(["worker", "--no-such-celery-option"], _private_env(worker_env, url), timeout=60)
    assert done.returncode == 2, done.stdout
    assert "No such option" in done.stdout
    assert "Traceback" not in done.stdout


@pytest.mark.parametrize("spec", ["0,0", "x", "-1", ","])
def test_bad_gpu_lists_are_usage_errors(spec: str) -> None:
    from shared.cli import UsageError
    from worker.serving.run_worker import _gpu_ids

    with pytest.raises(UsageError):
        _gpu_ids(spec)


def test_worker_arguments_put_the_callers_last() -> None:
    from shared.settings import load_settings
    from worker.serving.run_worker import celery_argv

    argv = celery_argv(load_settings(max_batch_size=8), ["--concurrency", "5", "-n", "a@b"])
    assert argv[:3] == ["worker", "--pool", "threads"]
    assert argv[argv.index("--concurrency") + 1] == "32"  # derived: 4 x MAX_BATCH_SIZE
    assert argv[argv.index("--queues") + 1] == "realscore,realscore.bulk"
    assert "--task-events" in argv
    assert argv[-4:] == ["--concurrency", "5", "-n", "a@b"]  # passed through, and they win


# Attempts -----------------------------------------------------------------------------------


def test_attempt_counter_counts_expires_and_forgets(redis_url: str) -> None:
    import redis

    store = redis.Redis.from_url(redis_url)  # real Redis: forgetting is a Lua script
    store.delete(*(KEY_PREFIX + name + suffix for name in "ab" for suffix in ("", ":at", ":poison")))
    counter = AttemptCounter(store, max_attempts=2, ttl_seconds=600)
    assert [counter.record("a") for _ in range(3)] == [1, 2, 3]
    assert counter.record("b") == 1  # per task id
    assert [counter.exhausted(n) for n in (1, 2, 3)] == [False, False, True]
    assert [counter.careful(n) for n in (1, 2, 3)] == [False, True, True]
    assert 0 < store.ttl(KEY_PREFIX + "a") <= 600  # a crashed worker's count does not live forever
    counter.done("a", 2)  # delivery 2 ends while delivery 3 still runs: its count stays
    assert int(store.get(KEY_PREFIX + "a")) == 3
    counter.mark("a", 0)
    store.sadd(KEY_PREFIX + "a:poison", 1)
    counter.done("a", 3)
    assert not store.exists(KEY_PREFIX + "a", KEY_PREFIX + "a:at", KEY_PREFIX + "a:poison")
    assert counter.record("a") == 1
    counter.hand_back("b")  # a broken worker gave it back: that delivery does not count
    assert int(store.get(KEY_PREFIX + "b")) == 0


def test_a_dead_runs_mark_becomes_poison_a_live_ones_does_not() -> None:
    store = fakeredis.FakeRedis()
    counter = AttemptCounter(store, max_attempts=2, ttl_seconds=600)
    counter.mark("t", 7)
    import threading

    moving = threading.Timer(0.2, lambda: counter.mark("t", 8))  # a live run moves on
    moving.start()
    assert counter.poisoned("t", stale_after=30) == (set(), True, None)
    moving.join()
    counter.mark("t", 7)
    assert counter.poisoned("t", stale_after=-1) == ({7}, False, 7)  # stale: it died at image 7
    counter.mark("t", 9)
    assert counter.poisoned("t", stale_after=-1) == ({7, 9}, False, 9)
    assert counter.poisoned("t", stale_after=-1) == ({7, 9}, False, None)  # reported once
    counter.dead_letter("t", "realscore.score_many", "why", ["/a.png"], 3)
    from worker.serving.attempts import read_dead_letters

    [entry] = read_dead_letters(store)
    assert entry["task_id"] == "t" and entry["uris"] == ["/a.png"] and entry["reason"] == "why"


def test_attempt_counting_needs_redis() -> None:
    assert AttemptCounter.from_url("amqp://guest@localhost//", 3, 60) is None
    assert isinstance(AttemptCounter.from_url("redis://127.0.0.1:6379/9", 3, 60), AttemptCounter)


@pytest.mark.integration
def test_a_message_delivered_too_often_is_given_up(
    worker, worker_env: dict, redis_url: str, served_dir: Path
) -> None:
    from shared.settings import load_settings

    max_attempts = int(worker_env.get("REALSCORE_MAX_ATTEMPTS", load_settings().max_attempts))
    image = served_dir / "lifecycle-poison.png"
    noise_image(3, (80, 80)).save(image)
    store = redis.Redis.from_url(redis_url)

    poison, fine = str(uuid.uuid4()), str(uuid.uuid4())
    store.set(KEY_PREFIX + poison, max_attempts)  # it already had all its deliveries
    store.set(KEY_PREFIX + fine, max_attempts - 1)  # one delivery left
    given_up = client.app.send_task(SCORE, args=[str(image)], task_id=poison).get(timeout=60)
    last_try = client.app.send_task(SCORE, args=[str(image)], task_id=fine).get(timeout=60)

    assert given_up["ok"] is False and given_up["error"]["code"] == "internal"
    assert "given up" in given_up["error"]["message"]
    assert last_try["ok"] is True
    # The count is cleared right after the result is written, so the caller may see the result
    # a moment before the count is gone.
    wait_until(
        lambda: store.get(KEY_PREFIX + poison) is None and store.get(KEY_PREFIX + fine) is None,
        10, "the attempt counts cleared",
    )

    many = str(uuid.uuid4())
    store.set(KEY_PREFIX + many, max_attempts)
    rows = client.app.send_task(SCORE_MANY, args=[[str(image), "/x.png"]], task_id=many).get(timeout=60)
    assert [row["error"]["code"] for row in rows] == ["internal", "internal"]
    store.close()


# A private worker: expiry and warm shutdown -------------------------------------------------


@pytest.fixture(scope="module")
def private_worker(worker_env: dict, served_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A worker on its own Redis whose batches wait long: tasks stay in flight for seconds."""
    folder = served_dir / "lifecycle"
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(4):
        noise_image(40 + i, (90 + 10 * i, 70)).save(folder / f"l{i}.png")
        images.append(str(folder / f"l{i}.png"))
    with private_redis() as url:
        app = app_for(url)
        env = _private_env(
            worker_env, url, REALSCORE_MAX_BATCH_SIZE="64", REALSCORE_MAX_WAIT_MS="10000",
            REALSCORE_METRICS_PORT=str(free_port()),
        )
        process = WorkerProcess(env, tmp_path_factory.mktemp("private") / "worker.log")
        yield app, process, images, url
        process.stop()
        # AsyncResults left by the tests unsubscribe when collected: let them, while Redis is up.
        gc.collect()


@pytest.mark.integration
def test_work_that_expired_in_the_queue_is_dropped_not_scored(private_worker) -> None:
    app, process, images, _ = private_worker
    original = client.app
    client.app = app  # the client as a web backend configured for this Redis uses it
    try:
        handle = client.submit(images[0], timeout=0.2)
    finally:
        client.app = original
    expires_at = time.time() + 0.2
    wait_until(lambda: time.time() > expires_at, 5, "the task's expiry")  # a clock, not a worker
    process.start().wait_ready(app, START_TIMEOUT)

    wait_until(lambda: AsyncResult(handle.id, app=app).state == "REVOKED", 60, "expired task revoked")
    client.app = app
    try:
        with pytest.raises(RuntimeError, match="REVOKED"):
            client.result(handle.id)
        with pytest.raises(client.ScoreTimeout):
            client._wait(AsyncResult(handle.id, app=app), 5)
    finally:
        client.app = original


@pytest.mark.integration
# Celery's AsyncResult unsubscribes from its result in __del__, which for the private Redis's
# tasks can run after that Redis is gone (at this module's teardown): harness noise, not a result.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_warm_shutdown_finishes_the_tasks_in_flight(private_worker) -> None:
    app, process, images, url = private_worker
    if process.process is None:
        process.start()
    process.wait_ready(app, START_TIMEOUT)
    handles = [app.send_task(SCORE, args=[uri]) for uri in images]
    # All four run (active) and wait in the batcher for its 10 s window to close; the warm
    # shutdown must flush that batch at once rather than wait it out or drop it.
    def running() -> int:
        reply = app.control.inspect([process.node], timeout=1).active() or {}
        return len(reply.get(process.node, []))

    wait_until(lambda: running() == len(handles), 30, "tasks started")
    # Started is not yet in the batcher (a task thread may still be fetching): warm shutdown
    # hands back what has not reached it, so wait until all four wait there.
    port = int(process.env["REALSCORE_METRICS_PORT"])
    wait_until(
        lambda: sample(scrape(port), "realscore_batcher_queued_images") == len(handles),
        30,
        "images waiting in the batcher",
    )
    assert not any(AsyncResult(h.id, app=app).ready() for h in handles)

    process.process.send_signal(signal.SIGTERM)
    results = [h.get(timeout=60) for h in handles]
    code = process.process.wait(60)

    assert [r["uri"] for r in results] == images
    assert all(r["ok"] for r in results), results
    assert code == 0, process.log()
    assert "Warm shutdown" in process.log() or "warm shutdown" in process.log().lower()
    broker = redis.Redis.from_url(url)
    assert broker.llen(INTERACTIVE_QUEUE) == 0 and not broker.hlen("unacked")  # all acked
    broker.close()
