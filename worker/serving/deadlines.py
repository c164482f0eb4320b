"""One deadline for work that may block where nothing can interrupt it (a fetch).

A ``read`` on a stalled network mount blocks in the kernel, and botocore's request and headers are
not bounded by any read loop of ours: no deadline can be enforced *inside* such a call. It is
enforced *around* it instead, by letting the blocked thread go, in one of two ways:

- :func:`within_deadline` on an ordinary thread hands the work to a (reused) helper thread and
  waits only until the deadline; past it the caller gets ``timed_out()`` and the helper is left to
  finish, or stay blocked, on its own.
- On a thread that is itself expendable (a lane thread of :class:`worker.serving.lanepool.LanePool`,
  which runs ``score_many``'s images) the work runs inline, with no hand-off: the thread records
  its deadline in its item (a :class:`Watched`), and whoever waits for that item gives up on it
  past the deadline (:meth:`Watched.abandon`), answers for it (its elapsed time counted from
  when its thread began it: :func:`work_started`), and starts a thread to take its place; a
  waiter that leaves early leaves a stand-in that gives up the same way, answering for nothing.
  The two thread switches per image of the hand-off were, under a GIL shared with the batcher,
  as costly as everything else the host does per image (bench/RESULTS.md).

Either way, at most :data:`MAX_ABANDONED` threads are left blocked at once; then new work fails at
once with ``timed_out()`` instead of starting more of them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
# Threads still blocked past their deadline (stalled mounts, dripping endpoints) that a process
# keeps before it fails new work at once instead of leaving more of them.
MAX_ABANDONED = 64
# How long a waiter gives the work past its deadline for the work's own (more precise) verdict.
GRACE_S = 0.5
TimedOut = Callable[[str | None], BaseException]  # the error, given why (None: the deadline)

_abandoned = 0
# Guards the count and every Watched's state: taken twice per inline fetch, uncontended.
_lock = threading.Lock()
_local = threading.local()


class Abandoned(BaseException):
    """Raised on an expendable thread whose waiter gave up on its item: the waiter has answered
    for it, so the thread unwinds (past every ``except Exception``) and ends."""


def abandoned_count() -> int:
    """Threads still blocked after their waiter gave up on them."""
    return _abandoned


def _refuse_when_full(timed_out: TimedOut) -> None:
    if _abandoned >= MAX_ABANDONED:
        raise timed_out(
            f"{_abandoned} earlier fetches are still stuck past their deadline "
            "(a stalled mount or S3 endpoint?)"
        )


class Watched:
    """An item run on an expendable thread: when its work began, its deadline while in work
    that may block, and whether its waiter has given up on it. Subclassed by the lane pool's
    item."""

    __slots__ = ("deadline", "abandoned", "on_abandon", "started")

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.abandoned = False
        # When the expendable thread began the item's work (time.monotonic(), set by whoever
        # runs it there): the answer for an item given up on counts its time from then.
        self.started = 0.0
        # What the stuck thread holds that must not wait for its read to return (its fetch
        # budget): given back by whoever gives up on the item (see :func:`on_abandon`).
        self.on_abandon: Callable[[], None] | None = None

    def run(self, deadline: float, timed_out: TimedOut, function: Callable[[], T]) -> T:
        """``function()`` inline, visible to the waiter as overdue after ``deadline``."""
        global _abandoned
        if self.abandoned:  # the waiter's own run of an item it gave up on: it timed out
            raise timed_out(None)
        _refuse_when_full(timed_out)
        self.deadline = deadline
        try:
            return function()
        finally:
            with _lock:
                self.deadline = None
                if self.abandoned:
                    _abandoned -= 1
            if self.abandoned:  # late: the waiter has answered for this item already
                raise Abandoned()

    def abandon(self, now: float) -> bool:
        """Give up on the item if it is overdue (first caller wins); True once given up on."""
        global _abandoned
        with _lock:
            if self.abandoned:
                return True
            if self.deadline is None or now < self.deadline + GRACE_S:
                return False
            self.abandoned = True
            _abandoned += 1
            release, self.on_abandon = self.on_abandon, None
        if release is not None:
            release()
        return True


def on_abandon(release: Callable[[], None]) -> None:
    """On an expendable thread: run ``release`` if the waiter gives up on this thread's item
    (what a fetch stuck in the kernel holds must not wait for it). Elsewhere: nothing."""
    item: Watched | None = getattr(_local, "item", None)
    if item is not None:
        item.on_abandon = release


def answering_for_abandoned() -> bool:
    """Whether this thread is running an item its lane thread was given up on: the item had
    started, and now only gets its ``fetch_timeout`` answer."""
    item: Watched | None = getattr(_local, "item", None)
    return item is not None and item.abandoned


def work_started(default: float) -> float:
    """When this thread's item began its work on its expendable thread, if this thread is
    answering for an item given up on (its answer's elapsed time then covers the stall, not just
    the answer); else ``default``."""
    item: Watched | None = getattr(_local, "item", None)
    return item.started if item is not None and item.abandoned else default


class watching:  # noqa: N801 - used as a context manager, like contextlib's
    """Run :func:`within_deadline` calls on this thread inline, on behalf of ``item``."""

    __slots__ = ("item", "outer")

    def __init__(self, item: Watched) -> None:
        self.item = item

    def __enter__(self) -> Watched:
        self.outer = getattr(_local, "item", None)
        _local.item = self.item
        return self.item

    def __exit__(self, *exc: object) -> None:
        _local.item = self.outer


class _Helpers:
    """Daemon threads that run work, reused: a new thread per fetch costs about 0.1 ms.

    A thread takes a job from its own inbox, runs it, and offers itself again; one that stays
    blocked (a stalled mount) is simply never offered again, and a new one is started when no
    idle thread is left. Daemon threads, so a read stuck in the kernel never blocks exit.
    """

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[queue.SimpleQueue[Callable[[], None]]] = queue.SimpleQueue()

    def run(self, job: Callable[[], None]) -> None:
        try:
            inbox = self._idle.get_nowait()
        except queue.Empty:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="realscore-fetch", daemon=True).start()
        inbox.put(job)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            inbox.get()()
            self._idle.put(inbox)


_helpers = _Helpers()


def within_deadline(deadline: float, timed_out: TimedOut, function: Callable[[], T]) -> T:
    """``function()``, or ``timed_out(None)`` raised once ``deadline`` has passed.

    Inline on an expendable thread (inside :class:`watching`), else on a helper thread."""
    global _abandoned
    item: Watched | None = getattr(_local, "item", None)
    if item is not None:
        return item.run(deadline, timed_out, function)
    _refuse_when_full(timed_out)
    outcome: list[tuple[bool, object]] = []
    # A bare lock as the "done" signal, held until the job ends: acquiring it with a timeout is
    # one C call, where threading.Event is a Python Condition (a few lock round trips per image).
    done = threading.Lock()
    done.acquire()
    state = {"abandoned": False, "done": False}

    def job() -> None:
        global _abandoned
        try:
            outcome.append((True, function()))
        except BaseException as error:  # noqa: BLE001 - handed to the caller as it is
            outcome.append((False, error))
        finally:
            with _lock:
                state["done"] = True
                done.release()
                if state["abandoned"]:
                    _abandoned -= 1

    _helpers.run(job)
    if not done.acquire(timeout=max(0.0, deadline - time.monotonic()) + GRACE_S):
        with _lock:
            if not state["done"]:
                state["abandoned"] = True
                _abandoned += 1
        if state["abandoned"]:
            raise timed_out(None)
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[return-value]
    raise value  # type: ignore[misc]
