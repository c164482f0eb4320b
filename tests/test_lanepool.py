"""LanePool, the ordered map behind ScoringService.map: order, errors in place, cancellation of
what has not started, bounded threads, shutdown finishing the queued work."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.processes import wait_until
from worker.serving import deadlines
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
    assert len(pool.threads) == 1


def test_threads_are_bounded_and_reused() -> None:
    pool = LanePool(3, "test-bounded")
    try:
        for _ in range(5):
            assert list(pool.imap(lambda x: x, list(range(50)))) == list(range(50))
        assert len(pool.threads) == 3
        names = {thread.name for thread in pool.threads}
        assert all(name.startswith("test-bounded_") for name in names)
    finally:
        pool.shutdown()


def test_shutdown_runs_the_queued_work_then_refuses_more() -> None:
    pool = LanePool(2, "test-shutdown")
    done: list[object] = []
    pool.imap(done.append, list(range(20)))  # results never read: the work runs all the same
    pool.shutdown()
    assert sorted(done) == list(range(20))  # type: ignore[type-var]
    assert not any(thread.is_alive() for thread in pool.threads)
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
        assert len(pool.threads) == 2
    finally:
        pool.shutdown()


# Fetches inline on expendable lane threads ------------------------------------------------------

DEADLINE_S = 0.3
# The deadline, the grace past it, the consumer's watch slice, and room for a loaded machine.
GIVE_UP_BOUND_S = DEADLINE_S + deadlines.GRACE_S + 0.25 + 2.0


class _Stalled:
    """A function whose fetch of "stuck" blocks (as read(2) on a hung NFS mount) until released;
    other items fetch at once. It counts how each item ended, and on which thread it fetched."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended: list[tuple[object, str]] = []
        self.fetch_threads: list[str] = []
        self.lock = threading.Lock()

    def fetch(self, item: object) -> str:
        self.fetch_threads.append(threading.current_thread().name)
        if item == "stuck":
            assert self.release.wait(30)
        return f"bytes of {item}"

    def __call__(self, item: object) -> tuple[object, str]:
        try:
            data = deadlines.within_deadline(
                time.monotonic() + DEADLINE_S, _TimedOut, lambda: self.fetch(item)
            )
            outcome = (item, data)
        except _TimedOut as error:  # as ScoringService turns fetch_timeout into a result row
            outcome = (item, f"timed out: {error}")
        with self.lock:
            self.ended.append(outcome)
        return outcome


class _TimedOut(Exception):
    def __init__(self, why: str | None) -> None:
        super().__init__(why or "deadline")


@pytest.fixture
def no_stuck_threads() -> Iterator[None]:
    # Threads left blocked by other tests end on their own; start from none, end with none.
    wait_until(lambda: deadlines.abandoned_count() == 0, 30, "earlier stuck threads done")
    yield
    wait_until(lambda: deadlines.abandoned_count() == 0, 30, "this test's stuck threads done")


def test_a_fetch_runs_inline_on_the_lane_thread(no_stuck_threads: None) -> None:
    pool, stalled = LanePool(2, "test-inline"), _Stalled()
    try:
        assert list(pool.imap(stalled, ["a", "b"])) == [("a", "bytes of a"), ("b", "bytes of b")]
        assert all(name.startswith("test-inline_") for name in stalled.fetch_threads), stalled.fetch_threads
    finally:
        pool.shutdown()


def test_an_overdue_fetch_is_given_up_on_and_its_thread_replaced(no_stuck_threads: None) -> None:
    """One lane thread, stuck in a fetch the kernel will not interrupt: the consumer answers for
    that item at its deadline (the function's own timed-out row, made once), a new thread runs the
    items behind it, and the stuck thread, once its read returns, ends without a second row."""
    pool, stalled = LanePool(1, "test-stuck"), _Stalled()
    try:
        started = time.monotonic()
        results = list(pool.imap(stalled, ["a", "stuck", "b", "c"]))
        elapsed = time.monotonic() - started
        assert results == [
            ("a", "bytes of a"),
            ("stuck", "timed out: deadline"),
            ("b", "bytes of b"),
            ("c", "bytes of c"),
        ]
        assert elapsed < GIVE_UP_BOUND_S, elapsed
        assert deadlines.abandoned_count() == 1
        assert [name for name in stalled.fetch_threads if name != "MainThread"][-2:] == ["test-stuck_1"] * 2
        stuck_thread = next(t for t in threading.enumerate() if t.name == "test-stuck_0")
        stalled.release.set()
        stuck_thread.join(10)
        assert not stuck_thread.is_alive()
        assert [end for end in stalled.ended if end[0] == "stuck"] == [("stuck", "timed out: deadline")]
        assert list(pool.imap(stalled, ["d"])) == [("d", "bytes of d")]  # the pool still serves
        assert len(pool.threads) == 1
    finally:
        stalled.release.set()
        pool.shutdown()


def test_stuck_threads_are_capped_then_fetches_fail_at_once(
    no_stuck_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadlines, "MAX_ABANDONED", 1)
    pool, stalled = LanePool(2, "test-cap"), _Stalled()
    try:
        assert list(pool.imap(stalled, ["stuck"])) == [("stuck", "timed out: deadline")]
        started = time.monotonic()
        (refused,) = pool.imap(stalled, ["a"])
        assert refused[1].startswith("timed out: 1 earlier fetches are still stuck"), refused
        assert time.monotonic() - started < DEADLINE_S  # failed at once, not at a deadline
    finally:
        stalled.release.set()
        pool.shutdown()


def test_shutdown_gives_up_on_a_stuck_fetch_nobody_waits_for(no_stuck_threads: None) -> None:
    """A caller that stopped reading its results leaves nobody to give up on a stuck item:
    shutdown does, so a worker's warm shutdown is not held by a hung mount."""
    pool, stalled = LanePool(1, "test-shutdown"), _Stalled()
    results = pool.imap(stalled, ["stuck", "a"])
    wait_until(lambda: stalled.fetch_threads, 10, "the stuck fetch started")
    del results  # never read
    try:
        started = time.monotonic()
        pool.shutdown()
        assert time.monotonic() - started < GIVE_UP_BOUND_S
        assert ("a", "bytes of a") in stalled.ended  # the queued item still ran
    finally:
        stalled.release.set()


def test_what_a_stuck_fetch_holds_is_given_back_when_it_is_given_up_on(no_stuck_threads: None) -> None:
    """A fetch stuck in the kernel must not keep its fetch budget until its read returns: the
    release registered on its item runs when the consumer gives up on it."""
    pool, stalled = LanePool(1, "test-release"), _Stalled()
    released: list[object] = []

    def holding(item: object) -> tuple[object, str]:
        deadlines.on_abandon(lambda: released.append(item))
        return stalled(item)

    try:
        assert list(pool.imap(holding, ["stuck", "a"])) == [("stuck", "timed out: deadline"), ("a", "bytes of a")]
        assert released == ["stuck"]  # given back at the give-up, the read still blocked
        assert deadlines.abandoned_count() == 1
    finally:
        stalled.release.set()
        pool.shutdown()


def test_the_answer_for_a_given_up_item_knows_it_is_one(no_stuck_threads: None) -> None:
    """The task's per-image drain check must not hand back an image that had started: the
    function can tell the consumer's answer for a given-up item from a fresh start."""
    pool, stalled = LanePool(1, "test-answering"), _Stalled()
    seen: dict[object, bool] = {}

    def noting(item: object) -> tuple[object, str]:
        seen[item] = deadlines.answering_for_abandoned()
        return stalled(item)

    try:
        assert [r[1] for r in pool.imap(noting, ["stuck", "a"])] == ["timed out: deadline", "bytes of a"]
        assert seen == {"stuck": True, "a": False}  # the last word on "stuck" is the answer's
    finally:
        stalled.release.set()
        pool.shutdown()


def test_the_answer_for_a_given_up_item_knows_when_its_work_began(no_stuck_threads: None) -> None:
    """The answer for a given-up item must say how long the image took in all (its stall on the
    lane thread included), not how long the answer took: it can ask when its item began."""
    pool, stalled = LanePool(1, "test-began"), _Stalled()
    began: dict[object, float] = {}

    def noting(item: object) -> tuple[object, str]:
        began.setdefault(item, time.monotonic())  # the first start: on the lane thread
        outcome = stalled(item)
        if item == "stuck":
            answered = time.monotonic()
            # The answer's own start is now; its item's work began on the lane thread, queued
            # before, and (by the time the answer is due) past a deadline ago.
            assert queued <= deadlines.work_started(answered) <= began["stuck"] < answered - DEADLINE_S
        return outcome

    try:
        queued = time.monotonic()
        assert [r[1] for r in pool.imap(noting, ["stuck"])] == ["timed out: deadline"]
        outside = time.monotonic()
        assert deadlines.work_started(outside) == outside  # not answering for a given-up item
    finally:
        stalled.release.set()
        pool.shutdown()


@pytest.mark.parametrize("leaving", ["an error in its place", "the iterator closed"])
def test_a_consumer_that_left_early_still_gives_up_on_its_stuck_item(
    no_stuck_threads: None, leaving: str
) -> None:
    """A consumer that stops reading (an error raised in its place, as a task's hand-back while
    the worker drains; a generator closed) must not leave its stuck items' threads stuck until
    shutdown: a stand-in gives them up at their deadline all the same (their fetch budget given
    back, their threads replaced), and answers for none of them."""
    pool, stalled = LanePool(2, "test-left"), _Stalled()
    released: list[object] = []
    stuck_on: list[threading.Thread] = []

    def work(item: object) -> tuple[object, str]:
        if item == "boom":
            raise ValueError("boom")
        if item == "stuck":
            stuck_on.append(threading.current_thread())
        deadlines.on_abandon(lambda: released.append(item))
        return stalled(item)

    try:
        results = pool.imap(work, ["boom" if leaving == "an error in its place" else "a", "stuck"])
        wait_until(lambda: stuck_on, 10, "the stuck item started")
        if leaving == "an error in its place":
            with pytest.raises(ValueError, match="boom"):
                next(results)
        else:
            assert next(results) == ("a", "bytes of a")
            results.close()
        # No more calls on the pool: nobody but the stand-in is there to give up on "stuck".
        wait_until(lambda: released == ["stuck"], GIVE_UP_BOUND_S, "the stuck item given up on")
        assert deadlines.abandoned_count() == 1
        wait_until(lambda: len(pool.threads) == 2, 10, "a thread in place of the stuck one")
        assert stuck_on[0] not in pool.threads
        stalled.release.set()
        stuck_on[0].join(10)
        assert not stuck_on[0].is_alive()
        assert [end for end in stalled.ended if end[0] == "stuck"] == []  # no answer made
    finally:
        stalled.release.set()
        pool.shutdown()
