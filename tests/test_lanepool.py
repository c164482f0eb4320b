"""LanePool, the ordered map behind ScoringService.map: order, errors in place, cancellation of
what has not started, bounded threads, shutdown finishing the queued work."""

from __future__ import annotations

import threading

import pytest

from tests.processes import wait_until
from worker.serving.lanepool import LanePool


def test_results_come_in_input_order_whatever_order_they_finish_in() -> None:
    pool = LanePool(4, "test-order")
    first_may_finish = threading.Event()
    finished: list[object] = []

    def slow_first(x: object) -> object:
        if x == 0:
            assert first_may_finish.wait(10)
        finished.append(x)
        return x

    try:
        results = pool.imap(slow_first, list(range(8)))
        # The items after the first finish while it is held; its result still comes first.
        wait_until(lambda: len(finished) == 7, 10, "the other 7 items done")
        first_may_finish.set()
        assert list(results) == list(range(8))
    finally:
        first_may_finish.set()
        pool.shutdown()


def test_the_first_error_is_raised_in_its_place_and_unstarted_items_are_skipped() -> None:
    pool = LanePool(1, "test-error")  # one thread: the items run one after the other
    gate, gate2 = threading.Event(), threading.Event()
    ran: list[int] = []

    def work(x: object) -> object:
        ran.append(x)  # type: ignore[arg-type]
        if x == 0:
            assert gate.wait(10)
        if x == 1:
            raise ValueError("image 1")
        if x == 2:  # still running when the error reaches the consumer
            assert gate2.wait(10)
        return x

    try:
        results = pool.imap(work, [0, 1, 2, 3])
        wait_until(lambda: ran == [0], 10, "item 0 started")
        gate.set()
        assert next(results) == 0
        wait_until(lambda: ran == [0, 1, 2], 10, "item 2 running, 1 failed")
        with pytest.raises(ValueError, match="image 1"):
            next(results)
    finally:
        gate.set()
        gate2.set()
        pool.shutdown()  # runs what is queued: the skipped items end without running
    assert 3 not in ran  # cancelled before the one thread reached it
    assert len(pool._threads) == 1


def test_threads_are_bounded_and_reused() -> None:
    pool = LanePool(3, "test-bounded")
    try:
        for _ in range(5):
            assert list(pool.imap(lambda x: x, list(range(50)))) == list(range(50))
        assert len(pool._threads) == 3
        names = {thread.name for thread in pool._threads}
        assert all(name.startswith("test-bounded_") for name in names)
    finally:
        pool.shutdown()


def test_shutdown_runs_the_queued_work_then_refuses_more() -> None:
    pool = LanePool(2, "test-shutdown")
    done: list[object] = []
    pool.imap(done.append, list(range(20)))  # results never read: the work runs all the same
    pool.shutdown()
    assert sorted(done) == list(range(20))  # type: ignore[type-var]
    assert not any(thread.is_alive() for thread in pool._threads)
    with pytest.raises(RuntimeError):
        pool.imap(done.append, [1])


def test_imap_does_not_keep_the_results_it_has_yielded() -> None:
    """``realscore score`` streams imap's results over a whole folder: one already written must
    not stay referenced until the last image is done (``Executor.map`` dropped each future)."""
    import gc
    import weakref

    class Row:
        def __init__(self, x: object) -> None:
            self.x = x

    pool = LanePool(2, "test-streamed")
    try:
        results = pool.imap(Row, list(range(3)))
        first = next(results)
        gone = weakref.ref(first)
        del first
        assert next(results).x == 1
        gc.collect()
        assert gone() is None, "a yielded result is still referenced by the pool's iterator"
        assert [row.x for row in results] == [2]
    finally:
        pool.shutdown()


def test_more_concurrent_maps_than_threads_all_finish_in_order() -> None:
    """Celery's task threads each map a chunk onto a lane's few threads: the items of all of them
    share one FIFO, so every chunk finishes (none waits on another's items) and each keeps its
    own order."""
    pool = LanePool(2, "test-crowded")
    outcomes: dict[int, list[object]] = {}

    def chunk(index: int) -> None:
        outcomes[index] = list(pool.imap(lambda x: (index, x), list(range(40))))

    callers = [threading.Thread(target=chunk, args=(index,)) for index in range(16)]
    try:
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert not any(caller.is_alive() for caller in callers)
        assert outcomes == {index: [(index, x) for x in range(40)] for index in range(16)}
        assert len(pool._threads) == 2
    finally:
        pool.shutdown()
