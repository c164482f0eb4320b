"""The in-process dynamic batcher: many task threads submit items, one thread runs the model.

A batch closes when it holds ``max_batch_size`` items or ``max_wait`` has passed since its oldest
item arrived (the pattern of Triton's dynamic batcher and Ray Serve's ``@serve.batch``). Two lanes:
interactive items are always taken before bulk ones, so a single web request never waits behind a
prefetched backfill chunk.

The forward step is split in two so the device never waits for the host: ``forward`` stages a
batch (copies it to the device and queues the model) and returns a handle; ``finish`` waits for
that handle's results. With ``pipeline_depth=2`` the next batch is staged before the current one
is finished. An item fails alone when ``finish`` returns :class:`ItemFailed` for it (an image
the device could not decode); an exception from either step is the whole batch's (the model runs
on fixed-shape tensors, so no single image can be blamed and retrying in halves would only run
it again), except the errors in ``split_on`` (out of device memory): that batch is retried in
halves and the effective ``max_batch_size`` shrinks, so no image is lost. When every batch keeps
failing (a poisoned CUDA context, say) the batcher calls ``on_broken`` once, so the worker can
stop taking work instead of turning every later image into an error.
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


@dataclass(frozen=True)
class ItemFailed:
    """An output meaning: this item failed on its own with ``error``; the others are fine."""

    error: BaseException


@dataclass
class _Pending(Generic[Item, Output]):
    item: Item
    lane: Lane
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    on_done: Callable[[], None] | None = None


class DynamicBatcher(Generic[Item, Output]):
    """``finish(forward(list of items)) -> list of outputs, same order``, in batches on one thread.

    Without ``finish``, ``forward`` returns the outputs itself.
    """

    def __init__(
        self,
        forward: Callable[[list[Item]], object],
        *,
        max_batch_size: int,
        max_wait_s: float,
        finish: Callable[[object], Sequence[Output | ItemFailed]] | None = None,
        pipeline_depth: int = 1,
        split_on: tuple[type[BaseException], ...] = (),
        name: str = "realscore-batcher",
        on_broken: Callable[[BaseException], None] | None = None,
        broken_after: int = 3,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self._forward = forward
        self._finish = finish or (lambda outputs: outputs)  # type: ignore[return-value]
        self.pipeline_depth = pipeline_depth
        self._split_on = split_on
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

    def _take_batch(self, wait: bool = True) -> list[_Pending] | None:
        """The next batch; None once stopping and drained. ``wait=False`` (a batch is in flight):
        take what is queued now, possibly nothing, rather than wait for the batch to fill."""
        with self._cond:
            if not wait:
                return self._pop_batch()
            self._cond.wait_for(lambda: self._queued() > 0 or self._stopping)
            if not self._queued():
                return None  # stopping and drained
            deadline = self._oldest() + self.max_wait_s
            while self._queued() < self.max_batch_size and not (self._stopping or self._flushing):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._pop_batch()

    def _pop_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        for lane in self._lanes:  # interactive first
            while lane and len(batch) < self.max_batch_size:
                batch.append(lane.popleft())
        return batch

    def _run(self) -> None:
        in_flight: deque[_Launched] = deque()
        while True:
            batch = self._take_batch(wait=not in_flight)
            if batch is None:
                return
            live = []
            for pending in batch:
                if pending.future.set_running_or_notify_cancel():
                    live.append(pending)
                else:
                    _release(pending)
            if live:
                in_flight.extend(self._launch(live))
            while in_flight and (len(in_flight) >= self.pipeline_depth or not live):
                self._complete(in_flight.popleft())

    def _launch(self, batch: list[_Pending]) -> list[_Launched]:
        """Stage ``batch``; out of device memory, stage it in halves and shrink the batch size."""
        started = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):  # the order of forward passes, lane by lane
            log.debug("forward lanes=%s", "".join("IB"[pending.lane] for pending in batch))
        for pending in batch:
            metrics.QUEUE_WAIT.labels(pending.lane.name.lower()).observe(started - pending.enqueued)
        try:
            return [_Launched(batch, self._forward([p.item for p in batch]), None, started)]
        except self._split_on as error:
            if len(batch) == 1:
                return [_Launched(batch, None, error, started)]
            half = len(batch) // 2
            if self.max_batch_size > half:
                self.max_batch_size = half
                log.warning("%r on a batch of %d: max batch size is now %d", error, len(batch), half)
            return self._launch(batch[:half]) + self._launch(batch[half:])
        except BaseException as error:  # noqa: BLE001 - one bad batch must not stop the worker
            return [_Launched(batch, None, error, started)]

    def _complete(self, launched: _Launched) -> None:
        """Wait for a staged batch and resolve its futures."""
        batch, error = launched.batch, launched.error
        outputs: list[object] = []
        if error is None:
            try:
                outputs = list(self._finish(launched.handle))
                if len(outputs) != len(batch):
                    raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(batch)} items")
            except BaseException as failure:  # noqa: BLE001
                error = failure
        self.batches_run += 1
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.FORWARD_TIME.observe(time.monotonic() - launched.started)
        if error is not None:
            log.error("forward pass failed for a batch of %d: %r", len(batch), error)
            for pending in batch:
                _release(pending)
                pending.future.set_exception(error)
            self._count_failure(error)
            return
        self._failed_in_a_row = 0
        for pending, output in zip(batch, outputs):
            _release(pending)
            if isinstance(output, ItemFailed):
                pending.future.set_exception(output.error)
            else:
                pending.future.set_result(output)

    def _count_failure(self, error: BaseException) -> None:
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= self._broken_after and not self.broken:
            self.broken = True
            log.critical("%d batches in a row failed entirely: the model is unusable", self._failed_in_a_row)
            if self._on_broken is not None:
                self._on_broken(error)


@dataclass
class _Launched:
    batch: list[_Pending]
    handle: object
    error: BaseException | None
    started: float


def _release(pending: _Pending) -> None:
    """Run ``on_done`` once, before the future resolves: a caller that sees its result must also
    see what ``on_done`` released (the pixel budget)."""
    on_done, pending.on_done = pending.on_done, None
    if on_done is not None:
        on_done()
