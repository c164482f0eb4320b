"""ScoringService on the tiny model: lanes do not block each other, a failing model is noticed,
and the pixel budget is returned whatever happens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared.settings import load_settings
from worker.serving.batcher import Lane
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


def test_a_model_that_keeps_failing_is_reported_once(service_factory, loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken: list[BaseException] = []
    service = service_factory(on_broken=broken.append)

    def failing(pixels: object, **_: object) -> object:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loaded_model, "launch", failing)
    images = [str(path) for path in sorted(image_dir.glob("*.png"))]
    for _ in range(3):
        results = service.score_uris(images)
        assert all(not r["ok"] and r["error"]["code"] == "internal" for r in results)
        assert "illegal memory access" in results[0]["error"]["message"]
    assert not service.healthy
    assert len(broken) == 1
    assert service.budget.in_use == 0  # every image's pixels were released


def test_budget_is_released_after_scoring(service_factory, image_dir: Path) -> None:
    service = service_factory()
    results = service.score_uris([str(p) for p in sorted(image_dir.glob("*.png"))] + ["/nope.png"])
    assert [r["ok"] for r in results] == [True] * 4 + [False]
    assert service.budget.in_use == 0
    assert service.healthy
