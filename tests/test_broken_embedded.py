"""``realscore score``, ``evaluate`` and ``backfill --in-process``, with a model that breaks
mid-run (a sticky CUDA-style error): one line on stderr, what was finished kept, exit code 1 (a
runtime failure)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from shared.cli import EXIT_FAILURE, main
from shared.settings import get_settings
from tests.lifecycle_images import write_families


@pytest.fixture()
def breaks_after(monkeypatch: pytest.MonkeyPatch, realscore_env: dict):
    """``breaks_after(n)``: the model loaded next serves ``n`` forward passes, then every one fails."""
    from worker.serving import embedded

    monkeypatch.setenv("REALSCORE_CONCURRENCY", "1")  # one image at a time: batches in input order
    get_settings.cache_clear()
    real_load = embedded.load_model

    def arm(good: int) -> None:
        def load_model(*args: object, **kwargs: object):
            loaded = real_load(*args, **kwargs)
            real_launch, calls = loaded.launch, itertools.count()

            def launch(pixels, **options):
                if next(calls) >= good:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return real_launch(pixels, **options)

            loaded.launch = launch
            return loaded

        monkeypatch.setattr(embedded, "load_model", load_model)

    return arm


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_score_keeps_the_lines_written_and_ends_with_one_line(
    breaks_after, image_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    breaks_after(2)
    images = [str(path) for path in sorted(image_dir.glob("*.png"))] * 2
    code = main(["score", "--batch-size", "1", *images])
    out, err = capsys.readouterr()
    assert code == EXIT_FAILURE
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["uri"] for row in rows] == images[:2] and all(row["ok"] for row in rows)
    assert "Traceback" not in err
    assert _last_line(err).startswith("realscore score: the model stopped working (")
    assert _last_line(err).endswith(f"2 of {len(images)} results were written")


def test_evaluate_keeps_the_finished_conditions_and_ends_with_one_line(
    breaks_after, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    real, ai = write_families(tmp_path / "families", 3)
    breaks_after(6)  # the clean pass, then the first degraded image breaks it
    report = tmp_path / "report"
    code = main(["evaluate", "--real", str(real), "--ai", str(ai), "--batch-size", "1",
                 "--perturb", "jpeg:75", "--report", str(report)])
    out, err = capsys.readouterr()
    assert code == EXIT_FAILURE
    assert "== clean: 6 images ==" in out and "== jpeg:75" not in out
    assert "Traceback" not in err
    assert _last_line(err).startswith("realscore evaluate: the model stopped working (")
    assert _last_line(err).endswith("conditions finished: clean")
    with open(report / "scores.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6  # the clean pass's report is written


def test_backfill_in_process_stops_without_writing_error_rows_and_resumes(
    breaks_after, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A broken model is not every remaining image's fault: no `internal` rows (a rerun would
    skip them), exit 1, and the rerun scores what is left."""
    out = tmp_path / "rows.jsonl"
    command = ["backfill", str(image_dir), "--out", str(out), "--in-process",
               "--chunk-size", "1", "--max-in-flight", "1"]
    breaks_after(2)
    code = main(command)
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["ok"] for row in rows), rows
    assert "realscore backfill: the model stopped working (" in err and "Traceback" not in err

    breaks_after(100)  # a fresh process whose model works
    assert main(command) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["uri"] for row in rows) == sorted(str(p) for p in image_dir.glob("*.png"))
    assert all(row["ok"] for row in rows)
