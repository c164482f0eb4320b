"""Work in hand against the visibility timeout, at run time: a task whose images start after
more than half of ``REALSCORE_VISIBILITY_TIMEOUT`` in the worker's hands is counted and warned
about (rate-limited), from the moment the worker received its message."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.app.task import Context
from celery.contrib.testing.mocks import TaskMessage
from prometheus_client import REGISTRY

from shared.settings import load_settings
from worker.serving import delivery, late_starts, runtime


def late_count() -> float:
    return REGISTRY.get_sample_value("realscore_late_task_starts_total") or 0.0


def test_late_starts_are_counted_every_time_and_warned_about_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    guard = late_starts.LateStartGuard(interval_s=60, clock=lambda: now[0])
    before = late_count()
    with caplog.at_level(logging.WARNING, logger=late_starts.__name__):
        assert not guard.check(received=96.0, visibility_timeout=10, task_id="a")  # 40 %: fine
        assert guard.check(received=94.0, visibility_timeout=10, task_id="b")  # 60 %
        now[0] = 130.0
        assert guard.check(received=124.0, visibility_timeout=10, task_id="c")  # within the interval
        now[0] = 161.0
        assert guard.check(received=155.0, visibility_timeout=10, task_id="d")
        assert not guard.check(received=None, visibility_timeout=10)  # not received by a worker
    assert late_count() - before == 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings
    assert "task b started 6 s after" in warnings[0] and "60 %" in warnings[0]
    assert "REALSCORE_VISIBILITY_TIMEOUT" in warnings[0] and "--concurrency" in warnings[0]
    assert "2 such task(s)" in warnings[1]  # c and d


@pytest.fixture()
def app_and_task():
    app = Celery("late-starts-test", broker="memory://", backend="cache+memory://")
    service = SimpleNamespace(healthy=True, settings=load_settings(visibility_timeout=10))
    runtime.install(runtime.WorkerRuntime(service, None))  # type: ignore[arg-type]

    @app.task(name="t.late", bind=True, base=delivery.DeliveredTask)
    def late(self, uris: list[str]) -> list[str]:
        delivery.note_images_start()
        return uris

    yield app, late
    runtime.install(None)


def test_the_worker_stamps_each_message_as_it_is_received(app_and_task) -> None:
    app, task = app_and_task
    before = time.monotonic()
    request = delivery.DeliveredRequest(TaskMessage(task.name, id="id-1", args=[["/a.png"]]), app=app, task=task)
    assert before <= request.request_dict[late_starts.RECEIVED_FIELD] <= time.monotonic()


def test_a_task_whose_images_start_late_is_counted(app_and_task) -> None:
    app, task = app_and_task
    before = late_count()
    for waited, task_id in ((1.0, "on-time"), (7.0, "late")):
        task.request_stack.push(
            Context(id=task_id, called_directly=False, **{late_starts.RECEIVED_FIELD: time.monotonic() - waited})
        )
        try:
            assert task(["/a.png"]) == ["/a.png"]
        finally:
            task.request_stack.pop()
    assert late_count() - before == 1  # 7 s of a 10 s visibility timeout; 1 s is fine
