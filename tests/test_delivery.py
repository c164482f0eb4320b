"""The task base class on its own (an eager Celery app, no broker): bookkeeping failures never
fail a task, a failing result write is retried and then handed back, never acknowledged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from celery import Celery
from celery.exceptions import Reject

from shared.settings import load_settings
from worker.serving import delivery, runtime


class BrokenCounter:
    """An attempt counter whose Redis is gone."""

    max_attempts = 3

    def __getattr__(self, name: str):
        def fail(*args: object, **kwargs: object) -> None:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        return fail


class FlakyBackend:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.stored: list[object] = []

    def store_result(self, task_id: str, result: object, state: str, request: object = None) -> None:
        if self.failures:
            self.failures -= 1
            raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        self.stored.append(result)

    def __getattr__(self, name: str):  # Celery's own calls after ours (mark_as_done, cleanup)
        return lambda *args, **kwargs: None


@pytest.fixture()
def task(monkeypatch: pytest.MonkeyPatch):
    app = Celery("delivery-test", broker="memory://", backend="cache+memory://")
    service = SimpleNamespace(healthy=True, settings=load_settings())
    runtime.install(runtime.WorkerRuntime(service, BrokenCounter()))  # type: ignore[arg-type]
    monkeypatch.setattr(delivery, "STORE_RETRIES", (0.0, 0.0))

    ran: list[list[str]] = []

    @app.task(name="t.rows", bind=True, base=delivery.DeliveredTask)
    def rows(self, uris: list[str]) -> list[dict]:
        ran.append(uris)
        return [{"uri": uri, "ok": True, "error": None} for uri in uris]

    rows.ran = ran
    yield rows
    runtime.install(None)


def test_a_bookkeeping_redis_error_does_not_fail_the_task(task) -> None:
    backend = FlakyBackend(failures=0)
    task.backend = backend
    assert task.apply(args=[["/a.png"]], task_id="id-1").get() == [{"uri": "/a.png", "ok": True, "error": None}]
    assert backend.stored  # and its result was written


def test_a_failing_result_write_is_retried(task) -> None:
    backend = FlakyBackend(failures=2)
    task.backend = backend
    task.apply(args=[["/a.png"]], task_id="id-2")
    assert backend.stored == [[{"uri": "/a.png", "ok": True, "error": None}]]


def test_a_result_that_cannot_be_written_hands_the_message_back(task) -> None:
    task.backend = FlakyBackend(failures=99)
    with pytest.raises(Reject) as caught:
        task.request_stack.push(SimpleNamespace(id="id-3", called_directly=False))
        try:
            task._store("id-3", [{"uri": "/a.png"}])
        finally:
            task.request_stack.pop()
    assert caught.value.requeue is True


def test_a_stopping_worker_hands_back_tasks_it_has_not_started(task) -> None:
    runtime.current().draining.set()
    with pytest.raises(Reject) as caught:
        task(["/a.png"])
    assert caught.value.requeue is True
    assert task.ran == []  # nothing was scored


def test_the_result_is_written_once_and_celery_does_not_write_it_back(task) -> None:
    """Through Celery's real (non-eager) trace: our write is the only one. Celery's own, after
    it, would find nothing if the client had already read and deleted the result (as
    ``shared.client`` does at once) and write it back, to stay a day in Redis."""
    from celery.app.trace import build_tracer

    backend = task.app.backend  # a key-value backend, like Redis's
    real_store = backend.store_result
    writes: list[str] = []

    def store_then_read_by_client(task_id: str, result: object, state: str, **kwargs: object) -> object:
        writes.append(state)
        stored = real_store(task_id, result, state, **kwargs)
        backend.forget(task_id)  # the waiting client got it and deleted it
        return stored

    backend.store_result = store_then_read_by_client
    task.backend = backend
    trace = build_tracer(task.name, task, eager=False, propagate=True, app=task.app)
    outcome = trace("id-5", [["/a.png"]], {}, {"id": "id-5", "delivery_info": {}})
    assert outcome.retval == [{"uri": "/a.png", "ok": True, "error": None}]
    assert writes == ["SUCCESS"]
    assert backend.get_task_meta("id-5", cache=False)["status"] == "PENDING"  # not written back


def test_a_write_celery_already_gave_up_on_is_handed_back_at_once(task) -> None:
    from celery.exceptions import BackendStoreError

    class GivenUp(FlakyBackend):
        calls = 0

        def store_result(self, *args, **kwargs):
            GivenUp.calls += 1
            raise BackendStoreError("failed to store result on the backend", state="SUCCESS", task_id="id-4")

    task.backend = GivenUp(failures=0)
    with pytest.raises(Reject):
        task.request_stack.push(SimpleNamespace(id="id-4", called_directly=False))
        try:
            task._store("id-4", [])
        finally:
            task.request_stack.pop()
    assert GivenUp.calls == 1  # Celery's own backoff already ran: not five times over
