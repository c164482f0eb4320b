"""An ordered ``map`` over a fixed set of long-lived threads, lighter than ``ThreadPoolExecutor``.

``ScoringService.map`` runs one function per image on a lane's threads and yields the results
in input order. ``ThreadPoolExecutor.map`` did that with a ``Future`` per image: a Python
``Condition`` made on submit, taken to mark it running and to resolve it (with ``notify_all``),
waited on with a new lock per wait, plus the executor's idle ``Semaphore`` (another Condition)
per item. On a GPU host that is per-image Python work under the one GIL. Here an item is a
slotted object with one lock, held from creation until the item has run; the consumer acquires
it in order, which is one C call, and does not block at all for items already done.

A lane thread is expendable: the fetches of the function it runs take no hand-off to a deadline
helper but run inline (worker/serving/deadlines.py), and the consumer waiting for an item gives
up on it once its fetch is overdue: it runs the function for that item itself, where the fetch
then fails at once with ``fetch_timeout``, and starts a thread in place of the stuck one (which
ends when, if ever, its read returns). A consumer that leaves early (an exception in its place,
the iterator closed) leaves a stand-in thread that waits for the items still running, as it
would have, and gives up on the overdue ones without answering for them: nobody reads those
answers, but the pool must not stay short of the threads stuck in them. :meth:`shutdown` gives
up on such items too (also those of a map whose results were never read at all).

Semantics kept from ``Executor.map``: every item is queued at once (the function runs for all
of them even if the results are never read), results in input order, the first exception is
raised in its place, and closing the iterator early (or that exception) cancels the items no
thread has started yet. :meth:`shutdown` runs what is queued, then ends the threads.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from worker.serving.deadlines import Abandoned, Watched, watching

T = TypeVar("T")
# How often a consumer (or shutdown) waiting for an item looks whether its fetch is overdue.
_WATCH_SLICE_S = 0.25


class _Item(Watched, Generic[T]):
    __slots__ = ("function", "argument", "done", "value", "error", "cancelled", "runner")

    def __init__(self, function: Callable[[object], T], argument: object) -> None:
        super().__init__()
        self.function = function
        self.argument = argument
        self.done = threading.Lock()
        self.done.acquire()  # released once the item has run (or was skipped as cancelled)
        self.value: T | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.runner: _Runner | None = None  # the lane thread running it


class _Runner:
    """A lane thread and the item it is running (read by whoever gives up on that item)."""

    __slots__ = ("thread", "item")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.item: _Item | None = None


class LanePool:
    """Up to ``threads`` worker threads, started as work first needs them (daemon threads:
    :meth:`shutdown` is what finishes the queued work)."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.max_threads = threads
        self._name = name
        self._inbox: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._runners: list[_Runner] = []  # the threads serving the inbox (not the abandoned)
        self._started = 0
        self._lock = threading.Lock()  # thread start-up, replacement and shutdown
        self._shut = False

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads serving this pool (a thread given up on, stuck in a fetch, is not one)."""
        with self._lock:
            return [runner.thread for runner in self._runners if runner.thread is not None]

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

    def _results(self, queued: list[_Item[T]]) -> Iterator[T]:
        # Taken off the list as they are yielded (as Executor.map pops its futures): a streaming
        # consumer (``realscore score`` over a folder) must not keep every written result.
        queued.reverse()
        try:
            while queued:
                item = queued.pop()
                if not item.done.acquire(timeout=_WATCH_SLICE_S) and not self._wait(item):
                    item.error = None
                    with watching(item):  # its fetch fails at once, as overdue
                        item.value = item.function(item.argument)
                if item.error is not None:
                    error, item.error = item.error, None  # no cycle through the traceback
                    raise error
                yield item.value  # type: ignore[misc]
        finally:
            if queued:  # the consumer left early
                for item in queued:  # those a thread has not taken yet are skipped
                    item.cancelled = True
                pending = [item for item in reversed(queued) if item.done.locked()]  # input order
                # (No thread starts at interpreter exit, where a generator may be closed last.)
                if pending and not sys.is_finalizing():
                    threading.Thread(
                        target=self._stand_in, args=(pending,), name=f"{self._name}-stand-in", daemon=True
                    ).start()

    def _stand_in(self, items: list[_Item]) -> None:
        """Wait for the items of a consumer that left, in order, giving up on the overdue (and
        replacing their threads) as that consumer would have; answer for none of them."""
        for item in items:
            self._wait(item)

    def _wait(self, item: _Item) -> bool:
        """Wait for ``item`` to be run; False once it was given up on, its fetch overdue."""
        while not self._give_up_if_overdue(item):
            if item.done.acquire(timeout=_WATCH_SLICE_S):
                return True
        return False

    def _give_up_if_overdue(self, item: _Item) -> bool:
        """Give up on an item whose fetch is past its deadline and put a new thread in place of
        the one stuck running it; True once the item was given up on (here or by another)."""
        runner = item.runner
        if not item.abandon(time.monotonic()):
            return False
        with self._lock:
            if runner in self._runners:
                self._runners.remove(runner)
                self._grow(1)
        return True

    def _grow(self, wanted: int) -> None:
        """Start threads up to ``max_threads``, at most ``wanted`` (called locked)."""
        for _ in range(min(wanted, self.max_threads - len(self._runners))):
            runner = _Runner()
            runner.thread = threading.Thread(
                target=self._serve, args=(runner,), name=f"{self._name}_{self._started}", daemon=True
            )
            self._started += 1
            self._runners.append(runner)
            runner.thread.start()

    def _serve(self, runner: _Runner) -> None:
        inbox, clock = self._inbox, time.monotonic
        while (item := inbox.get()) is not None:
            if not item.cancelled:
                item.runner, runner.item = runner, item
                item.started = clock()
                try:
                    with watching(item):
                        item.value = item.function(item.argument)
                except Abandoned:
                    return  # a new thread has taken this one's place; the consumer answered
                except BaseException as error:  # noqa: BLE001 - handed to the consumer
                    item.error = error
                runner.item = None
            item.done.release()
            del item  # not kept alive (its value, an image's result) while this thread waits

    def shutdown(self) -> None:
        """Run what is queued, then end the threads; later :meth:`imap` calls raise. A thread
        stuck in a fetch past its deadline is given up on rather than waited for."""
        with self._lock:
            self._shut = True
            for _ in self._runners:
                self._inbox.put(None)
        while True:
            with self._lock:
                live = [r for r in self._runners if r.thread is not None and r.thread.is_alive()]
            if not live:
                return
            for runner in live:
                runner.thread.join(_WATCH_SLICE_S)  # type: ignore[union-attr]
                item = runner.item
                if item is not None:
                    self._give_up_if_overdue(item)
