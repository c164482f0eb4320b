"""``realscore evaluate``: tables per condition, report files, the queue path, usage errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from shared.cli import main
from shared.settings import get_settings
from tests.lifecycle_images import write_families

PERTURB = "jpeg:75,resize:0.5,blur:1.0"


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    real, ai = write_families(tmp_path_factory.mktemp("families"), 5)
    (ai / "broken.png").write_bytes(b"not an image")
    return real, ai


def test_report_files_exist_and_plots_open(capsys, realscore_env, families, tmp_path):
    real, ai = families
    report = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--real",
            str(real),
            "--ai",
            str(ai),
            "--perturb",
            PERTURB,
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("clean", "jpeg:75", "resize:0.5", "blur:1"):
        assert f"== {name}: 11 images ==" in out
    assert "true negative rate (real)" in out and "true positive rate (ai)" in out
    assert "not scored, left out of the metrics: 1 (not_an_image 1)" in out
    assert out.count("verdicts changed vs clean") == 3

    for name in ("roc.png", "histogram.png"):
        with Image.open(report / name) as image:
            assert image.format == "PNG"
            assert 400 <= image.width <= 2000 and 300 <= image.height <= 2000
    with open(report / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 11
    broken = [row for row in rows if row["path"].endswith("broken.png")]
    assert {row["error"] for row in broken} == {"not_an_image"} and all(
        row["score"] == "" for row in broken
    )
    scored = [row for row in rows if row["score"]]
    assert all(
        -1 <= float(row["score"]) <= 1 and row["predicted"] in ("real", "ai") for row in scored
    )

    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["conditions"]) == {"clean", "jpeg:75", "resize:0.5", "blur:1"}
    clean = metrics["conditions"]["clean"]
    assert clean["errors"] == {"not_an_image": 1}
    assert (
        clean["metrics"]["positives"]["total"] == 5 and clean["metrics"]["negatives"]["total"] == 5
    )
    assert 0 <= clean["metrics"]["auc_roc"] <= 1
    assert metrics["positive"] == "ai" and metrics["high_score_means"] == "real"


def test_queue_path_reads_the_workers_rule(
    capsys, monkeypatch, realscore_env, loaded_model, families, tmp_path
):
    """``--via-queue``: results come from a real ScoringService standing in for the workers."""
    from shared import client
    from shared.settings import load_settings
    from worker.serving.service import ScoringService

    worker_settings = load_settings(threshold=0.5, high_score_means="ai")
    service = ScoringService(loaded_model, worker_settings, local_roots=None).start()
    sent: list[list[str]] = []

    def score_many(uris, timeout, bulk=False):
        sent.append(list(uris))
        return service.score_uris(list(uris))

    monkeypatch.setattr(client, "score_many", score_many)
    real, ai = families
    try:
        code = main(
            [
                "evaluate",
                "--real",
                str(real),
                "--ai",
                str(ai),
                "--via-queue",
                "--perturb",
                "jpeg:50",
                "--work-dir",
                str(tmp_path / "work"),
                "--report",
                str(tmp_path / "report"),
            ]
        )
    finally:
        service.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "threshold 0.5, score above 0.5 means ai" in out
    assert len(sent) == 2 and all(uri.startswith(str(tmp_path / "work")) for uri in sent[1])
    assert len(list((tmp_path / "work").rglob("*.jpg"))) == 10  # the broken file was never copied
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["high_score_means"] == "ai" and metrics["threshold"] == 0.5
    assert metrics["conditions"]["jpeg:50"]["errors"] == {"not_an_image": 1}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--perturb", "sharpen:2"], "unknown perturbation"),
        (["--perturb", "jpeg:0"], "jpeg quality"),
        (["--threshold", "3"], "--threshold"),
        (["--via-queue", "--perturb", "blur:2"], "--work-dir"),
    ],
)
def test_usage_errors_exit_2(capsys, realscore_env, families, extra, message):
    real, ai = families
    assert main(["evaluate", "--real", str(real), "--ai", str(ai), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_folder_and_missing_weights_exit_2(
    capsys, monkeypatch, realscore_env, families, tmp_path
):
    real, _ = families
    assert main(["evaluate", "--real", str(real), "--ai", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--real", str(real), "--ai", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
    monkeypatch.setenv("REALSCORE_HEAD_WEIGHTS", str(tmp_path / "missing.pth"))
    get_settings.cache_clear()
    assert main(["evaluate", "--real", str(real), "--ai", str(real)]) == 2
    assert "REALSCORE_HEAD_WEIGHTS" in capsys.readouterr().err
