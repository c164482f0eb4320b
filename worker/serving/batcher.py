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
failing the batcher calls ``on_broken`` once, so the worker can stop taking work.

When a whole batch fails, an item that went through the model before is run again as a probe:
if that fails too, the model (not the images) is broken (a poisoned CUDA context). So is a
forward that runs past ``forward_timeout_s`` (a hung device, watched by its own thread). A broken
batcher fails every item it holds, and every later submit, with :class:`ModelBroken` (work to hand
back to the queue, never an image's error) and calls ``on_broken`` once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, InvalidStateError
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


# The histogram's child per lane, looked up once: ``labels()`` per image took a lock and built
# a key on the batcher thread, the one thread gpu mode is limited by.
_QUEUE_WAIT = tuple(metrics.QUEUE_WAIT.labels(lane.name.lower()) for lane in Lane)


class BatcherStopped(RuntimeError):
    """Submitted after :meth:`DynamicBatcher.stop`."""


class ModelBroken(RuntimeError):
    """The model failed for reasons that are not the item's (a sticky CUDA error, a hung forward):
    the item's work belongs back in the queue for a healthy worker."""


@dataclass(frozen=True)
class ItemFailed:
    """An output meaning: this item failed on its own with ``error``; the others are fine."""

    error: BaseException


_PENDING, _RUNNING, _DONE, _CANCELLED = range(4)
# Makes resolving (or cancelling) an outcome first-wins: the batcher thread and the watchdog may
# both try. Held for a few bytecodes, by the batcher thread almost always.
_RESOLVING = threading.Lock()


class Outcome(Generic[Output]):
    """What :meth:`DynamicBatcher.submit` returns: the part of ``concurrent.futures.Future`` its
    callers use (``result`` with a timeout, ``done``, ``cancel``), at a fraction of the cost.

    A Future is a Condition: resolving it takes its lock and notifies, and a waiter makes and
    queues a lock of its own; the batcher thread (gpu mode's measured limit) did that for every
    image, and could block on a task thread holding that lock. Here one lock, held from creation
    until the outcome is resolved, is what ``result`` waits on; resolving releases it.
    """

    __slots__ = ("_ready", "_state", "_value", "_error")

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self._state = _PENDING
        self._value: Output | None = None
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> Output:
        """The output, or the item's exception; ``TimeoutError`` after ``timeout`` seconds."""
        if self._state < _DONE:
            # As Future.result: a timeout of 0 or less does not wait (for acquire, -1 is for ever).
            if not self._ready.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                raise TimeoutError(f"no output within {timeout} s")
            self._ready.release()  # for any other waiter
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def done(self) -> bool:
        return self._state >= _DONE

    def cancel(self) -> bool:
        """Cancel unless a batch has taken the item already (as ``Future.cancel``)."""
        with _RESOLVING:
            if self._state == _CANCELLED:
                return True
            if self._state != _PENDING:
                return False
            self._state = _CANCELLED
        self._ready.release()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """False for a cancelled item (drop it), else mark it running."""
        with _RESOLVING:
            if self._state == _CANCELLED:
                return False
            self._state = _RUNNING
            return True

    def set_result(self, value: Output) -> None:
        self._resolve(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._resolve(None, error)

    def _resolve(self, value: Output | None, error: BaseException | None) -> None:
        with _RESOLVING:
            if self._state >= _DONE:
                raise InvalidStateError("already resolved")
            self._value, self._error, self._state = value, error, _DONE
        self._ready.release()


@dataclass
class _Pending(Generic[Item, Output]):
    item: Item
    lane: Lane
    future: Outcome = field(default_factory=Outcome)
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
        forward_timeout_s: float | None = None,
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
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._warm_up: Callable[[], None] | None = None
        self._warm_up_error: BaseException | None = None
        self._warmed = threading.Lock()  # held until the warm-up has run
        self._warmed.acquire()
        self.batches_run = 0
        self._on_broken = on_broken
        self._broken_after = broken_after
        self._failed_in_a_row = 0
        self.broken = False
        self.broken_reason: BaseException | None = None
        self._last_good: Item | None = None  # the probe: an item the model has scored
        self._forward_timeout_s = forward_timeout_s
        self._forward_started: float | None = None
        self._current: list[_Pending] = []  # the batch being staged or completed
        self._in_flight: deque[_Launched] = deque()
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)

    def start(self, warm_up: Callable[[], None] | None = None) -> DynamicBatcher[Item, Output]:
        """Start batching. ``warm_up`` (compiling the model) runs first, on the batcher thread,
        the thread every forward runs on: the CUDA graphs of ``torch.compile``'s
        ``reduce-overhead`` mode belong to the thread that recorded them, and a graph recorded
        elsewhere would be recorded again on traffic. Returns once it has run; raises its error."""
        # Read when metrics are scraped, not set under the lock on every submit and batch.
        metrics.BATCHER_QUEUED.set_function(self._queued)
        self._warm_up = warm_up
        self._thread.start()
        self._warmed.acquire()  # a compile takes as long as it takes: start-up waits for it
        if self._warm_up_error is not None:
            raise self._warm_up_error
        if self._forward_timeout_s:
            self._watchdog.start()
        return self

    def _main(self) -> None:
        try:
            if self._warm_up is not None:
                self._warm_up()
        except BaseException as error:  # noqa: BLE001 - start() raises it on its own thread
            self._warm_up_error = error
            return
        finally:
            self._warmed.release()
        self._run()

    def submit(
        self,
        item: Item,
        lane: Lane = Lane.INTERACTIVE,
        on_done: Callable[[], None] | None = None,
    ) -> Outcome[Output]:
        """Queue ``item``; the outcome resolves to its output. ``on_done`` runs after its batch."""
        pending: _Pending[Item, Output] = _Pending(item, lane, on_done=on_done)
        with self._cond:
            if self.broken:
                raise ModelBroken(f"the model is broken: {self.broken_reason!r}")
            if self._stopping:
                raise BatcherStopped("the batcher is stopping")
            self._lanes[lane].append(pending)
            queued = self._queued()
            # Only the first item (the batcher may wait for any) and a full batch wake it; in
            # between, its timed wait for the batch to fill ends by itself. A wake-up per image
            # would make the one batcher thread take the GIL back once per image for nothing.
            if queued == 1 or queued >= self.max_batch_size:
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

    def stop(self, timeout: float | None = None) -> bool:
        """Finish everything already queued (the batch in flight included), then stop.

        A broken batcher is not waited for beyond ``timeout`` (its forward may hang for ever).
        Returns whether the batcher thread has ended."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

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
        in_flight = self._in_flight  # also read by _declare_broken (the watchdog's thread)
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
        with self._cond:
            self._current = batch
        if log.isEnabledFor(logging.DEBUG):  # the order of forward passes, lane by lane
            log.debug("forward lanes=%s", "".join("IB"[pending.lane] for pending in batch))
        for pending in batch:
            _QUEUE_WAIT[pending.lane].observe(started - pending.enqueued)
        try:
            return [_Launched(batch, self._timed(self._forward, [p.item for p in batch]), None, started)]
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
        with self._cond:
            self._current = batch
        outputs: list[object] = []
        if error is None:
            try:
                outputs = list(self._timed(self._finish, launched.handle))
                if len(outputs) != len(batch):
                    raise RuntimeError(f"forward returned {len(outputs)} outputs for {len(batch)} items")
            except BaseException as failure:  # noqa: BLE001
                error = failure
        self.batches_run += 1
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.FORWARD_TIME.observe(time.monotonic() - launched.started)
        if error is not None:
            if not self.broken:
                log.error("forward pass failed for a batch of %d: %r", len(batch), error)
                self._count_failure(error, batch)
            for pending in batch:  # no-op for the items a broken batcher already failed
                _settle(pending, error=error)
            return
        self._failed_in_a_row = 0
        for pending, output in zip(batch, outputs):
            if isinstance(output, ItemFailed):
                _settle(pending, error=output.error)
            else:
                self._last_good = pending.item
                _settle(pending, result=output)

    def _timed(self, step: Callable[[object], object], argument: object) -> object:
        """Run a forward step where the watchdog can see how long it has been running."""
        with self._cond:
            self._forward_started = time.monotonic()
        try:
            return step(argument)
        finally:
            with self._cond:
                self._forward_started = None

    def _count_failure(self, error: BaseException, batch: list[_Pending]) -> None:
        self._failed_in_a_row += 1
        # Out of memory for one item is that item's size (it gets `out_of_memory`), not a broken
        # model: no probe for it, only the count of whole batches failing in a row.
        out_of_memory = isinstance(error, self._split_on)
        if not out_of_memory and self._model_is_broken():
            self._declare_broken(error, f"a batch of {len(batch)} failed and so did the probe", batch)
        elif (out_of_memory or self._last_good is None) and self._failed_in_a_row >= self._broken_after:
            # Nothing has ever gone through this model, so there is no probe: count instead.
            self._declare_broken(error, f"{self._failed_in_a_row} batches in a row failed entirely", batch)

    def _model_is_broken(self) -> bool:
        """Run the probe (an item the model scored before) alone; False when there is none."""
        if self._last_good is None:
            return False
        try:
            outputs = list(self._timed(self._finish, self._timed(self._forward, [self._last_good])))
            if len(outputs) != 1 or isinstance(outputs[0], ItemFailed):
                raise RuntimeError(f"the probe gave {outputs!r}")
        except BaseException as error:  # noqa: BLE001
            log.error("the probe failed too (%r)", error)
            return True
        return False

    def _declare_broken(self, error: BaseException, why: str, batch: list[_Pending] = ()) -> None:
        """Fail everything held with :class:`ModelBroken` and tell ``on_broken``, once."""
        with self._cond:
            if self.broken:
                return
            self.broken = True
            self.broken_reason = error
            held = [*batch, *(p for launched in list(self._in_flight) for p in launched.batch)]
            held += [*self._lanes[0], *self._lanes[1]]
            self._lanes[0].clear()
            self._lanes[1].clear()
            self._cond.notify_all()
        log.critical("the model is unusable (%s): %r", why, error)
        gone = ModelBroken(f"the model is broken ({why}): {error!r}")
        for pending in held:
            _settle(pending, error=gone)
        if self._on_broken is not None:
            self._on_broken(error)

    def _watch(self) -> None:
        """The watchdog: a forward step running past its deadline means a hung device or driver."""
        limit = self._forward_timeout_s or 0.0
        tick = min(limit / 4, 1.0)
        while not self.broken and self._thread.is_alive():
            with self._cond:
                started = self._forward_started
            if started is not None and time.monotonic() - started > limit:
                with self._cond:
                    still_running = self._forward_started == started
                if still_running:
                    with self._cond:  # the batch being completed is no longer in the deque
                        current = list(self._current)
                    self._declare_broken(
                        TimeoutError(f"a forward pass ran past its {limit:g} s deadline"),
                        "hung forward (REALSCORE_FORWARD_TIMEOUT)",
                        current,
                    )
                    return
            time.sleep(tick)  # a watchdog's period, not synchronisation


@dataclass
class _Launched:
    batch: list[_Pending]
    handle: object
    error: BaseException | None
    started: float


def _settle(pending: _Pending, *, result: object = None, error: BaseException | None = None) -> None:
    """Resolve ``pending`` unless it is resolved already (the watchdog may have failed a batch
    whose forward returns later)."""
    _release(pending)
    try:  # no done() check first: that is one more lock round trip per image
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)
    except InvalidStateError:
        pass  # resolved already


def _release(pending: _Pending) -> None:
    """Run ``on_done`` once, before the future resolves: a caller that sees its result must also
    see what ``on_done`` released (the pixel budget)."""
    on_done, pending.on_done = pending.on_done, None
    if on_done is not None:
        on_done()
