"""Enqueue images and collect results: the API a web backend uses. Imports no torch or Pillow.

Safe to call from many threads at once. Interactive tasks carry ``expires`` equal to the caller's
timeout, so work nobody waits for any more is dropped by the worker instead of scored.

URIs are absolute paths (as the workers see them), ``file://`` or ``s3://`` URIs: a worker has
no working directory of the caller's to resolve a relative path against (``realscore submit``
resolves them against its own before calling this module).

Every error this module raises on purpose is a :class:`RealscoreError`: :class:`ScoreTimeout`,
:class:`BrokerUnavailable` (Redis unreachable; the process recovers on its own once it is back)
and :class:`TaskFailed`.

    from shared import client
    result = client.score("s3://media/uploads/abc.jpg", timeout=10)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from typing import Any

import redis.exceptions
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from shared.celery_app import app
from shared.results import Result
from shared.task_names import BULK_QUEUE, EMBED, INTERACTIVE_QUEUE, MAX_URIS_PER_TASK, SCORE, SCORE_MANY


class RealscoreError(Exception):
    """Base of the errors this client raises on purpose."""


class ScoreTimeout(RealscoreError, TimeoutError):
    """No result within the caller's timeout (the task expires and is dropped, not scored later)."""


class BrokerUnavailable(RealscoreError, ConnectionError):
    """The broker or the result backend (Redis) cannot be reached.

    Raised within the caller's timeout (about a second when Redis refuses connections). Nothing
    needs restarting: the next call connects again. A task that was sent before the outage may
    still be scored; its result is lost to this caller.
    """


class TaskFailed(RealscoreError, RuntimeError):
    """:func:`result` of a task that failed or was revoked (e.g. it expired in the queue)."""


# What kombu and redis-py raise when Redis cannot be reached.
_UNREACHABLE = (
    OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
)


def _backend_gave_up(error: BaseException) -> bool:
    """Celery's result consumer, its reconnects spent, raises a bare RuntimeError ("Retry limit
    exceeded while trying to reconnect to the Celery result store backend") from the last of
    the backend's connection errors. Those also include KeyError, any OSError and kombu's
    InconsistencyError, so its message, not only its cause, says which RuntimeError it is."""
    return isinstance(error, RuntimeError) and (
        isinstance(error.__cause__, _UNREACHABLE) or "retry limit exceeded" in str(error).lower()
    )


def _unreachable(error: BaseException) -> bool:
    return isinstance(error, _UNREACHABLE) or _backend_gave_up(error)


def _broker_unavailable(error: BaseException) -> BrokerUnavailable:
    cause = error.__cause__ if isinstance(error, RuntimeError) and error.__cause__ else error
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return BrokerUnavailable(f"Redis (broker or result backend) is unreachable: {detail}")


@contextmanager
def as_broker_unavailable() -> Iterator[None]:
    """Redis unreachable, however redis-py, kombu or Celery says it: :class:`BrokerUnavailable`.

    Around every call here that talks to Redis, and around the backfill's polling of the task
    handles this module returns: one rule for what "unreachable" is."""
    try:
        yield
    except Exception as error:
        if _unreachable(error):
            raise _broker_unavailable(error) from None
        raise


def _release(handles: Sequence[AsyncResult]) -> None:
    """Stop listening for results nobody will collect, now rather than in ``AsyncResult.__del__``
    (which may run at interpreter exit, when Redis cannot be reached any more)."""
    for handle in handles:
        try:
            handle.backend.remove_pending_result(handle)
        except Exception as error:  # noqa: BLE001 - best effort; only connection errors expected
            if not _unreachable(error):
                raise


def chunks(items: Sequence[Any], size: int = MAX_URIS_PER_TASK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _send(name: str, args: list[Any], queue: str, expires: float | None) -> AsyncResult:
    with as_broker_unavailable():
        return app.send_task(name, args=args, queue=queue, expires=expires)


def submit(uri: str, *, timeout: float | None = None, queue: str = INTERACTIVE_QUEUE) -> AsyncResult:
    """Enqueue one image; returns at once. ``timeout`` (seconds) becomes the task's expiry.

    Raises :class:`BrokerUnavailable` when Redis cannot be reached."""
    return _send(SCORE, [uri], queue, timeout)


def submit_many(
    uris: Sequence[str], *, timeout: float | None = None, queue: str = INTERACTIVE_QUEUE
) -> list[AsyncResult]:
    """Enqueue ``uris`` as ``realscore.score_many`` tasks of at most 256 each."""
    handles: list[AsyncResult] = []
    try:
        for chunk in chunks(list(uris)):
            handles.append(_send(SCORE_MANY, [chunk], queue, timeout))
    except BrokerUnavailable:
        _release(handles)
        raise
    return handles


def _wait(handle: AsyncResult, timeout: float) -> Any:
    """``timeout``: what is left of the caller's deadline."""
    try:
        with as_broker_unavailable():
            value = handle.get(timeout=timeout)
    except CeleryTimeout:
        raise ScoreTimeout(f"no result for task {handle.id} in time ({timeout:.3g} s left)") from None
    except TaskRevokedError:  # its expiry (our timeout) passed before a worker took it
        raise ScoreTimeout(f"task {handle.id} expired before a worker took it") from None
    try:
        handle.forget()  # the caller has it now; do not keep it in Redis until RESULT_EXPIRES
    except Exception as error:
        if not _unreachable(error):
            raise  # Redis went away just now: the result expires on its own
    return value


def score(uri: str, timeout: float = 30.0) -> Result:
    """Score one image through the workers and wait for its result dict.

    Raises :class:`ScoreTimeout` or :class:`BrokerUnavailable`, both within ``timeout``."""
    handle = submit(uri, timeout=timeout)
    try:
        return _wait(handle, timeout)
    except RealscoreError:
        _release([handle])
        raise


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
    handles: list[AsyncResult] = []
    try:
        for chunk in chunks(list(uris)):
            handles.append(_send(EMBED, [chunk], BULK_QUEUE, None))
    except BrokerUnavailable:
        _release(handles)
        raise
    return _gather(handles, deadline)


def _gather(handles: list[AsyncResult], deadline: float) -> list[Any]:
    """The chunks' result lists, concatenated in order, all waited for within one deadline."""
    rows: list[Any] = []
    try:
        for handle in handles:
            rows.extend(_wait(handle, max(deadline - time.monotonic(), 0.001)))
    except RealscoreError:
        _release(handles)
        raise
    return rows


def result(task_id: str) -> Result | list[Result] | None:
    """The task's result if it is ready, else ``None``; never blocks (for async web frameworks).

    Raises :class:`TaskFailed` (a ``RuntimeError``) for a task that failed or was revoked (e.g.
    it expired), :class:`BrokerUnavailable` when Redis cannot be reached.
    """
    handle = AsyncResult(task_id, app=app)
    with as_broker_unavailable():
        state = handle.state
        value = handle.result if state in ("SUCCESS", "FAILURE", "REVOKED") else None
    if state in ("FAILURE", "REVOKED"):
        raise TaskFailed(f"task {task_id} ended {state}: {value!r}")
    return value
