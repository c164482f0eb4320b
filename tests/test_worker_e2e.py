"""End to end through Redis and a real ``realscore worker``: scores equal the embedded mode's,
concurrent tasks share forward passes, and the bulk queue feeds the bulk lane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import client
from tests.tiny_clip import noise_image
from tests.worker_helpers import sample, scrape

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def e2e_images(served_dir: Path) -> list[Path]:
    """50 distinct small images inside the worker's LOCAL_ROOTS."""
    folder = served_dir / "e2e"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(50):
        path = folder / f"img-{i:02d}.{'png' if i % 2 else 'jpg'}"
        noise_image(1000 + i, (64 + 3 * i, 48 + (7 * i) % 50)).save(path)
        paths.append(path)
    return paths


def _start_embedded(paths: list[Path], env: dict) -> subprocess.Popen:
    """``realscore score`` as a subprocess on the same files with the same model."""
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "score", *map(str, paths)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _embedded_scores(process: subprocess.Popen) -> dict[str, dict]:
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    return {row["uri"]: row for row in rows}


def test_fifty_tasks_match_the_embedded_scores_and_share_batches(
    worker, worker_env: dict, e2e_images: list[Path]
) -> None:
    port = int(worker_env["REALSCORE_METRICS_PORT"])
    embedded = _start_embedded(e2e_images, worker_env)  # loads its model meanwhile (seconds)
    try:
        before = scrape(port)
        handles = [client.submit(str(path), timeout=120) for path in e2e_images]  # all enqueued at once
        results = [handle.get(timeout=120) for handle in handles]
        after = scrape(port)
    except BaseException:
        embedded.kill()
        embedded.communicate()
        raise
    expected = _embedded_scores(embedded)
    assert len(expected) == len(e2e_images)
    for path, result in zip(e2e_images, results):
        assert result["uri"] == str(path)
        assert result["ok"], result
        reference = expected[str(path)]
        assert reference["ok"], reference
        assert result["score"] == pytest.approx(reference["score"], abs=1e-4)
        assert result["label"] == reference["label"]
        assert result["sha256"] == reference["sha256"]
        assert result["model"] == reference["model"]
        assert -1.0 <= result["score"] <= 1.0
    assert len({round(r["score"], 6) for r in results}) > 1  # distinct images, distinct scores

    batches = sample(after, "realscore_batch_size_count") - sample(before, "realscore_batch_size_count")
    images = sample(after, "realscore_batch_size_sum") - sample(before, "realscore_batch_size_sum")
    singles = sample(after, "realscore_batch_size_bucket", le="1.0") - sample(
        before, "realscore_batch_size_bucket", le="1.0"
    )
    assert images == len(e2e_images)
    assert 1 <= batches < images, "every image had a forward pass of its own"
    assert singles < batches  # at least one batch held more than one image
    scored = sample(after, "realscore_images_scored_total") - sample(before, "realscore_images_scored_total")
    assert scored == len(e2e_images)


def test_bulk_score_many_is_consumed_from_the_bulk_queue(
    worker, worker_env: dict, e2e_images: list[Path]
) -> None:
    port = int(worker_env["REALSCORE_METRICS_PORT"])
    uris = [str(path) for path in e2e_images[:6]]
    waits = "realscore_queue_wait_seconds_count"
    before = scrape(port)

    results = client.score_many(uris, timeout=60, bulk=True)

    after = scrape(port)
    assert [r["uri"] for r in results] == uris
    assert all(r["ok"] for r in results), results
    assert sample(after, waits, lane="bulk") - sample(before, waits, lane="bulk") == len(uris)
    assert sample(after, waits, lane="interactive") == sample(before, waits, lane="interactive")

    interactive = client.score_many(uris[:2], timeout=60)
    final = scrape(port)
    assert [r["score"] for r in interactive] == pytest.approx([r["score"] for r in results[:2]], abs=1e-4)
    assert sample(final, waits, lane="interactive") - sample(after, waits, lane="interactive") == 2
    assert sample(final, waits, lane="bulk") == sample(after, waits, lane="bulk")
