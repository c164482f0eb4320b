"""Enqueue images and collect results: the API a web backend uses. Imports no torch or Pillow.

Safe to call from many threads at once. Interactive tasks carry ``expires`` equal to the caller's
timeout, so work nobody waits for any more is dropped by the worker instead of scored.

    from shared import client
    result = client.score("s3://media/uploads/abc.jpg", timeout=10)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from shared.celery_app import app
from shared.results import Result
from shared.task_names import BULK_QUEUE, EMBED, INTERACTIVE_QUEUE, MAX_URIS_PER_TASK, SCORE, SCORE_MANY


class ScoreTimeout(TimeoutError):
    """No result within the caller's timeout (the task expires and is dropped, not scored later)."""


def chunks(items: Sequence[Any], size: int = MAX_URIS_PER_TASK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def submit(uri: str, *, timeout: float | None = None, queue: str = INTERACTIVE_QUEUE) -> AsyncResult:
    """Enqueue one image; returns at once. ``timeout`` (seconds) becomes the task's expiry."""
    return app.send_task(SCORE, args=[uri], queue=queue, expires=timeout)


def submit_many(
    uris: Sequence[str], *, timeout: float | None = None, queue: str = INTERACTIVE_QUEUE
) -> list[AsyncResult]:
    """Enqueue ``uris`` as ``realscore.score_many`` tasks of at most 256 each."""
    return [
        app.send_task(SCORE_MANY, args=[chunk], queue=queue, expires=timeout)
        for chunk in chunks(list(uris))
    ]


def _wait(handle: AsyncResult, timeout: float) -> Any:
    try:
        value = handle.get(timeout=timeout)
    except CeleryTimeout:
        raise ScoreTimeout(f"no result for task {handle.id} within {timeout} s") from None
    except TaskRevokedError:  # its expiry (our timeout) passed before a worker took it
        raise ScoreTimeout(f"task {handle.id} expired before a worker took it") from None
    handle.forget()  # the caller has it now; do not keep it in Redis until RESULT_EXPIRES
    return value


def score(uri: str, timeout: float = 30.0) -> Result:
    """Score one image through the workers and wait for its result dict."""
    return _wait(submit(uri, timeout=timeout), timeout)


def score_many(uris: Sequence[str], timeout: float = 120.0, *, bulk: bool = False) -> list[Result]:
    """Score many images (split into tasks of 256); results in input order.

    ``timeout`` is one deadline for all of them (the tasks all expire at it), not one per task.
    ``bulk=True`` sends them to the bulk queue, behind interactive work, without expiry.
    """
    queue = BULK_QUEUE if bulk else INTERACTIVE_QUEUE
    deadline = time.monotonic() + timeout
    return _gather(submit_many(uris, timeout=None if bulk else timeout, queue=queue), deadline)


def embed_many(uris: Sequence[str], timeout: float = 600.0) -> list[dict]:
    """Pooled tower features for ``uris`` (base64 float16), for training on the workers' GPUs.

    ``timeout`` is one deadline for all of them, as for :func:`score_many`."""
    deadline = time.monotonic() + timeout
    handles = [app.send_task(EMBED, args=[chunk], queue=BULK_QUEUE) for chunk in chunks(list(uris))]
    return _gather(handles, deadline)


def _gather(handles: list[AsyncResult], deadline: float) -> list[Any]:
    """The chunks' result lists, concatenated in order, all waited for within one deadline."""
    rows: list[Any] = []
    for handle in handles:
        rows.extend(_wait(handle, max(deadline - time.monotonic(), 0.001)))
    return rows


def result(task_id: str) -> Result | list[Result] | None:
    """The task's result if it is ready, else ``None``; never blocks (for async web frameworks).

    Raises :class:`RuntimeError` for a task that failed or was revoked (e.g. it expired).
    """
    handle = AsyncResult(task_id, app=app)
    state = handle.state
    if state == "SUCCESS":
        return handle.result
    if state in ("FAILURE", "REVOKED"):
        raise RuntimeError(f"task {task_id} ended {state}: {handle.result!r}")
    return None
