"""The dynamic batcher on its own (no Celery, no model): size, wait, isolation, lanes, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from tests.processes import wait_until
from worker.serving.batcher import BatcherStopped, DynamicBatcher, ItemFailed, Lane, ModelBroken


class Recorder:
    """A forward that records each batch, optionally held until released."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list[object]] = []
        self.hold = hold
        self.entered = threading.Event()

    def __call__(self, items: list[object]) -> list[object]:
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        self.batches.append(list(items))
        return [f"out:{item}" for item in items]


def test_max_batch_size_is_respected() -> None:
    forward = Recorder()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.2)
    futures = [batcher.submit(i) for i in range(10)]  # queued before the thread starts
    batcher.start()
    assert [f.result(timeout=10) for f in futures] == [f"out:{i}" for i in range(10)]
    batcher.stop(timeout=10)
    assert [len(b) for b in forward.batches] == [4, 4, 2]


def test_lonely_item_waits_at_most_max_wait() -> None:
    forward = Recorder()
    batcher = DynamicBatcher(forward, max_batch_size=64, max_wait_s=0.05).start()
    started = time.monotonic()
    assert batcher.submit("alone").result(timeout=10) == "out:alone"
    waited = time.monotonic() - started
    batcher.stop(timeout=10)
    assert forward.batches == [["alone"]]
    assert 0.04 <= waited < 2.0  # it waited for company, but not for a full batch


def test_full_batch_does_not_wait() -> None:
    batcher = DynamicBatcher(Recorder(), max_batch_size=3, max_wait_s=30.0)
    futures = [batcher.submit(i) for i in range(3)]
    started = time.monotonic()
    batcher.start()
    [f.result(timeout=10) for f in futures]
    assert time.monotonic() - started < 5.0  # far below the 30 s max wait
    batcher.stop(timeout=10)


def test_the_batcher_is_woken_by_the_first_item_and_a_full_batch_only() -> None:
    batcher = DynamicBatcher(Recorder(), max_batch_size=8, max_wait_s=30.0).start()
    real_notify, notified = batcher._cond.notify, []

    def notify(n: int = 1) -> None:
        notified.append(batcher._queued())
        real_notify(n)

    batcher._cond.notify = notify  # type: ignore[method-assign]
    try:
        futures = [batcher.submit(i) for i in range(7)]
        assert notified == [1]  # items 2-7 leave the batcher waiting for its batch to fill
        futures.append(batcher.submit(7))
        assert notified == [1, 8]
        started = time.monotonic()
        assert [f.result(timeout=10) for f in futures] == [f"out:{i}" for i in range(8)]
        assert time.monotonic() - started < 5.0  # the full batch ran, far below the 30 s wait
    finally:
        batcher.stop(timeout=10)


def test_a_failing_batch_fails_whole_once_and_the_batcher_keeps_serving() -> None:
    calls: list[list[object]] = []

    def forward(items: list[object]) -> list[object]:
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("CUDA error: device-side assert")
        return [str(item).upper() for item in items]

    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.2)
    futures = [batcher.submit(x) for x in ("a", "boom", "c", "d")]
    batcher.start()
    for future in futures:  # fixed-shape tensors: no image can be blamed, so none is retried
        with pytest.raises(RuntimeError, match="device-side assert"):
            future.result(timeout=10)
    assert calls == [["a", "boom", "c", "d"]]
    assert batcher.submit("e").result(timeout=10) == "E"  # and the batcher keeps serving
    assert not batcher.broken
    batcher.stop(timeout=10)


def test_an_item_that_fails_on_its_own_fails_alone() -> None:
    def finish(items: list[object]) -> list[object]:
        return [ItemFailed(ValueError(f"bad {i}")) if i == "bad" else f"ok:{i}" for i in items]

    batcher = DynamicBatcher(lambda items: items, finish=finish, max_batch_size=3, max_wait_s=0.2)
    futures = [batcher.submit(x) for x in ("a", "bad", "c")]
    batcher.start()
    assert futures[0].result(timeout=10) == "ok:a" and futures[2].result(timeout=10) == "ok:c"
    with pytest.raises(ValueError, match="bad bad"):
        futures[1].result(timeout=10)
    assert batcher.batches_run == 1
    batcher.stop(timeout=10)


class FakeOutOfMemory(RuntimeError):
    """Stands for torch.cuda.OutOfMemoryError (the service passes the real class)."""


def test_out_of_memory_splits_the_batch_and_shrinks_the_batch_size() -> None:
    sizes: list[int] = []

    def forward(items: list[object]) -> list[object]:
        sizes.append(len(items))
        if len(items) > 2:
            raise FakeOutOfMemory(f"cannot fit {len(items)}")
        return items

    batcher = DynamicBatcher(forward, max_batch_size=8, max_wait_s=0.2, split_on=(FakeOutOfMemory,))
    futures = [batcher.submit(i) for i in range(8)]
    batcher.start()
    assert [f.result(timeout=10) for f in futures] == list(range(8))  # no image lost
    assert sizes[:3] == [8, 4, 2] and batcher.max_batch_size == 2
    later = [batcher.submit(i) for i in range(4)]
    assert [f.result(timeout=10) for f in later] == list(range(4))
    assert max(sizes[-2:]) <= 2  # the shrunk size holds for later batches
    batcher.stop(timeout=10)


def test_one_item_that_does_not_fit_fails_alone_with_the_error() -> None:
    def forward(items: list[object]) -> list[object]:
        if "huge" in items:
            raise FakeOutOfMemory("cannot fit")
        return items

    batcher = DynamicBatcher(forward, max_batch_size=2, max_wait_s=0.2, split_on=(FakeOutOfMemory,))
    futures = [batcher.submit(x) for x in ("huge", "small")]
    batcher.start()
    with pytest.raises(FakeOutOfMemory):
        futures[0].result(timeout=10)
    assert futures[1].result(timeout=10) == "small"
    batcher.stop(timeout=10)


def test_pipeline_stages_the_next_batch_before_finishing_the_current() -> None:
    events: list[str] = []
    first_staged = threading.Event()
    go = threading.Event()

    def forward(items: list[object]) -> list[object]:
        events.append(f"stage {items}")
        first_staged.set()
        assert go.wait(10)
        return items

    def finish(items: list[object]) -> list[object]:
        events.append(f"finish {items}")
        return items

    batcher = DynamicBatcher(
        forward, finish=finish, pipeline_depth=2, max_batch_size=1, max_wait_s=0.0
    ).start()
    a = batcher.submit("a")
    assert first_staged.wait(10)
    b = batcher.submit("b")  # queued while "a" is staged: staged before "a" is finished
    go.set()
    assert a.result(timeout=10) == "a" and b.result(timeout=10) == "b"
    batcher.stop(timeout=10)
    assert events == ["stage ['a']", "stage ['b']", "finish ['a']", "finish ['b']"]


def test_forward_that_always_fails_marks_the_batcher_broken_once() -> None:
    broken: list[BaseException] = []

    def forward(items: list[object]) -> list[object]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    batcher = DynamicBatcher(
        forward, max_batch_size=2, max_wait_s=0.0, on_broken=broken.append, broken_after=3
    ).start()
    for _ in range(5):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            batcher.submit("x").result(timeout=10)
    batcher.stop(timeout=10)
    assert batcher.broken
    assert len(broken) == 1 and "illegal memory access" in str(broken[0])


def test_one_success_resets_the_failure_streak() -> None:
    def forward(items: list[object]) -> list[object]:
        if items == ["bad"]:
            raise ValueError("bad input")
        return items

    batcher = DynamicBatcher(forward, max_batch_size=1, max_wait_s=0.0, broken_after=2).start()
    for item in ("bad", "ok", "bad", "ok", "bad"):
        future = batcher.submit(item)
        if item == "bad":
            with pytest.raises(ValueError):
                future.result(timeout=10)
        else:
            assert future.result(timeout=10) == "ok"
    batcher.stop(timeout=10)
    assert not batcher.broken


def test_wrong_number_of_outputs_fails_the_items() -> None:
    batcher = DynamicBatcher(lambda items: [], max_batch_size=2, max_wait_s=0.2)
    futures = [batcher.submit(1), batcher.submit(2)]
    batcher.start()
    for future in futures:
        with pytest.raises(RuntimeError, match="0 outputs for 2 items"):
            future.result(timeout=10)
    batcher.stop(timeout=10)


def test_flush_runs_a_partial_batch_without_waiting() -> None:
    forward = Recorder()
    batcher = DynamicBatcher(forward, max_batch_size=64, max_wait_s=600.0).start()
    future = batcher.submit("lonely")
    batcher.flush()  # what a warm shutdown does: nobody waits ten minutes for company
    assert future.result(timeout=10) == "out:lonely"
    batcher.stop(timeout=10)


def test_interactive_lane_goes_before_prefetched_bulk() -> None:
    forward = Recorder()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.2)
    bulk = [batcher.submit(f"bulk{i}", Lane.BULK) for i in range(8)]
    web = batcher.submit("web", Lane.INTERACTIVE)  # arrives last
    batcher.start()
    web.result(timeout=10)
    [f.result(timeout=10) for f in bulk]
    batcher.stop(timeout=10)
    assert forward.batches[0][0] == "web"
    assert forward.batches[0][1:] == ["bulk0", "bulk1", "bulk2"]


def test_stop_finishes_the_batch_in_flight_and_the_queue() -> None:
    release = threading.Event()
    forward = Recorder(hold=release)
    batcher = DynamicBatcher(forward, max_batch_size=2, max_wait_s=0.0).start()
    in_flight = batcher.submit("first")
    assert forward.entered.wait(10)  # "first" is inside forward now
    queued = [batcher.submit("second"), batcher.submit("third")]
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": 10})
    stopper.start()
    wait_until(lambda: batcher.stopping, 10, "stop requested while 'first' is in flight")
    assert not in_flight.done()
    release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert in_flight.result(timeout=1) == "out:first"
    assert [f.result(timeout=1) for f in queued] == ["out:second", "out:third"]
    with pytest.raises(BatcherStopped):
        batcher.submit("late")


def test_on_done_runs_after_each_batch_even_on_failure() -> None:
    done: list[str] = []

    def forward(items: list[object]) -> list[object]:
        raise ValueError("bad batch")

    batcher = DynamicBatcher(forward, max_batch_size=2, max_wait_s=0.0)
    futures = [batcher.submit(i, on_done=lambda i=i: done.append(f"released{i}")) for i in range(2)]
    batcher.start()
    for future in futures:
        with pytest.raises(ValueError):
            future.result(timeout=10)
    batcher.stop(timeout=10)
    assert sorted(done) == ["released0", "released1"]


def test_a_whole_batch_failing_with_a_failing_probe_breaks_the_batcher_at_once() -> None:
    broken: list[BaseException] = []
    state = {"fail": False}
    seen: list[list[object]] = []

    def forward(items: list[object]) -> list[object]:
        seen.append(list(items))
        if state["fail"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return items

    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.0, on_broken=broken.append).start()
    assert batcher.submit("good").result(timeout=10) == "good"
    state["fail"] = True
    with pytest.raises(ModelBroken, match="illegal memory access"):
        batcher.submit("x").result(timeout=10)
    assert seen[-1] == ["good"]  # the probe: an item the model scored before
    assert batcher.broken and len(broken) == 1
    with pytest.raises(ModelBroken):
        batcher.submit("y")
    batcher.stop(timeout=10)


def test_the_watchdog_fails_a_hung_forward_and_everything_queued() -> None:
    broken: list[BaseException] = []
    hang = threading.Event()
    release = threading.Event()

    def forward(items: list[object]) -> list[object]:
        if hang.is_set():
            release.wait(30)
        return items

    batcher = DynamicBatcher(
        forward, max_batch_size=1, max_wait_s=0.0, on_broken=broken.append, forward_timeout_s=0.3
    ).start()
    assert batcher.submit("a").result(timeout=10) == "a"
    hang.set()
    in_forward = batcher.submit("b")
    queued = batcher.submit("c")
    with pytest.raises(ModelBroken, match="deadline"):
        in_forward.result(timeout=20)
    with pytest.raises(ModelBroken):
        queued.result(timeout=1)
    assert len(broken) == 1 and isinstance(broken[0], TimeoutError)
    assert batcher.stop(timeout=0.2) is False  # the hung thread is not waited for
    release.set()
    assert batcher.stop(timeout=10) is True


def test_outcomes_time_out_cancel_and_resolve_once() -> None:
    """submit's light Future: what its callers rely on of concurrent.futures.Future."""
    from concurrent.futures import CancelledError, InvalidStateError

    release = threading.Event()
    forward = Recorder(hold=release)
    batcher = DynamicBatcher(forward, max_batch_size=1, max_wait_s=0.0).start()
    try:
        running = batcher.submit("first")
        assert forward.entered.wait(10)
        queued, dropped = batcher.submit("second"), batcher.submit("third")
        with pytest.raises(TimeoutError):
            running.result(timeout=0.01)
        assert not running.cancel()  # a batch has it already
        assert dropped.cancel() and dropped.done()
        with pytest.raises(CancelledError):
            dropped.result(timeout=1)
        release.set()
        waiters = [threading.Thread(target=running.result, kwargs={"timeout": 10}) for _ in range(3)]
        for waiter in waiters:
            waiter.start()
        assert running.result(timeout=10) == "out:first"
        for waiter in waiters:  # every waiter wakes, not only the first
            waiter.join(10)
            assert not waiter.is_alive()
        assert queued.result(timeout=10) == "out:second"
        with pytest.raises(InvalidStateError):
            running.set_result("again")  # first wins: the watchdog and a late forward both try
        assert running.result(timeout=1) == "out:first"
    finally:
        release.set()
        batcher.stop(10)
    assert [batch for batch in forward.batches] == [["first"], ["second"]]  # "third" never ran


def test_an_outcome_waited_for_with_a_deadline_already_past_times_out_at_once() -> None:
    """``Future.result`` takes a timeout of 0 or less (a deadline computed as ``end - now``) as
    "do not wait"; a lock's ``acquire(timeout=-1)`` would wait for ever instead."""
    from worker.serving.batcher import Outcome

    outcome: Outcome[str] = Outcome()
    raised: list[BaseException] = []

    def wait(timeout: float) -> None:
        try:
            outcome.result(timeout=timeout)
        except BaseException as error:  # noqa: BLE001 - what the caller would see
            raised.append(error)

    try:
        for timeout in (-1, -0.5, 0):
            waiter = threading.Thread(target=wait, args=(timeout,), daemon=True)
            waiter.start()
            waiter.join(5)
            assert not waiter.is_alive(), f"result(timeout={timeout}) did not return"
        assert [type(error) for error in raised] == [TimeoutError] * 3
    finally:
        outcome.set_result("late")  # frees a waiter that hung
    assert outcome.result(timeout=-1) == "late"  # resolved: no wait at all


def test_the_warm_up_runs_on_the_thread_every_forward_runs_on() -> None:
    """A compiled model's CUDA graphs belong to the thread that recorded them: the warm-up
    (compile) runs on the batcher thread, before any item, and start() waits for it."""
    threads: dict[str, threading.Thread] = {}
    order: list[str] = []

    def warm_up() -> None:
        threads["warm_up"] = threading.current_thread()
        order.append("warm_up")

    def forward(items: list[object]) -> list[object]:
        threads["forward"] = threading.current_thread()
        order.append("forward")
        return items

    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=0.001).start(warm_up)
    try:
        assert order == ["warm_up"]  # start() returned after it, before any forward
        assert batcher.submit("x").result(timeout=10) == "x"
        assert threads["warm_up"] is threads["forward"] is not threading.current_thread()
    finally:
        batcher.stop(10)


def test_a_failing_warm_up_fails_start() -> None:
    def warm_up() -> None:
        raise RuntimeError("compile failed")

    batcher = DynamicBatcher(lambda items: items, max_batch_size=4, max_wait_s=0.001)
    with pytest.raises(RuntimeError, match="compile failed"):
        batcher.start(warm_up)
    assert batcher.stop(10)  # nothing left running
