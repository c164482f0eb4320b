"""A counting semaphore over bytes: bounds the decoded pixels one worker process holds at once.

A burst of 12-megapixel images on a hundred task threads would otherwise decode them all at once.
Waiters are served first come, first served, so a large image is not starved by a stream of
small ones; a request larger than the whole budget takes the whole budget, so it waits but never
deadlocks.
"""

from __future__ import annotations

import threading
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
            self._cond.notify_all()

    @contextmanager
    def hold(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        taken = self.acquire(nbytes, timeout)
        try:
            yield
        finally:
            self.release(taken)
