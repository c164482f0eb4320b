"""A counting semaphore over bytes: bounds the decoded pixels one worker process holds at once
(and, as a second budget, the fetched bytes not yet counted there).

A burst of 12-megapixel images on a hundred task threads would otherwise decode them all at once.
Waiters are served first come, first served, so a large image is not starved by a stream of
small ones; a request larger than the whole budget takes the whole budget, so it waits but never
deadlocks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._available = capacity
        self._cond = threading.Condition()
        self._waiters: deque[object] = deque()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.capacity - self._available

    def acquire(self, nbytes: int, timeout: float | None = None) -> int:
        """Take ``nbytes`` (capped at the capacity); return what was taken, for :meth:`release`."""
        wanted = max(0, min(nbytes, self.capacity))
        turn = object()
        with self._cond:
            if not self._waiters and self._available >= wanted:  # nobody queued: no turn to wait
                self._available -= wanted
                return wanted
            self._waiters.append(turn)
            try:
                if not self._cond.wait_for(
                    lambda: self._waiters[0] is turn and self._available >= wanted, timeout
                ):
                    raise TimeoutError(f"waited {timeout} s for {wanted} bytes of pixel budget")
                self._available -= wanted
            finally:
                self._waiters.remove(turn)
                self._cond.notify_all()  # the next in line may fit now
        return wanted

    def release(self, taken: int) -> None:
        with self._cond:
            self._available = min(self.capacity, self._available + taken)
            if self._waiters:  # every thread waiting on the condition is in the queue
                self._cond.notify_all()

    @contextmanager
    def hold(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        taken = self.acquire(nbytes, timeout)
        try:
            yield
        finally:
            self.release(taken)


class SharedBudget:
    """The process's pixel budget, of which bulk work may hold at most ``bulk_share``.

    Bulk images take their share first and only then queue for the whole budget, so however many
    backfill images wait, the rest of the budget is left for interactive ones: an interactive
    image never waits, first come first served, behind a queue of bulk images.
    """

    def __init__(self, capacity: int, bulk_share: float = 0.5) -> None:
        self.whole = ByteBudget(capacity)
        self.bulk = ByteBudget(max(1, int(capacity * bulk_share)))

    @property
    def capacity(self) -> int:
        return self.whole.capacity

    @property
    def in_use(self) -> int:
        return self.whole.in_use

    def acquire(self, nbytes: int, bulk: bool = False, timeout: float | None = None) -> tuple[int, int]:
        """Take ``nbytes`` within ``timeout`` seconds in all; returns the token :meth:`release`
        takes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        from_bulk = self.bulk.acquire(nbytes, timeout) if bulk else 0
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return from_bulk, self.whole.acquire(nbytes, left)
        except BaseException:
            self.bulk.release(from_bulk)
            raise

    def release(self, taken: tuple[int, int]) -> None:
        from_bulk, from_whole = taken
        self.whole.release(from_whole)
        if from_bulk:
            self.bulk.release(from_bulk)

    @contextmanager
    def hold(self, nbytes: int, bulk: bool = False, timeout: float | None = None) -> Iterator[None]:
        taken = self.acquire(nbytes, bulk, timeout)
        try:
            yield
        finally:
            self.release(taken)


class Held:
    """One image's share of a :class:`SharedBudget`, held from its decode until its batch ends.

    The mode's ``with hold(nbytes)`` around a decode takes the bytes; leaving the block normally
    keeps them (an error gives them back), so the decoded frame is counted while it waits for
    the batcher too. :meth:`keep` shrinks the hold to what stays queued, :meth:`release` ends it.
    """

    def __init__(self, budget: SharedBudget, bulk: bool = False) -> None:
        self._budget = budget
        self._bulk = bulk
        self._taken = (0, 0)

    @property
    def taken(self) -> int:
        """Bytes held now (of the whole budget)."""
        return self._taken[1]

    def take(self, nbytes: int, timeout: float | None = None) -> None:
        from_bulk, from_whole = self._budget.acquire(nbytes, self._bulk, timeout)
        self._taken = (self._taken[0] + from_bulk, self._taken[1] + from_whole)

    @contextmanager
    def hold(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        taken = self._budget.acquire(nbytes, self._bulk, timeout)
        try:
            yield
        except BaseException:
            self._budget.release(taken)
            raise
        self._taken = (self._taken[0] + taken[0], self._taken[1] + taken[1])

    def keep(self, nbytes: int) -> None:
        """Give back what is held beyond ``nbytes`` (a decode's peak, once its frame is made)."""
        from_bulk, from_whole = self._taken
        kept = (min(from_bulk, nbytes), min(from_whole, nbytes))
        self._taken = kept
        self._budget.release((from_bulk - kept[0], from_whole - kept[1]))

    def release(self) -> None:
        """Give everything back; a second call gives back nothing."""
        taken, self._taken = self._taken, (0, 0)
        self._budget.release(taken)


class FetchHold:
    """One fetch's share of the fetch budget (``REALSCORE_MAX_FETCH_BYTES``): reserved with the
    size the source declares, before the read; given back once the image's decode is counted in
    the pixel budget, or on failure. The two budgets are taken in that order and the pixel
    budget is given back by batches, never by waiting fetches, so they cannot deadlock.

    A reservation made after :meth:`release` (by a fetch helper its caller stopped waiting for
    at the deadline) is given back at once instead of being held for ever."""

    def __init__(self, budget: SharedBudget, bulk: bool = False) -> None:
        self._budget = budget
        self._bulk = bulk
        self._taken = (0, 0)
        self._lock = threading.Lock()
        self._released = False

    def reserve(self, nbytes: int, deadline: float) -> None:
        """Take ``nbytes``, waiting at most until ``deadline`` (``TimeoutError`` past it)."""
        taken = self._budget.acquire(nbytes, self._bulk, timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            if not self._released:
                self._taken = (self._taken[0] + taken[0], self._taken[1] + taken[1])
                return
        self._budget.release(taken)

    def release(self) -> None:
        """Give everything back; later reservations are given back as they are made."""
        with self._lock:
            self._released = True
            taken, self._taken = self._taken, (0, 0)
        self._budget.release(taken)
