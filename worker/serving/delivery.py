"""What every task delivery goes through, in one place: the Celery ``Task`` base class.

Task bodies (``worker.serving.tasks``) only turn URIs into rows. Around them, :class:`DeliveredTask`

* hands the message back to the queue (``Reject(requeue=True)``) when this worker cannot do the
  work: its model is broken (before the body, or while it ran: rows that failed because the
  model broke are never stored as results) or it is shutting down and the body had not started
  its images; that delivery is not counted as an attempt;
* counts deliveries per task id (:mod:`worker.serving.attempts`) and gives the body a
  :class:`Plan`: the usual batched run, image by image with a mark per image on the last
  attempts (so one image that crashes its worker is pinned and fails alone), or give up;
* records what is given up in the dead-letter list;
* writes the result itself, retrying a failing write (a full Redis under ``noeviction``) and
  handing the message back if it still fails, instead of acknowledging work whose result is lost;
  when Redis refuses the hand-back too, :class:`DeliveredRequest` leaves the message
  unacknowledged there, for Redis to redeliver after the visibility timeout.

Redis errors in the bookkeeping are logged and never fail a task: it runs as a first delivery.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import BackendStoreError, Reject
from celery.worker.request import Request
from kombu.transport.redis import QoS as RedisQoS
from kombu.transport.virtual import QoS as VirtualQoS

from worker.serving import bulk_gate, late_starts, runtime
from worker.serving.batcher import ModelBroken

log = logging.getLogger(__name__)
STORE_RETRIES = (0.5, 1.0, 2.0, 4.0)  # seconds between tries of a failing result write


class HandBack(Exception):
    """The body stopped because this worker should not do the work (shutting down)."""


@dataclass
class Plan:
    """How the body of one delivery runs its images."""

    careful: bool = False  # one image at a time, each marked first
    poisoned: frozenset[int] = frozenset()  # images that were in hand when workers died
    give_up: str | None = None  # reason to answer every image with ``internal`` instead
    attempt: int = 0
    mark: Callable[[int], None] = field(default=lambda index: None)
    received: float | None = None  # when this worker received the message (time.monotonic)
    task_id: str | None = None


_plan: contextvars.ContextVar[Plan] = contextvars.ContextVar("realscore_plan", default=Plan())


def current_plan() -> Plan:
    """The plan of the delivery running on this thread (a default plan outside a task)."""
    return _plan.get()


def note_images_start() -> None:
    """The delivery's images start now (after any wait for a bulk slot): warn and count if that
    is late against the visibility timeout (:mod:`worker.serving.late_starts`)."""
    plan = current_plan()
    timeout = runtime.current().service.settings.visibility_timeout
    late_starts.guard.check(plan.received, timeout, plan.task_id)


def check_not_draining() -> None:
    """Raise :class:`HandBack` when the worker is shutting down (called before each image)."""
    current = runtime.current()
    if current.draining.is_set():
        raise HandBack("this worker is shutting down")


class DeliveredTask(Task):
    """The base class of every realscore task (``app.task(base=DeliveredTask)``)."""

    Request = "worker.serving.delivery:DeliveredRequest"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        current = runtime.current()
        if not current.service.healthy:
            raise Reject("this worker's model is broken; another worker takes the task", requeue=True)
        if current.draining.is_set():
            raise Reject("this worker is shutting down; another worker takes the task", requeue=True)
        task_id = self.request.id
        counter = current.attempts
        attempt = _safely(lambda: counter.record(task_id), None) if counter and task_id else None
        plan = self._plan(task_id, attempt, args)
        plan.received = getattr(self.request, late_starts.RECEIVED_FIELD, None)
        plan.task_id = task_id
        token = _plan.set(plan)
        try:
            rows = self.run(*args, **kwargs)
        except (ModelBroken, HandBack) as error:
            self._hand_back(task_id, attempt, error)
        finally:
            _plan.reset(token)
        if not current.service.healthy and _has_internal(rows):
            self._hand_back(task_id, attempt, ModelBroken("the model broke while this task ran"))
        self._store(task_id, rows)
        if attempt is not None:
            _safely(lambda: counter.done(task_id, attempt), None)
        return rows

    def _plan(self, task_id: str | None, attempt: int | None, args: tuple) -> Plan:
        counter = runtime.current().attempts
        if attempt is None or counter is None or not task_id or not counter.careful(attempt):
            return Plan(attempt=attempt or 0)
        settings = runtime.current().service.settings
        # A live careful run marks each image: at most a fetch and, queued behind one batch, two
        # forward passes apart.
        stale = settings.fetch_timeout + 2 * settings.forward_timeout + 1.0
        poisoned, live, newly = _safely(lambda: counter.poisoned(task_id, stale), (set(), False, None))
        if counter.exhausted(attempt) and not poisoned and not live:
            reason = (
                f"given up after {attempt - 1} deliveries that never finished "
                "(did this message crash its worker?)"
            )
            _safely(lambda: counter.dead_letter(task_id, self.name, reason, _uris(args), attempt), None)
            return Plan(give_up=reason, attempt=attempt)
        uris = _uris(args)
        if newly is not None and newly < len(uris):
            reason = f"image {newly} was being scored when its worker died (delivery {attempt - 1})"
            _safely(lambda: counter.dead_letter(task_id, self.name, reason, [uris[newly]], attempt), None)
        log.warning("task %s: delivery %d, scoring image by image", task_id, attempt)
        return Plan(
            careful=True,
            poisoned=frozenset(poisoned),
            attempt=attempt,
            mark=lambda index: _safely(lambda: counter.mark(task_id, index), None),
        )

    def _hand_back(self, task_id: str | None, attempt: int | None, error: BaseException) -> None:
        counter = runtime.current().attempts
        if attempt is not None and counter is not None and task_id:
            _safely(lambda: counter.hand_back(task_id), None)
        log.warning("task %s goes back to the queue: %s", task_id, error)
        raise Reject(str(error), requeue=True)

    def _store(self, task_id: str | None, rows: Any) -> None:
        """Write the result before Celery acknowledges the message; a write that keeps failing
        hands the message back rather than acknowledging a task whose result is lost.

        Celery's own write after us is then switched off (``ignore_result`` on this request,
        which its ``mark_as_done`` reads): it would read the result back, and when the waiting
        client had already read and deleted it (``shared.client`` does at once), write it again,
        to stay in Redis for ``RESULT_EXPIRES``. Events (Flower) are unaffected."""
        if not task_id or self.request.called_directly:
            return
        for pause in (*STORE_RETRIES, None):
            try:
                self.backend.store_result(task_id, rows, states.SUCCESS, request=self.request)
                self.request.ignore_result = True
                return
            except (redis.RedisError, BackendStoreError) as error:
                # A connection error was retried by Celery itself (result_backend_always_retry,
                # minutes of backoff) before BackendStoreError: hand back at once. What Celery
                # does not retry (a full Redis: OutOfMemoryError) is retried here.
                if pause is None or isinstance(error, BackendStoreError):
                    log.error("task %s: result not stored (%r); the message goes back", task_id, error)
                    raise Reject(f"result not stored: {error!r}", requeue=True) from None
                log.warning("task %s: result write failed (%r); retrying in %g s", task_id, error, pause)
                time.sleep(pause)


class DeliveredRequest(Request):
    """The worker-side request of every realscore task. Every way a message leaves this worker
    goes through ``acknowledge`` or ``reject`` (success, failure, ``Reject``, revoke, time
    limits, and Celery's skip of a redelivered task that already succeeded, which fires no task
    signal): the bulk gate counts its chunks out here.

    On Redis, a broker that refuses the acknowledgement or the requeue itself (over ``maxmemory``
    under ``noeviction`` kombu's requeue, a MULTI, is refused whole; ``MISCONF`` refuses every
    write) would raise in the worker's event loop and end the worker ("Unrecoverable error").
    Instead the refusal is logged and the message left in Redis's unacknowledged set, which
    redelivers it after ``VISIBILITY_TIMEOUT``; only this worker's prefetch slot is freed."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        # Created as the message is received: the task sees this as a field of its request.
        self._request_dict[late_starts.RECEIVED_FIELD] = time.monotonic()
        if isinstance(getattr(message.channel, "qos", None), RedisQoS):
            # kombu's ack_log_error/reject_log_error call these, on the consumer's loop.
            message.ack = functools.partial(_settle_or_leave, message, type(message).ack)
            message.reject = functools.partial(_settle_or_leave, message, type(message).reject)

    def acknowledge(self) -> None:
        try:
            super().acknowledge()
        finally:
            bulk_gate.message_done(self)

    def reject(self, requeue: bool = False) -> None:
        try:
            super().reject(requeue=requeue)
        finally:
            bulk_gate.message_done(self)


def _settle_or_leave(message: Any, settle: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Ack or requeue ``message``; if Redis refuses, leave it unacknowledged there (see
    :class:`DeliveredRequest`)."""
    try:
        settle(message, *args, **kwargs)
    except redis.ResponseError as error:
        log.error(
            "Redis refused to %s message %s (%r): it stays unacknowledged and is redelivered "
            "after the visibility timeout",
            getattr(settle, "__name__", "settle"), message.delivery_tag, error,
        )
        VirtualQoS.ack(message.channel.qos, message.delivery_tag)  # this worker's books only


def _safely(call: Callable[[], Any], fallback: Any) -> Any:
    """Bookkeeping that must not fail the task: a Redis error is logged and ``fallback`` used."""
    try:
        return call()
    except redis.RedisError as error:
        log.warning("delivery bookkeeping failed (%r); carrying on without it", error)
        return fallback


def _uris(args: tuple) -> list:
    if not args:
        return []
    first = args[0]
    return list(first) if isinstance(first, list) else [first]


def _has_internal(rows: Any) -> bool:
    listed = rows if isinstance(rows, list) else [rows]
    return any(
        isinstance(row, dict) and isinstance(row.get("error"), dict) and row["error"].get("code") == "internal"
        for row in listed
    )
