"""ScoringService on the tiny model: lanes do not block each other, a failing model is noticed,
and the pixel budget is returned whatever happens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.processes import wait_until

from shared.settings import load_settings
from worker.serving.batcher import Lane, ModelBroken
from worker.serving.service import ScoringService


@pytest.fixture()
def service_factory(loaded_model):
    made: list[ScoringService] = []

    def make(**kwargs: object) -> ScoringService:
        settings = load_settings(max_batch_size=4, max_wait_ms=1)
        service = ScoringService(loaded_model, settings, local_roots=None, **kwargs).start()
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


def test_bulk_work_does_not_hold_up_interactive_work(service_factory) -> None:
    service = service_factory(threads=1)
    release = threading.Event()
    bulk_started = threading.Event()

    def slow_bulk(item: object) -> object:
        bulk_started.set()
        assert release.wait(30)
        return item

    bulk = threading.Thread(target=lambda: service.map(slow_bulk, [1, 2], Lane.BULK))
    bulk.start()
    assert bulk_started.wait(10)
    # The bulk lane's only thread is busy; the interactive lane still answers.
    assert service.map(lambda item: item * 10, [1, 2, 3], Lane.INTERACTIVE) == [10, 20, 30]
    release.set()
    bulk.join(10)
    assert not bulk.is_alive()


def test_a_broken_model_hands_work_back_instead_of_answering_internal(service_factory, loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken: list[BaseException] = []
    service = service_factory(on_broken=broken.append)
    images = [str(path) for path in sorted(image_dir.glob("*.png"))]
    assert all(r["ok"] for r in service.score_uris(images))  # the model has worked: a probe exists

    def failing(pixels: object, **_: object) -> object:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loaded_model, "launch", failing)
    # The first whole batch that fails is followed by the probe, which fails too: the images
    # are not to blame, so none of them becomes an `internal` result.
    with pytest.raises(ModelBroken, match="illegal memory access"):
        service.score_uris(images)
    with pytest.raises(ModelBroken):
        service.score_uris(images)  # and later work is refused, not failed
    assert not service.healthy
    assert len(broken) == 1
    # Every image's pixels are released (the map raised at its first failure; the other
    # threads finish their own images a moment later).
    wait_until(lambda: service.budget.in_use == 0, 10, "pixel budget released")


def test_a_failing_image_with_a_working_model_fails_alone(service_factory, loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = service_factory()
    images = [str(path) for path in sorted(image_dir.glob("*.png"))]
    assert all(r["ok"] for r in service.score_uris(images))
    real = loaded_model.launch
    failures = iter([RuntimeError("CUDA error: device-side assert triggered")])

    def once(pixels, **kwargs):  # the next batch fails (its image is to blame), then all run
        error = next(failures, None)
        if error is not None:
            raise error
        return real(pixels, **kwargs)

    monkeypatch.setattr(loaded_model, "launch", once)
    results = service.score_uris([images[2]])  # alone in its batch: the probe tells them apart
    assert results[0]["error"]["code"] == "internal"
    assert service.healthy
    assert all(r["ok"] for r in service.score_uris(images))


def test_budget_is_released_after_scoring(service_factory, image_dir: Path) -> None:
    service = service_factory()
    results = service.score_uris([str(p) for p in sorted(image_dir.glob("*.png"))] + ["/nope.png"])
    assert [r["ok"] for r in results] == [True] * 4 + [False]
    assert service.budget.in_use == 0
    assert service.healthy


@pytest.mark.parametrize("mode", ["exact", "tensor"])
def test_decoded_frames_are_counted_in_the_pixel_budget_until_their_batch_ends(
    loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Each staged frame is counted by the budget from its decode until its batch ends, so a
    burst never holds more frames than the budget allows (instrumented, not timed)."""
    from collections import deque

    from worker.serving.budget import SharedBudget

    settings = load_settings(decode=mode, max_batch_size=4, max_wait_ms=1, concurrency=16)
    service = ScoringService(loaded_model, settings, local_roots=None)
    # About two decodes at once (each counts 8 MiB of slack), room for many queued frames.
    service.budget = SharedBudget(24 << 20)
    lock = threading.Lock()
    live = 0  # bytes of staged frames whose batch has not ended
    sizes: dict[int, int] = {}
    batches: deque[int] = deque()
    seen: list[tuple[int, int]] = []  # (live, budget in use) each time a frame appears
    real_stage, real_collate, real_collect = service.mode.stage, service.mode.collate, loaded_model.collect

    def stage(image, data, hold):
        nonlocal live
        staged = real_stage(image, data, hold)
        with lock:
            live += staged.nbytes
            sizes[id(staged.payload)] = staged.nbytes
            seen.append((live, service.budget.in_use))
        return staged

    def collate(payloads):
        with lock:
            batches.append(sum(sizes.pop(id(p)) for p in payloads))
        return real_collate(payloads)

    def collect(launched):
        nonlocal live
        out = real_collect(launched)
        with lock:  # before the futures resolve, so before the task threads release
            live -= batches.popleft()
        return out

    monkeypatch.setattr(service.mode, "stage", stage)
    monkeypatch.setattr(service.mode, "collate", collate)
    monkeypatch.setattr(loaded_model, "collect", collect)
    service.start()
    try:
        images = [str(path) for path in sorted(image_dir.glob("*.png"))]
        assert service.score_uri(images[0])["ok"]  # alone: nothing else could cover its frame
        assert all(r["ok"] for r in service.score_uris(images * 12))
    finally:
        service.stop()
    assert len(seen) == 1 + 48
    assert all(0 < frames <= in_use <= service.budget.capacity for frames, in_use in seen), seen
    assert live == 0 and service.budget.in_use == 0 and service.budget.bulk.in_use == 0


def test_stop_gives_up_on_a_forward_that_hangs_after_shutdown_began(loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The forward hangs, and stop() begins before the watchdog (1 s) has declared the batcher
    # broken: the wait must still end, broken_timeout after the watchdog fires.
    settings = load_settings(max_batch_size=4, max_wait_ms=1, forward_timeout=1.0)
    service = ScoringService(loaded_model, settings, local_roots=None).start()
    entered, release = threading.Event(), threading.Event()
    real = loaded_model.launch

    def hanging(pixels: object, **kwargs: object) -> object:
        entered.set()
        release.wait(60)
        return real(pixels, **kwargs)

    monkeypatch.setattr(loaded_model, "launch", hanging)
    image = str(sorted(image_dir.glob("*.png"))[0])
    outcomes: list[object] = []

    def score() -> None:  # on its own thread, as a Celery task thread scores one image
        try:
            outcomes.append(service.infer(service.prepare(image)))
        except ModelBroken as error:
            outcomes.append(error)

    scorer = threading.Thread(target=score, daemon=True)
    scorer.start()
    try:
        assert entered.wait(30)
        assert not service.batcher.broken  # shutdown begins while the forward merely runs
        stopped: list[bool] = []
        stopper = threading.Thread(target=lambda: stopped.append(service.stop(broken_timeout=0.5)), daemon=True)
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "stop() is still joining the hung forward"
        assert stopped == [False]  # the batcher thread is still in the forward: said so
        assert service.batcher.broken
        scorer.join(10)
        assert len(outcomes) == 1 and isinstance(outcomes[0], ModelBroken)
    finally:
        release.set()
        service.batcher.stop(10)


def test_score_many_answers_a_stalled_file_by_its_deadline_and_scores_the_rest(
    loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """score_many's lane threads read files inline: a read that blocks in the kernel (a hung
    network mount) gives that image fetch_timeout at the deadline, and the others are scored
    by threads started in place of the stuck one. The timed-out image's elapsed time is its
    whole wait, not the instant its answer took."""
    import time

    import worker.serving.sources as sources_module
    from worker.serving import deadlines

    images = [str(path) for path in sorted(image_dir.glob("*.png"))]
    stalled_name = Path(images[1]).name
    release = threading.Event()
    real_read = sources_module._read_capped

    def stalled(stream, max_bytes, deadline, what):
        if what.endswith(stalled_name):
            release.wait(60)
        return real_read(stream, max_bytes, deadline, what)

    wait_until(lambda: deadlines.abandoned_count() == 0, 30, "earlier stuck threads done")
    monkeypatch.setattr(sources_module, "_read_capped", stalled)
    settings = load_settings(max_batch_size=4, max_wait_ms=1, fetch_timeout=0.5)
    service = ScoringService(loaded_model, settings, local_roots=None, threads=1).start()
    try:
        started = time.monotonic()
        results = service.score_uris(images)
        took = time.monotonic() - started
        assert took < 0.5 + deadlines.GRACE_S + 0.25 + 5
        assert [r["uri"] for r in results] == images
        assert results[1]["error"]["code"] == "fetch_timeout", results[1]
        # Given up on no sooner than the deadline and its grace after its fetch began.
        assert (0.5 + deadlines.GRACE_S) * 1000 <= results[1]["elapsed_ms"] <= took * 1000, results[1]
        assert all(r["ok"] for i, r in enumerate(results) if i != 1), results
    finally:
        release.set()
        service.stop()
    wait_until(lambda: deadlines.abandoned_count() == 0, 10, "the stuck lane thread done")


def test_the_model_is_compiled_on_the_thread_that_runs_it(
    loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REALSCORE_COMPILE warms the model up on the batcher thread, before any task: CUDA graphs
    (reduce-overhead) recorded on another thread would be recorded again on traffic."""
    compiled_on: list[threading.Thread] = []
    forward_on: list[threading.Thread] = []
    real_launch = loaded_model.launch

    def launch(*args: object, **kwargs: object) -> object:
        forward_on.append(threading.current_thread())
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(loaded_model, "compile", lambda mode, sizes: compiled_on.append(threading.current_thread()))
    monkeypatch.setattr(loaded_model, "launch", launch)
    settings = load_settings(max_batch_size=4, max_wait_ms=1, compile="default")
    service = ScoringService(loaded_model, settings, local_roots=None).start()
    try:
        assert len(compiled_on) == 1 and not forward_on  # compiled before start() returned
        assert all(r["ok"] for r in service.score_uris([str(p) for p in sorted(image_dir.glob("*.png"))]))
        assert compiled_on[0] is service.batcher._thread
        assert set(forward_on) == {service.batcher._thread}
    finally:
        service.stop()


def test_starting_sets_the_gil_switch_interval_the_batcher_waits_at_most(loaded_model) -> None:
    """Each eager op of the forward gives the GIL up; a thread busy in Python hands it back only
    one switch interval after the batcher asks (bench/gil_contention.py measures the cost)."""
    import sys

    before = sys.getswitchinterval()
    service = ScoringService(loaded_model, load_settings(switch_interval_ms=0.3), local_roots=None)
    try:
        service.start()
        assert sys.getswitchinterval() == pytest.approx(0.0003)
    finally:
        service.stop()
        sys.setswitchinterval(before)


def test_cuda_graphs_on_a_cpu_model_is_a_one_line_start_error(loaded_model) -> None:
    from worker.model.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"REALSCORE_COMPILE=cuda-graphs needs a CUDA device") as caught:
        ScoringService(loaded_model, load_settings(compile="cuda-graphs"), local_roots=None).start()
    assert "\n" not in str(caught.value)


def test_fetched_bytes_are_counted_until_their_decode_is_and_always_given_back(
    loaded_model, image_dir: Path, tmp_path: Path
) -> None:
    """REALSCORE_MAX_FETCH_BYTES: a read waits for room (and ends in fetch_timeout at its
    deadline); whatever happens to an image, its fetched bytes are given back."""
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    images = [str(path) for path in sorted(image_dir.glob("*.png"))]
    uris = [*images, str(tmp_path / "notes.png"), str(tmp_path / "missing.png")]
    settings = load_settings(max_batch_size=4, max_wait_ms=1, fetch_timeout=0.5, max_fetch_bytes=1 << 20)
    service = ScoringService(loaded_model, settings, local_roots=None).start()
    try:
        results = service.score_uris(uris)
        assert [r["ok"] for r in results] == [True] * len(images) + [False, False]
        assert service.fetch_budget.in_use == 0
        taken = service.fetch_budget.acquire(1 << 20)  # the whole fetch budget, held elsewhere
        waiting = service.score_uri(images[0])
        assert waiting["error"]["code"] == "fetch_timeout", waiting
        assert "REALSCORE_MAX_FETCH_BYTES" in waiting["error"]["message"]
        service.fetch_budget.release(taken)
        assert service.score_uri(images[0])["ok"] and service.fetch_budget.in_use == 0
    finally:
        service.stop()
