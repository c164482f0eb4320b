"""A newcomer's first run: the demo model through the whole path, and output without noise."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shared import client
from shared.cli import main
from tests.processes import wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import private_redis

REPO = Path(__file__).resolve().parent.parent


def _env_lines(stdout: str) -> dict[str, str]:
    """``export NAME=value`` lines, as ``eval "$(realscore demo-model ...)"`` would read them."""
    env = {}
    for line in stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    return env


def test_demo_model_scores_through_the_cli_labelled_as_meaningless(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["demo-model", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr()
    env = _env_lines(printed.out)
    assert set(env) == {"REALSCORE_MODEL", "REALSCORE_HEAD_WEIGHTS"}
    assert "meaningless" in printed.err
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        noise_image(i, (80, 60)).save(folder / f"{i}.png")

    clean = {k: v for k, v in os.environ.items() if not k.startswith("REALSCORE_")}
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "score", "images", ""],  # a folder, and an empty URI
        env={**clean, **env, "HF_HUB_OFFLINE": "1", "REALSCORE_DEVICE": "cpu"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["uri"] for row in rows] == ["images/0.png", "images/1.png", "images/2.png", ""]
    assert all(row["ok"] and "demo-random" in row["model"] for row in rows[:3])
    assert rows[3]["error"]["code"] == "bad_uri"  # not the working directory, "is a directory"
    assert "is a demo head" in done.stderr and "meaningless" in done.stderr
    assert "Loading weights" not in done.stderr  # transformers' progress bar is off


@pytest.mark.integration
def test_the_worker_logs_one_short_line_per_task(worker, served_dir: Path) -> None:
    image = served_dir / "quiet-log.png"
    noise_image(11, (64, 64)).save(image)
    handle = client.submit(str(image), timeout=60)
    assert handle.get(timeout=60)["ok"]
    line = wait_until(
        lambda: next((l for l in worker.log().splitlines() if handle.id in l and "succeeded" in l), None),
        30,
        "the task's success line",
    )
    assert "'score'" not in line and "sha256" not in line, line  # not the whole result


def test_a_submit_timeout_is_one_line_without_exit_noise() -> None:
    with private_redis() as url:  # no worker reads this Redis: the task waits, then expires
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", "submit", "/data/photo.png", "--timeout", "1"],
            env={**os.environ, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.startswith("realscore submit: no result for task")
    assert done.stderr.count("\n") == 1, done.stderr  # no AsyncResult.__del__ traceback at exit


def test_an_unreachable_redis_is_one_line_and_exit_1() -> None:
    from tests.processes import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "submit", "imgs/b.png", "--timeout", "5"],
        env={**os.environ, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("realscore submit: Redis (broker or result backend) is unreachable")
    assert done.stderr.count("\n") == 1, done.stderr


def test_submit_sends_relative_paths_resolved_against_its_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sent: list[list[str]] = []

    def score_many(uris: list[str], timeout: float) -> list[dict]:
        sent.append(list(uris))
        return [{"uri": uri, "ok": True} for uri in uris]

    monkeypatch.setattr(client, "score_many", score_many)
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "imgs/b.png", "/abs/a.png", "s3://bucket/k.png"]) == 0
    assert sent == [[str(tmp_path / "imgs" / "b.png"), "/abs/a.png", "s3://bucket/k.png"]]
    # The output echoes what was typed, as `realscore score` does.
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["uri"] for row in rows] == ["imgs/b.png", "/abs/a.png", "s3://bucket/k.png"]
