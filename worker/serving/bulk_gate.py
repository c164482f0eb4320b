"""Caps the bulk chunks one worker process has in hand, so interactive work always finds a thread.

Celery's thread pool prefetches one message per task thread and a message holds its thread
until it is acknowledged (late acks). With a bulk backlog queued, every thread would end up
holding a chunk, and an interactive message would not even be received until one finished: the
batcher's interactive lane would never see it. So when the ``BULK_TASK_SLOTS``-th bulk chunk is
received, this gate stops consuming ``realscore.bulk`` (Celery's own ``cancel_task_queue``, called
right there on the consumer's thread, before it asks Redis for another message) and resumes when
one of them finishes. The other threads and prefetch slots stay for interactive messages, which
Redis hands out first (``queue_order_strategy: priority``). The slots themselves are a semaphore
too, so a chunk received in any race waits for one (its wait counts no delivery attempt).

A chunk leaves the gate when its message is acknowledged or rejected
(``worker.serving.delivery.DeliveredRequest``, the request class of every realscore task), not on
``task_postrun``: Celery skips a redelivered
message whose result already succeeded (``worker_deduplicate_successful_tasks``) without any
task signal, and acknowledges it; counted out on a signal, that chunk would hold its slot for
good, and after ``BULK_TASK_SLOTS`` such skips the worker would take no bulk work at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import bootsteps, signals

from shared.task_names import BULK_QUEUE

log = logging.getLogger(__name__)


def _is_bulk(delivery_info: dict | None) -> bool:
    return (delivery_info or {}).get("routing_key") == BULK_QUEUE


class BulkGate:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self.in_hand = 0
        # The worker's Request objects of the bulk chunks in hand, by identity (held, so an id is
        # not reused while in here).
        self._held: dict[int, Any] = {}
        self._paused = False
        self._consumer: Any = None
        self._managed: bool | None = None  # whether this worker consumes the bulk queue at all

    # Celery's side -----------------------------------------------------------------------------
    def attach(self, consumer: Any) -> None:
        """The consumer whose bulk queue this gate closes and opens (again after a reconnect;
        the queue stays off if the gate had closed it)."""
        with self._lock:
            if self._managed is None:  # first start: a `-Q realscore` worker is left alone
                self._managed = BULK_QUEUE in consumer.app.amqp.queues.consume_from
            self._consumer = consumer if self._managed else None
            managed = self._managed
        if managed:  # a chunk may have finished while detached: consume bulk again if below the cap
            self._apply(consumer)

    def detach(self) -> None:
        with self._lock:
            self._consumer = None

    def received(self, request: Any) -> None:
        """A message was received (on the consumer's thread): close the queue at the cap."""
        if not _is_bulk(getattr(request, "delivery_info", None)):
            return
        with self._lock:
            if id(request) in self._held:
                return
            self._held[id(request)] = request
            self.in_hand = len(self._held)
            close = self.in_hand >= self.slots and not self._paused
            self._paused = self._paused or close
            consumer = self._consumer
        if close and consumer is not None:
            self._apply(consumer)  # now, before the consumer fetches its next message

    def finished(self, request: Any) -> None:
        """A bulk message was acknowledged or rejected (any thread): reopen the queue below the
        cap. Once per message, however many ways it ends."""
        with self._lock:
            if self._held.pop(id(request), None) is None:
                return
            self.in_hand = len(self._held)
            reopen = self.in_hand < self.slots and self._paused
            self._paused = self._paused and not reopen
            consumer = self._consumer
        if reopen and consumer is not None:
            consumer.call_soon(self._apply, consumer)  # the consumer's loop runs it

    def _apply(self, consumer: Any) -> None:
        """Make the bulk queue consumed or not as wanted *now* (callbacks may run out of order)."""
        with self._lock:
            paused = self._paused
        task_consumer = consumer.task_consumer
        if task_consumer is None:
            return
        consuming = task_consumer.consuming_from(BULK_QUEUE)
        if paused and consuming:
            consumer.cancel_task_queue(BULK_QUEUE)
        elif not paused and not consuming:
            consumer.add_task_queue(BULK_QUEUE)

    # The task's side ---------------------------------------------------------------------------
    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            yield


_gate: BulkGate | None = None


def message_done(request: Any) -> None:
    """``request``'s message was acknowledged or rejected (:class:`DeliveredRequest` calls this)."""
    if _gate is not None:
        _gate.finished(request)


def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if _gate is not None and request is not None:
        _gate.received(request)


def install(gate: BulkGate | None) -> None:
    """Use ``gate`` in this worker process (``None``: no cap)."""
    global _gate
    _gate = gate
    if gate is not None:
        signals.task_received.connect(_on_received, weak=False)


@contextmanager
def bulk_slot(is_bulk: bool) -> Iterator[None]:
    """One of the bulk slots, for bulk work when a gate is installed; nothing otherwise."""
    gate = _gate
    if gate is None or not is_bulk:
        yield
        return
    with gate.slot():
        yield


class GateStep(bootsteps.StartStopStep):
    """Hands the worker's consumer to the installed gate (added to ``app.steps['consumer']``)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if _gate is not None:
            _gate.attach(c)

    def stop(self, c: Any) -> None:
        if _gate is not None:
            _gate.detach()

    shutdown = stop
