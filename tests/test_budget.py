"""The pixel budget bounds decoded bytes in flight and never deadlocks on one huge image."""

from __future__ import annotations

import threading

import pytest

from tests.processes import wait_until
from worker.serving.budget import ByteBudget


def test_acquire_blocks_until_release() -> None:
    budget = ByteBudget(100)
    taken = budget.acquire(80)
    with pytest.raises(TimeoutError):
        budget.acquire(30, timeout=0.05)
    got = threading.Event()

    def waiter() -> None:
        budget.release(budget.acquire(30, timeout=10))
        got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    budget.release(taken)
    assert got.wait(10)
    thread.join(10)
    assert budget.in_use == 0


def test_request_over_capacity_takes_the_whole_budget() -> None:
    budget = ByteBudget(100)
    with budget.hold(10_000, timeout=1):
        assert budget.in_use == 100
    assert budget.in_use == 0


def test_hold_releases_on_error() -> None:
    budget = ByteBudget(100)
    with pytest.raises(RuntimeError):
        with budget.hold(60):
            raise RuntimeError("decode failed")
    assert budget.in_use == 0


def test_many_threads_never_exceed_capacity() -> None:
    budget = ByteBudget(1000)
    peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal peak
        for _ in range(50):
            with budget.hold(300, timeout=10):
                with lock:
                    peak = max(peak, budget.in_use)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert 0 < peak <= 1000
    assert budget.in_use == 0


def test_a_large_request_is_not_starved_by_small_ones() -> None:
    budget = ByteBudget(100)
    first = budget.acquire(60)
    big_done = threading.Event()

    def big() -> None:
        budget.release(budget.acquire(90, timeout=10))
        big_done.set()

    big_thread = threading.Thread(target=big)
    big_thread.start()
    wait_until(lambda: len(budget._waiters) == 1, 10, "the large request queued")
    # 40 bytes are free, enough for a small request, but it queued after the large one.
    with pytest.raises(TimeoutError):
        budget.acquire(10, timeout=0.2)
    budget.release(first)
    assert big_done.wait(10)
    big_thread.join(10)
    assert budget.acquire(10, timeout=1) == 10


def test_a_timed_out_waiter_leaves_the_line() -> None:
    budget = ByteBudget(100)
    held = budget.acquire(100)
    with pytest.raises(TimeoutError):
        budget.acquire(50, timeout=0.05)
    budget.release(held)
    assert budget.acquire(100, timeout=1) == 100  # nobody stale ahead of us


def test_bulk_work_holds_at_most_its_share_and_interactive_work_gets_the_rest() -> None:
    from worker.serving.budget import SharedBudget

    budget = SharedBudget(100, bulk_share=0.5)
    held = budget.acquire(50, bulk=True)
    with pytest.raises(TimeoutError):  # a second bulk image waits for the bulk share...
        budget.acquire(10, bulk=True, timeout=0.05)
    assert budget.in_use == 50  # ...without queueing for the whole budget (nothing leaked)
    interactive = budget.acquire(50, timeout=0.05)  # interactive still finds the other half
    budget.release(held)
    budget.release(interactive)
    assert budget.in_use == 0 and budget.bulk.in_use == 0


def test_a_held_share_survives_its_decode_block_shrinks_and_releases_once() -> None:
    from worker.serving.budget import Held, SharedBudget

    budget = SharedBudget(100, bulk_share=0.5)
    held = Held(budget, bulk=True)
    with held.hold(40):  # the decode's peak
        pass
    assert budget.in_use == 40 and budget.bulk.in_use == 40  # kept past the block
    held.keep(15)  # the staged frame
    assert held.taken == 15 and budget.in_use == 15 and budget.bulk.in_use == 15
    held.release()
    held.release()
    assert budget.in_use == 0 and budget.bulk.in_use == 0
    with pytest.raises(RuntimeError):
        with held.hold(30):
            raise RuntimeError("decode failed")
    assert budget.in_use == 0 and held.taken == 0


def test_a_fetch_hold_gives_back_what_it_reserves_even_after_its_release() -> None:
    """A fetch helper whose caller gave up at the deadline may reserve after the caller released:
    those bytes go straight back instead of being held for ever."""
    import time

    from worker.serving.budget import FetchHold, SharedBudget

    budget = SharedBudget(1000)
    hold = FetchHold(budget)
    hold.reserve(300, time.monotonic() + 5)
    assert budget.in_use == 300
    hold.release()
    assert budget.in_use == 0
    hold.reserve(200, time.monotonic() + 5)  # late: given back at once
    assert budget.in_use == 0
    blocker = FetchHold(budget)
    blocker.reserve(1000, time.monotonic() + 5)
    with pytest.raises(TimeoutError):
        FetchHold(budget).reserve(1, time.monotonic() + 0.05)  # waits no longer than the deadline
    blocker.release()
    assert budget.in_use == 0


def test_a_bulk_acquire_waits_its_timeout_in_all_not_once_per_budget() -> None:
    import time

    from worker.serving.budget import SharedBudget

    budget = SharedBudget(1000)
    budget.acquire(1000)  # the whole budget taken...
    budget.bulk.acquire(500)  # ...and the bulk share: a bulk acquire waits for both in turn
    freed = threading.Timer(0.4, lambda: budget.bulk.release(500))  # its share frees up late
    freed.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            budget.acquire(100, bulk=True, timeout=0.6)
        assert time.monotonic() - started < 0.85  # 0.6 in all, not 0.4 + another 0.6
    finally:
        freed.join()
    assert budget.bulk.in_use == 0  # the share it got is given back
