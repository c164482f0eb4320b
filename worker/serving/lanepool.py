"""An ordered ``map`` over a fixed set of long-lived threads, lighter than ``ThreadPoolExecutor``.

``ScoringService.map`` runs one function per image on a lane's threads and yields the results
in input order. ``ThreadPoolExecutor.map`` did that with a ``Future`` per image: a Python
``Condition`` made on submit, taken to mark it running and to resolve it (with ``notify_all``),
waited on with a new lock per wait, plus the executor's idle ``Semaphore`` (another Condition)
per item. On a GPU host that is per-image Python work under the one GIL. Here an item is a
slotted object with one lock, held from creation until the item has run; the consumer acquires
it in order, which is one C call, and does not block at all for items already done.

Semantics kept from ``Executor.map``: every item is queued at once (the function runs for all
of them even if the results are never read), results in input order, the first exception is
raised in its place, and closing the iterator early (or that exception) cancels the items no
thread has started yet. :meth:`shutdown` runs what is queued, then ends the threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class _Item(Generic[T]):
    __slots__ = ("function", "argument", "done", "value", "error", "cancelled")

    def __init__(self, function: Callable[[object], T], argument: object) -> None:
        self.function = function
        self.argument = argument
        self.done = threading.Lock()
        self.done.acquire()  # released once the item has run (or was skipped as cancelled)
        self.value: T | None = None
        self.error: BaseException | None = None
        self.cancelled = False


class LanePool:
    """Up to ``threads`` worker threads, started as work first needs them (daemon threads:
    :meth:`shutdown` is what finishes the queued work)."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.max_threads = threads
        self._name = name
        self._inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # thread start-up and shutdown
        self._shut = False

    def imap(self, function: Callable[[object], T], items: Sequence[object]) -> Iterator[T]:
        """``function`` over ``items``, all queued now; the results (lazily) in input order.

        Not from a function running on this pool (as with ``Executor.map``): once every thread
        waits on a nested map's items, queued behind, none is left to run them."""
        queued = [_Item(function, argument) for argument in items]
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._grow(len(queued))
            for item in queued:
                self._inbox.put(item)
        return self._results(queued)

    @staticmethod
    def _results(queued: list[_Item[T]]) -> Iterator[T]:
        # Taken off the list as they are yielded (as Executor.map pops its futures): a streaming
        # consumer (``realscore score`` over a folder) must not keep every written result.
        queued.reverse()
        try:
            while queued:
                item = queued.pop()
                item.done.acquire()
                if item.error is not None:
                    error, item.error = item.error, None  # no cycle through the traceback
                    raise error
                yield item.value  # type: ignore[misc]
        finally:
            for item in queued:  # those a thread has not taken yet are skipped
                item.cancelled = True

    def _grow(self, wanted: int) -> None:
        """Start threads up to ``max_threads``, at most one per queued item (called locked)."""
        for _ in range(min(wanted, self.max_threads - len(self._threads))):
            thread = threading.Thread(
                target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self) -> None:
        inbox = self._inbox
        while (item := inbox.get()) is not None:
            if not item.cancelled:
                try:
                    item.value = item.function(item.argument)
                except BaseException as error:  # noqa: BLE001 - handed to the consumer
                    item.error = error
            item.done.release()
            del item  # not kept alive (its value, an image's result) while this thread waits

    def shutdown(self) -> None:
        """Run what is queued, then end the threads; later :meth:`imap` calls raise."""
        with self._lock:
            self._shut = True
            threads = list(self._threads)
            for _ in threads:
                self._inbox.put(None)
        for thread in threads:
            thread.join()
