"""The in-process dynamic batcher: many task threads submit items, one thread runs the model.

A batch closes when it holds ``max_batch_size`` items or ``max_wait`` has passed since its oldest
item arrived (the pattern of Triton's dynamic batcher and Ray Serve's ``@serve.batch``). Two lanes:
interactive items are always taken before bulk ones, so a single web request never waits behind a
prefetched backfill chunk.

A failed forward pass is retried in halves until the failing items are isolated, so one image
that breaks the model fails alone. When every forward keeps failing (a poisoned CUDA context,
say) the batcher calls ``on_broken`` once, so the worker can stop taking work instead of turning
every later image into an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

from worker.serving import metrics

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Output = TypeVar("Output")


class Lane(IntEnum):
    INTERACTIVE = 0
    BULK = 1


class BatcherStopped(RuntimeError):
    """Submitted after :meth:`DynamicBatcher.stop`."""


@dataclass
class _Pending(Generic[Item, Output]):
    item: Item
    lane: Lane
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    on_done: Callable[[], None] | None = None


class DynamicBatcher(Generic[Item, Output]):
    """``forward(list of items) -> list of outputs, same order`` run in batches on one thread."""

    def __init__(
        self,
        forward: Callable[[list[Item]], Sequence[Output]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "realscore-batcher",
        on_broken: Callable[[BaseException], None] | None = None,
        broken_after: int = 3,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._lanes: tuple[deque[_Pending], deque[_Pending]] = (deque(), deque())
        self._cond = threading.Condition()
        self._stopping = False
        self._flushing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches_run = 0
        self._on_broken = on_broken
        self._broken_after = broken_after
        self._failed_in_a_row = 0
        self.broken = False

    def start(self) -> DynamicBatcher[Item, Output]:
        self._thread.start()
        return self

    def submit(
        self,
        item: Item,
        lane: Lane = Lane.INTERACTIVE,
        on_done: Callable[[], None] | None = None,
    ) -> Future:
        """Queue ``item``; the future resolves to its output. ``on_done`` runs after its batch."""
        pending: _Pending[Item, Output] = _Pending(item, lane, on_done=on_done)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            self._lanes[lane].append(pending)
            self._cond.notify()
        return pending.future

    def flush(self) -> None:
        """Stop waiting for batches to fill: run whatever is queued at once (warm shutdown)."""
        with self._cond:
            self._flushing = True
            self._cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything already queued (the batch in flight included), then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _queued(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    def _oldest(self) -> float:
        return min(lane[0].enqueued for lane in self._lanes if lane)

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queued() > 0 or self._stopping)
            if not self._queued():
                return None  # stopping and drained
            deadline = self._oldest() + self.max_wait_s
            while self._queued() < self.max_batch_size and not (self._stopping or self._flushing):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Pending] = []
            for lane in self._lanes:  # interactive first
                while lane and len(batch) < self.max_batch_size:
                    batch.append(lane.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = []
            for pending in batch:
                if pending.future.set_running_or_notify_cancel():
                    live.append(pending)
                else:
                    _release(pending)
            if live:
                self._run_batch(live)

    def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        for pending in batch:
            metrics.QUEUE_WAIT.labels(pending.lane.name.lower()).observe(started - pending.enqueued)
        error = self._forward_isolating(batch)
        if error is None:
            self._failed_in_a_row = 0
            return
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= self._broken_after and not self.broken:
            self.broken = True
            log.critical("%d batches in a row failed entirely: the model is unusable", self._failed_in_a_row)
            if self._on_broken is not None:
                self._on_broken(error)

    def _forward_isolating(self, batch: list[_Pending]) -> BaseException | None:
        """Resolve every item; retry a failed batch in halves. The error if nothing succeeded."""
        started = time.monotonic()
        try:
            outputs = list(self._forward([p.item for p in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(batch)} items")
        except BaseException as error:  # noqa: BLE001 - one bad batch must not stop the worker
            if len(batch) == 1:
                log.error("forward pass failed for one item: %r", error)
                _release(batch[0])
                batch[0].future.set_exception(error)
                return error
            log.warning("forward pass failed for a batch of %d (%r); retrying in halves", len(batch), error)
            middle = len(batch) // 2
            first, second = self._forward_isolating(batch[:middle]), self._forward_isolating(batch[middle:])
            return first if first is not None and second is not None else None
        finally:
            self.batches_run += 1
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.FORWARD_TIME.observe(time.monotonic() - started)
        for pending, output in zip(batch, outputs):
            _release(pending)
            pending.future.set_result(output)
        return None


def _release(pending: _Pending) -> None:
    """Run ``on_done`` once, before the future resolves: a caller that sees its result must also
    see what ``on_done`` released (the pixel budget)."""
    on_done, pending.on_done = pending.on_done, None
    if on_done is not None:
        on_done()
