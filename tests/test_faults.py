"""Faults lose nothing: real ``realscore worker`` processes (with faults injected by
``tests.fault_worker``), a private ``redis-server`` per test (the two full-Redis tests share one,
and its worker), and RabbitMQ where it runs.

Every wait is a bounded poll; no assertion depends on how fast anything ran. Timeouts are set
short for the tests (a 10 s visibility timeout, a 2.5 s forward deadline, two attempts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from shared.task_names import BULK_QUEUE, INTERACTIVE_QUEUE, SCORE, SCORE_MANY
from tests.processes import WorkerProcess, free_port, wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import fill, private_redis
from worker.serving.attempts import read_dead_letters

pytestmark = [
    pytest.mark.integration,
    # AsyncResults of a private Redis may be collected after it is gone: harness noise.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
START = 120
SHORT = {
    "REALSCORE_VISIBILITY_TIMEOUT": "10",
    "REALSCORE_FETCH_TIMEOUT": "2",
    "REALSCORE_FORWARD_TIMEOUT": "2.5",
    "REALSCORE_MAX_ATTEMPTS": "2",
}
RABBIT = ("127.0.0.1", 5672)


def _rabbit_usable() -> bool:
    try:
        socket.create_connection(RABBIT, timeout=1).close()
    except OSError:
        return False
    return shutil.which("rabbitmqctl") is not None


@contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A fresh RabbitMQ vhost (so parallel runs never share queues); yields the broker URL."""
    if not _rabbit_usable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672 (or no rabbitmqctl)")
    name = f"realscore-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True, capture_output=True, timeout=60,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@contextmanager
def brokers(kind: str) -> Iterator[tuple[str, str]]:
    """(broker URL, result backend URL): a private Redis for both, or RabbitMQ + that Redis."""
    with private_redis() as results:
        if kind == "redis":
            yield results, results
        else:
            with rabbit_vhost() as broker:
                yield broker, results


def make_app(broker: str, backend: str) -> Celery:
    from shared.celery_app import configure
    from shared.settings import load_settings

    app = configure(Celery("realscore-faults"), load_settings(broker_url=broker, result_backend=backend))
    app.conf.result_backend_transport_options = {
        **app.conf.result_backend_transport_options, "retry_policy": {"max_retries": 0}
    }
    return app


def fault_worker(worker_env: dict, broker: str, backend: str, log: Path, *args: str, **env: str) -> WorkerProcess:
    merged = {**worker_env, **SHORT, "REALSCORE_BROKER_URL": broker, "REALSCORE_RESULT_BACKEND": backend}
    merged.pop("REALSCORE_METRICS_PORT", None)
    merged.update(env)
    process = WorkerProcess(merged, log, extra_args=["--concurrency", "8", "--without-mingle", "--without-gossip", *args])
    process.args[process.args.index("shared.cli")] = "tests.fault_worker"
    return process


def kill(process: WorkerProcess) -> None:
    os.killpg(process.process.pid, signal.SIGKILL)
    process.process.wait(10)


def active_on(app: Celery, node: str) -> int:
    reply = app.control.inspect([node], timeout=1).active() or {}
    return len(reply.get(node, []))


@pytest.fixture(scope="module")
def pictures(served_dir: Path) -> list[str]:
    folder = served_dir / "faults"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(4):
        noise_image(70 + i, (64 + 8 * i, 56)).save(folder / f"f{i}.png")
        paths.append(str(folder / f"f{i}.png"))
    return paths


def consistent(results: list[dict]) -> None:
    """Every image scored, and the same image always got the same score (no two different
    answers for one piece of work)."""
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    by_uri: dict[str, set[float]] = {}
    for r in results:
        by_uri.setdefault(r["uri"], set()).add(round(r["score"], 4))
    assert all(len(scores) == 1 for scores in by_uri.values()), by_uri


# A worker killed mid-run ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_sigkill_one_of_two_workers_loses_nothing(kind: str, worker_env: dict, pictures: list[str], tmp_path: Path) -> None:
    with brokers(kind) as (broker, backend):
        app = make_app(broker, backend)
        # The victim's batches wait 10 s to fill, so it is holding work when it dies; the
        # survivor also runs out of memory above 4 images a batch and must shrink, not fail.
        victim = fault_worker(
            worker_env, broker, backend, tmp_path / "victim.log",
            REALSCORE_MAX_WAIT_MS="10000", REALSCORE_MAX_BATCH_SIZE="64",
        ).start()
        survivor = fault_worker(worker_env, broker, backend, tmp_path / "survivor.log", FAULT_FORWARD="oom-above:4").start()
        try:
            victim.wait_ready(app, START)
            survivor.wait_ready(app, START)
            for queue in (INTERACTIVE_QUEUE, BULK_QUEUE):  # the survivor waits, the victim takes all
                app.control.cancel_consumer(queue, destination=[survivor.node], reply=True, timeout=5)
            singles = [app.send_task(SCORE, args=[pictures[i % 4]]) for i in range(12)]
            chunks = [
                app.send_task(SCORE_MANY, args=[[pictures[(i + j) % 4] for j in range(40)]], queue=BULK_QUEUE)
                for i in range(3)
            ]
            wait_until(lambda: active_on(app, victim.node) >= 8, 60, "the victim holds tasks")
            kill(victim)
            for queue in (INTERACTIVE_QUEUE, BULK_QUEUE):
                app.control.add_consumer(queue, destination=[survivor.node], reply=True, timeout=5)
            timeout = 10 + 60  # the visibility timeout plus their own work, generously
            results = [h.get(timeout=timeout) for h in singles]
            for handle in chunks:
                results.extend(handle.get(timeout=timeout))
            # The web backend's client works on this broker too.
            from shared import client

            original, client.app = client.app, app
            try:
                results.append(client.score(pictures[0], timeout=60))
                results.extend(client.score_many(pictures * 70, timeout=120))  # two tasks
            finally:
                client.app = original
        finally:
            victim.stop()
            code = survivor.stop()
        assert len(results) == 12 + 3 * 40 + 1 + 280
        consistent(results)
        assert code == 0, survivor.log()
        assert "max batch size is now" in survivor.log()
        assert "succeeded" not in victim.log()  # everything was answered by the survivor


# A broken or hung model ------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_a_broken_model_requeues_its_work_and_exits_nonzero(fault: str, worker_env: dict, pictures: list[str], tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    with private_redis() as url:
        app = make_app(url, url)
        sick = fault_worker(
            worker_env, url, url, tmp_path / "sick.log",
            FAULT_FORWARD=fault, FAULT_TRIGGER=str(trigger), REALSCORE_MAX_WAIT_MS="2000",
        ).start()
        # Started now (its start-up overlaps the sick one's), but consuming only the bulk queue,
        # where nothing is sent, until the sick worker has exited: all the work goes to the sick.
        healthy = fault_worker(worker_env, url, url, tmp_path / "healthy.log", "--queues", BULK_QUEUE).start()
        try:
            sick.wait_ready(app, START)
            assert app.send_task(SCORE, args=[pictures[0]]).get(timeout=60)["ok"]  # it worked once
            trigger.touch()  # from now on every forward fails (or hangs)
            singles = [app.send_task(SCORE, args=[pictures[i % 4]]) for i in range(6)]
            chunk = app.send_task(SCORE_MANY, args=[pictures * 5])
            code = sick.process.wait(60)  # it stops by itself
            assert code != 0, sick.log()
            assert "the model is broken" in sick.log()
            healthy.wait_ready(app, START)
            app.control.add_consumer(INTERACTIVE_QUEUE, destination=[healthy.node], reply=True, timeout=5)
            results = [h.get(timeout=60) for h in singles] + chunk.get(timeout=60)
        finally:
            sick.stop()
            healthy.stop()
        consistent(results)  # none of them became an `internal` error
        assert len(results) == 6 + 20
        assert read_dead_letters(redis.Redis.from_url(url)) == []


# A poison image ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_uri_that_kills_its_worker_fails_alone_in_its_chunk(worker_env: dict, pictures: list[str], served_dir: Path, tmp_path: Path) -> None:
    poison = served_dir / "faults" / "crash-worker.png"
    noise_image(99, (64, 64)).save(poison)
    # 64 images, the poison at 30: more than a batch (16) on either side of it. Each careful
    # delivery scores its images one at a time, well within the visibility timeout (10 s).
    at = 30
    uris = [pictures[i % 4] for i in range(64)]
    uris[at] = str(poison)
    with private_redis() as url:
        app = make_app(url, url)
        store = redis.Redis.from_url(url)
        starts = 0

        def new_worker() -> WorkerProcess:
            nonlocal starts
            starts += 1
            return fault_worker(
                worker_env, url, url, tmp_path / f"w{starts}.log", FAULT_EXIT_URI="crash-worker",
                REALSCORE_MAX_WAIT_MS="5",  # image by image: no waiting for company
            ).start()

        current = new_worker()
        try:
            current.wait_ready(app, START)
            handle = app.send_task(SCORE_MANY, args=[uris])

            def answered() -> bool:
                nonlocal current
                if current.process.poll() is not None:  # a supervisor restarts what died
                    current = new_worker()
                return AsyncResult(handle.id, app=app).ready()

            wait_until(answered, 180, "the chunk answered")
            rows = handle.get(timeout=5)
        finally:
            current.stop()
        assert starts == 3, (AsyncResult(handle.id, app=app).state, str(AsyncResult(handle.id, app=app).result)[:800])  # delivery 1 crashed, the careful last attempt crashed at the poison
        failed = [(i, row["error"]) for i, row in enumerate(rows) if not row["ok"]]
        assert [i for i, _ in failed] == [at], failed[:5]
        assert rows[at]["error"]["code"] == "internal" and "died" in rows[at]["error"]["message"]
        assert sum(row["ok"] for row in rows) == len(uris) - 1
        letters = read_dead_letters(store)
        assert [(entry["task_id"], entry["uris"]) for entry in letters] == [(handle.id, [str(poison)])]
        store.close()


# Deploys ------------------------------------------------------------------------------------------


def test_warm_shutdown_hands_back_unstarted_images_at_once(worker_env: dict, pictures: list[str], tmp_path: Path) -> None:
    with private_redis() as url:
        app = make_app(url, url)
        # Two threads and a 1 s batch window: a 256-image chunk would take minutes.
        process = fault_worker(worker_env, url, url, tmp_path / "w.log", "--concurrency", "2", REALSCORE_MAX_WAIT_MS="1000").start()
        try:
            process.wait_ready(app, START)
            handle = app.send_task(SCORE_MANY, args=[[pictures[i % 4] for i in range(256)]])
            wait_until(lambda: active_on(app, process.node) == 1, 60, "the chunk started")
            process.process.send_signal(signal.SIGTERM)
            code = process.process.wait(60)
        finally:
            process.stop()
        assert code == 0, process.log()
        broker = redis.Redis.from_url(url)
        assert broker.llen(INTERACTIVE_QUEUE) == 1, process.log()  # back in the queue, whole
        assert not broker.hlen("unacked")
        assert AsyncResult(handle.id, app=app).state != "SUCCESS"
        broker.close()


# Redis restarted mid-run ------------------------------------------------------------------------


@contextmanager
def persistent_redis(folder: Path) -> Iterator[tuple[str, callable]]:
    """A ``redis-server`` run as compose runs it (append-only, ``noeviction``) in ``folder``;
    yields its URL and a function that restarts it on the same port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--appendonly", "yes", "--maxmemory", "256mb", "--maxmemory-policy", "noeviction", "--save", "",
    ]
    url = f"redis://127.0.0.1:{port}/0"
    state = {"process": None}

    def up() -> None:
        state["process"] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:  # not listening yet, or still loading the append-only file
                return False

        wait_until(answers, 20, "redis-server up")
        client.close()

    def restart() -> None:
        state["process"].terminate()  # a clean stop: the append-only file is flushed
        state["process"].wait(20)
        up()

    up()
    try:
        yield url, restart
    finally:
        state["process"].terminate()
        state["process"].wait(20)


def test_a_redis_restart_mid_run_loses_nothing(worker_env: dict, pictures: list[str], tmp_path: Path) -> None:
    data = tmp_path / "redis-data"
    data.mkdir()
    with persistent_redis(data) as (url, restart):
        from shared.celery_app import configure
        from shared.settings import load_settings

        app = configure(Celery("realscore-restart"), load_settings(broker_url=url, result_backend=url))
        process = fault_worker(worker_env, url, url, tmp_path / "w.log", REALSCORE_MAX_WAIT_MS="1000").start()
        try:
            process.wait_ready(app, START)
            before = [app.send_task(SCORE, args=[pictures[i % 4]]) for i in range(8)]
            before.append(app.send_task(SCORE_MANY, args=[pictures * 16]))
            restart()
            during = [app.send_task(SCORE, args=[pictures[i % 4]]) for i in range(4)]
            def pong() -> bool:
                try:
                    return bool(app.control.ping(destination=[process.node], timeout=1))
                except (redis.ConnectionError, OSError):  # our control connection from before the restart
                    return False

            wait_until(pong, 60, "worker reconnected")
            after = [app.send_task(SCORE_MANY, args=[pictures * 4]) for _ in range(2)]
            # Callers' timeouts exceed the restart plus the visibility timeout (10 s).
            results = []
            for handle in before + during + after:
                value = handle.get(timeout=90)
                results.extend(value if isinstance(value, list) else [value])
        finally:
            code = process.stop()
        assert len(results) == 8 + 64 + 4 + 2 * 16
        consistent(results)
        assert code == 0, process.log()


# The bulk gate ----------------------------------------------------------------------------------


def test_a_skipped_redelivery_gives_its_bulk_slot_back(worker_env: dict, pictures: list[str], tmp_path: Path) -> None:
    """A redelivered chunk whose result already succeeded is acknowledged by Celery without
    running (no task signal fires): with one bulk slot, the next chunk must still be taken."""
    import json

    with private_redis() as url:
        app = make_app(url, url)
        broker = redis.Redis.from_url(url)
        done = [{"uri": pictures[0], "ok": True, "score": 0.5, "error": None}]
        skipped = app.send_task(SCORE_MANY, args=[[pictures[0]]], queue=BULK_QUEUE)  # no worker yet
        app.backend.store_result(skipped.id, done, "SUCCESS")
        # As kombu restores an unacknowledged message: flagged redelivered.
        payload = json.loads(broker.rpop(BULK_QUEUE))
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
        broker.lpush(BULK_QUEUE, json.dumps(payload))
        process = fault_worker(worker_env, url, url, tmp_path / "w.log", REALSCORE_BULK_TASK_SLOTS="1").start()
        try:
            process.wait_ready(app, START)
            wait_until(
                lambda: "already completed successfully" in process.log() and not broker.hlen("unacked"),
                60, "the redelivered chunk skipped and acknowledged",
            )
            rows = app.send_task(SCORE_MANY, args=[pictures], queue=BULK_QUEUE).get(timeout=60)
        finally:
            code = process.stop()
        assert [row["ok"] for row in rows] == [True] * 4
        assert AsyncResult(skipped.id, app=app).get(timeout=5) == done  # not run again
        assert code == 0, process.log()
        broker.close()


# A full Redis -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noeviction_worker(worker_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[redis.Redis, Celery, WorkerProcess, Path]]:
    """A private Redis under ``noeviction`` (as compose runs it) and a one-thread fault worker on
    it whose fetch of any picture named ``hold-*`` waits while the release file exists. Yields
    (store, app, worker, release file). The full-Redis tests share it (one start-up, not one
    each): each must leave it running, and it must stop cleanly after them. They come last in
    this module, so that it stops right after them."""
    folder = tmp_path_factory.mktemp("full-redis")
    release = folder / "hold"
    with private_redis() as url:
        store = redis.Redis.from_url(url)
        store.config_set("maxmemory-policy", "noeviction")
        process = fault_worker(
            worker_env, url, url, folder / "w.log", "--concurrency", "1",
            FAULT_HOLD_URI="hold-", FAULT_TRIGGER=str(release),
        ).start()
        try:
            app = make_app(url, url)
            process.wait_ready(app, START)
            yield store, app, process, release
        finally:
            code = process.stop()
            store.close()
        assert code == 0, process.log()


@contextmanager
def _holding(
    noeviction_worker: tuple[redis.Redis, Celery, WorkerProcess, Path], served_dir: Path, name: str, seed: int
) -> Iterator[tuple[redis.Redis, Celery, WorkerProcess, AsyncResult, Path, Callable[[], str]]]:
    """The shared ``noeviction`` worker in the middle of a ``score`` task whose fetch of the
    picture ``name`` (``hold-*``) waits while the release file exists. Yields (store, app, worker,
    the task, release file, the worker's log since this test began)."""
    store, app, process, release = noeviction_worker
    assert process.process.poll() is None, process.log()
    assert not store.llen(INTERACTIVE_QUEUE) and not store.hlen("unacked")  # nothing left over
    begun = len(process.log())
    held = served_dir / "faults" / f"{name}.png"
    held.parent.mkdir(exist_ok=True)
    noise_image(seed, (64, 64)).save(held)
    release.touch()
    try:
        task = app.send_task(SCORE, args=[str(held)])
        wait_until(lambda: active_on(app, process.node) == 1, 60, "the held task in the worker's hands")
        yield store, app, process, task, release, lambda: process.log()[begun:]
    finally:  # room again, and nothing held, for the next test (also after a failure)
        release.unlink(missing_ok=True)
        fillers = store.keys("filler:*")
        if fillers:
            store.delete(*fillers)
        store.config_set("maxmemory", 0)


def test_a_result_that_cannot_be_written_to_a_full_redis_is_not_lost(noeviction_worker, served_dir: Path) -> None:
    """Under ``noeviction`` a full Redis refuses the result write: the message must not be
    acknowledged. Once memory is freed, the task runs again and its caller gets the real result."""
    # One thread, so one prefetch slot: the redelivery is only taken if the refused requeue
    # gave this worker's slot back.
    with _holding(noeviction_worker, served_dir, "hold-full", 7) as (store, app, process, handle, release, log):
        held = served_dir / "faults" / "hold-full.png"
        fill(store)  # from now on every write is refused
        release.unlink()  # the task scores its image and tries to write the result
        wait_until(lambda: "Redis refused to reject" in log(), 60, "the requeue refused")
        assert "result not stored" in log()
        assert process.process.poll() is None, process.log()  # the worker carries on
        assert store.hlen("unacked") == 1  # not acknowledged: still Redis's to redeliver
        assert AsyncResult(handle.id, app=app).state == "PENDING"
        store.delete(*store.keys("filler:*"))
        # Redelivered after the visibility timeout (10 s), then scored again.
        result = handle.get(timeout=90)
        assert result["ok"] and result["uri"] == str(held), result
        assert isinstance(result["score"], float)
        assert "result write failed" in log()
        wait_until(lambda: not store.hlen("unacked"), 10, "the redelivery acknowledged")
        assert process.process.poll() is None, process.log()


@pytest.mark.slow  # the first task waits out the visibility timeout
def test_a_message_taken_from_a_full_redis_is_not_lost(noeviction_worker, pictures: list[str], served_dir: Path) -> None:
    """Redis lets a worker pop a queued message when full (BRPOP frees memory) but refuses to
    record it as unacknowledged (ZADD/HSET): the message must go back to its queue, and the worker
    carry on, taking it once there is room."""
    # One thread, one prefetch slot: the second task stays queued until the first gives its
    # slot back, which it does (its requeue refused) only once Redis is full.
    with _holding(noeviction_worker, served_dir, "hold-popped", 8) as (store, app, process, first, release, log):
        held = served_dir / "faults" / "hold-popped.png"
        queued = app.send_task(SCORE, args=[pictures[0]])
        assert store.llen(INTERACTIVE_QUEUE) == 1
        fill(store)
        release.unlink()  # the first task's result is refused, its slot given back: the worker pops
        wait_until(lambda: "went back to its queue" in log(), 60, "the popped message put back")
        assert process.process.poll() is None, process.log()  # the worker carries on
        # Back in the queue (the worker pops it again about once a second and puts it back).
        wait_until(lambda: store.llen(INTERACTIVE_QUEUE) == 1, 10, "the second task queued")
        assert store.hlen("unacked") == 1  # the first task, for redelivery
        store.delete(*store.keys("filler:*"))
        second = queued.get(timeout=60)
        result = first.get(timeout=90)  # redelivered after the visibility timeout (10 s)
        assert second["ok"] and second["uri"] == pictures[0], second
        assert result["ok"] and result["uri"] == str(held), result
        wait_until(
            lambda: not store.hlen("unacked") and not store.llen(INTERACTIVE_QUEUE), 10, "both acknowledged"
        )
        assert process.process.poll() is None, process.log()
        # kombu's sweeps on a full Redis are not logged as errors with a traceback each second.
        assert "Error in timer" not in log() and "binding_expiry" not in log()
