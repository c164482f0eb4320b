"""``realscore backfill`` end to end: real Redis, real ``realscore worker`` subprocesses, moto's S3
server, the backfill itself as a subprocess (it is signalled and counted like a user's).

Tests that own the queues (kill, interrupt, priority) share one private ``redis-server`` and one
worker started for this module with a short visibility timeout, one bulk slot and DEBUG logs
(the batcher logs each forward pass's lanes at DEBUG: the priority test reads their order).
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest

from shared.backfill_output import read_rows
from tests.processes import WorkerProcess, wait_until
from tests.tiny_clip import noise_image
from tests.worker_helpers import app_for, private_redis

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
VISIBILITY = 10
TIMEOUT = 120


def _png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(folder: Path, count: int, size: tuple[int, int] = (40, 32)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"d{index % 3}" / f"img{index:04d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png(index, size))
        paths.append(str(path))
    return sorted(paths)


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "backfill", *args],
        env={**os.environ, **env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def _finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"backfill did not finish within {timeout} s:\n{output}") from None
    return process.returncode, output


def _backfill(args: list[str], env: dict, timeout: float = TIMEOUT) -> tuple[int, str]:
    return _finish(_start(args, env), timeout)


def _rows(path: Path, fmt: str = "jsonl") -> list[dict]:
    return list(read_rows(str(path), fmt)) if path.exists() else []  # type: ignore[arg-type]


def _count_rows(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# S3, through the session's worker -----------------------------------------------------------------
def test_an_s3_prefix_gets_one_row_per_object_with_the_right_codes(
    worker, worker_env: dict, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"backfill-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    good = [f"media/2024/{index % 7}/photo-{index}.png" for index in range(298)]
    for index, key in enumerate(good):
        s3.put_object(Bucket=bucket, Key=key, Body=_png(index, (24, 24)))
    s3.put_object(Bucket=bucket, Key="media/2024/readme.txt", Body=b"not an image\n")
    s3.put_object(Bucket=bucket, Key="media/2024/broken.jpg", Body=_png(1)[:60])
    s3.put_object(Bucket=bucket, Key="media/2024/sub/", Body=b"")  # a folder marker: no row
    for key in ("media/2023/old.png", "media/2024x/near.png", "other/x.png"):  # outside the prefix
        s3.put_object(Bucket=bucket, Key=key, Body=_png(2))

    out = tmp_path / "s3.jsonl"
    code, log = _backfill([f"s3://{bucket}/media/2024/", "--out", str(out), "--chunk-size", "50"], worker_env)
    assert code == 0, log
    rows = _rows(out)
    by_uri = {row["uri"]: row for row in rows}
    assert len(rows) == len(by_uri) == 300  # one row per object under the prefix, none twice
    assert set(by_uri) == {f"s3://{bucket}/{key}" for key in (*good, "media/2024/readme.txt", "media/2024/broken.jpg")}
    assert all(by_uri[f"s3://{bucket}/{key}"]["ok"] for key in good)
    assert by_uri[f"s3://{bucket}/media/2024/readme.txt"]["error"]["code"] == "not_an_image"
    assert by_uri[f"s3://{bucket}/media/2024/broken.jpg"]["error"]["code"] == "corrupt_image"
    assert "298 scored" in log and "not_an_image 1" in log


# Local trees, in-process and dry run ------------------------------------------------------------
def test_in_process_dry_run_and_csv_give_the_same_rows(
    worker, worker_env: dict, served_dir: Path, tmp_path: Path
) -> None:
    paths = _tree(served_dir / "backfill-local", 40)
    (served_dir / "backfill-local" / "notes.txt").write_text("skipped: not an image extension")
    (served_dir / "backfill-local" / "d0" / "fake.png").write_text("an image name, not an image")
    source = str(served_dir / "backfill-local")
    jsonl, csv = tmp_path / "here.jsonl", tmp_path / "queue.csv"

    code, log = _backfill([source, "--out", str(jsonl), "--dry-run"], worker_env)
    assert code == 0 and "41 listed, 0 already done, 41 to score" in log, log
    assert not jsonl.exists()

    code, log = _backfill([source, "--out", str(jsonl), "--in-process", "--chunk-size", "16"], worker_env)
    assert code == 0, log
    code, log = _backfill([source, "--out", str(csv), "--format", "csv", "--chunk-size", "7"], worker_env)
    assert code == 0, log
    code, log = _backfill([source, "--out", str(jsonl), "--dry-run"], worker_env)
    assert code == 0 and "41 listed, 41 already done, 0 to score" in log, log

    here = {row["uri"]: row for row in _rows(jsonl)}
    queued = {row["uri"]: row for row in _rows(csv, "csv")}
    assert sorted(here) == sorted(queued) == sorted([*paths, source + "/d0/fake.png"])
    for uri, row in here.items():  # the same model in this process and in the worker
        other = queued[uri]
        assert {k: v for k, v in row.items() if k not in ("score", "elapsed_ms")} == {
            k: v for k, v in other.items() if k not in ("score", "elapsed_ms")
        }
        assert row["score"] == pytest.approx(other["score"], abs=1e-5) if row["ok"] else other["score"] is None
    assert here[source + "/d0/fake.png"]["error"]["code"] == "not_an_image"


# Tests that own the queues ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def private(worker_env: dict, tmp_path_factory: pytest.TempPathFactory, served_dir: Path):
    """A private Redis, and the env a worker or backfill on it runs with."""
    with private_redis() as url:
        env = {**worker_env, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url,
               "REALSCORE_VISIBILITY_TIMEOUT": str(VISIBILITY), "REALSCORE_BULK_TASK_SLOTS": "1",
               "REALSCORE_MAX_BATCH_SIZE": "8", "REALSCORE_MAX_WAIT_MS": "20",
               # a 10 s visibility timeout needs short per-image deadlines (the worker checks)
               "REALSCORE_FETCH_TIMEOUT": "2", "REALSCORE_FORWARD_TIMEOUT": "2.5"}
        env.pop("REALSCORE_METRICS_PORT", None)  # the session's worker serves that port
        yield url, env


@pytest.fixture(scope="module")
def gated_worker(private, tmp_path_factory: pytest.TempPathFactory):
    url, env = private
    logs = tmp_path_factory.mktemp("backfill-logs")
    process = WorkerProcess(env, logs / "gated.log", ["--concurrency", "2", "--loglevel", "DEBUG"]).start()
    try:
        process.wait_ready(app_for(url))
        yield process
    finally:
        process.stop()


def _received(worker: WorkerProcess, name: str = "realscore.score_many") -> int:
    return len(re.findall(rf"Task {re.escape(name)}\[[0-9a-f-]+\] received", worker.log()))


def test_a_worker_killed_mid_backfill_loses_and_duplicates_nothing(
    private, gated_worker: WorkerProcess, served_dir: Path, tmp_path: Path
) -> None:
    url, env = private
    paths = _tree(served_dir / "backfill-kill", 96)
    victim = WorkerProcess(env, tmp_path / "victim.log", ["--concurrency", "2"]).start()
    victim.wait_ready(app_for(url))
    out = tmp_path / "kill.jsonl"
    backfill = _start([str(served_dir / "backfill-kill"), "--out", str(out), "--chunk-size", "16",
                       "--max-in-flight", "4", "--chunk-timeout", str(4 * VISIBILITY)], env)
    try:
        # Kill it while it holds a chunk it has not finished (acked late: Redis still has it).
        wait_until(lambda: _received(victim) > victim.log().count("succeeded in"), 60, "victim busy")
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(10)
        code, log = _finish(backfill)
    finally:
        victim.stop()
    assert code == 0, log
    rows = _rows(out)
    assert sorted(row["uri"] for row in rows) == paths  # every image exactly once
    assert all(row["ok"] for row in rows), [row["error"] for row in rows if not row["ok"]][:3]
    # Redis redelivered the victim's chunk (nothing timed out here) and the worker ran it: a
    # chunk given up by the attempt counter would have come back as `internal` rows, retried.
    assert "0 images retried; 0 chunks re-sent" in log


def test_an_interrupted_backfill_resumes_without_rescoring_what_it_wrote(
    private, gated_worker: WorkerProcess, served_dir: Path, tmp_path: Path
) -> None:
    _, env = private
    paths = _tree(served_dir / "backfill-resume", 120)
    out = tmp_path / "resume.jsonl"
    args = [str(served_dir / "backfill-resume"), "--out", str(out), "--chunk-size", "10",
            "--max-in-flight", "2", "--chunk-timeout", str(4 * VISIBILITY)]
    before = _received(gated_worker)
    first = _start(args, env)
    wait_until(lambda: _count_rows(out) >= 30, 60, "first rows written")
    first.send_signal(signal.SIGINT)
    code, log = _finish(first)
    assert code == 130, log
    assert "resume with: realscore backfill" in log
    written = [row["uri"] for row in _rows(out)]
    assert 30 <= len(written) < len(paths) and len(set(written)) == len(written)
    # Everything it sent came back before it stopped (nothing is still queued for the rerun).
    wait_until(lambda: _received(gated_worker) - before == math.ceil(len(written) / 10), 30, "tasks")

    middle = _received(gated_worker)
    code, log = _backfill(args, env)
    assert code == 0, log
    rows = [row["uri"] for row in _rows(out)]
    assert sorted(rows) == paths and len(set(rows)) == len(rows)
    assert rows[: len(written)] == written
    # The rerun sent only what the first run had not written.
    assert _received(gated_worker) - middle == math.ceil((len(paths) - len(written)) / 10)


CHUNK = 64


def test_interactive_tasks_are_served_while_a_bulk_backlog_is_in_hand(
    private, gated_worker: WorkerProcess, served_dir: Path
) -> None:
    """One bulk slot, two task threads: with three 64-image chunks queued, the worker holds one
    chunk and keeps a thread for interactive work; single tasks are received and scored before
    the first chunk is done. Without the cap both threads would hold chunks and the first
    interactive task would not be received until a chunk finished."""
    from shared.task_names import BULK_QUEUE

    url, _ = private
    app = app_for(url)
    paths = _tree(served_dir / "backfill-priority", 3 * CHUNK + 2, size=(64, 48))
    start = len(gated_worker.log())
    bulk = [app.send_task("realscore.score_many", args=[paths[i : i + CHUNK]], queue=BULK_QUEUE)
            for i in range(0, 3 * CHUNK, CHUNK)]
    wait_until(lambda: "lanes=B" in gated_worker.log()[start:], 60, "bulk forward passes")
    for path in paths[-2:]:
        assert app.send_task("realscore.score", args=[path]).get(timeout=60)["ok"]
    for handle in bulk:
        assert len(handle.get(timeout=TIMEOUT)) == CHUNK
    del bulk, handle
    gc.collect()  # results bound to the private Redis let go of it while it still answers

    events = re.findall(
        r"forward lanes=([IB]+)|Task (realscore\.score(?:_many)?)\[[0-9a-f-]+\] (received|succeeded)",
        gated_worker.log()[start:],
    )
    first_chunk_done = next(i for i, e in enumerate(events) if e[1:] == ("realscore.score_many", "succeeded"))
    interactive = [i for i, e in enumerate(events) if e[1:] == ("realscore.score", "received")]
    with_i = [i for i, e in enumerate(events) if "I" in e[0]]
    assert len(interactive) == 2 and len(with_i) == 2
    assert max(interactive + with_i) < first_chunk_done, events
    chunks_received = [i for i, e in enumerate(events) if e[1:] == ("realscore.score_many", "received")]
    assert sum(1 for i in chunks_received if i < first_chunk_done) == 1  # one slot: one chunk in hand
    served = Counter(lane for e in events for lane in e[0])
    # More bulk passes only if a loaded machine took longer than the module's short visibility
    # timeout over a chunk, which Redis then handed out again.
    assert served["I"] == 2 and served["B"] >= 3 * CHUNK


def test_a_file_name_that_is_not_utf8_is_scored_and_resumed(
    realscore_env: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Legacy storage holds names in other encodings: os.fsdecode gives them lone surrogates,
    which neither SQLite nor a UTF-8 file takes as they are. They are scored, written (JSON
    escapes; a CSV cell keeps the name's bytes) and skipped by a rerun."""
    from shared.cli import main

    folder = tmp_path / "legacy"
    folder.mkdir()
    odd = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")  # Latin-1 "café"
    Path(odd).write_bytes(_png(1, (40, 32)))
    (folder / "plain.png").write_bytes(_png(2, (40, 32)))
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"rows.{fmt}"
        command = ["backfill", str(folder), "--out", str(out), "--format", fmt, "--in-process"]
        assert main(command) == 0, capsys.readouterr().err
        rows = _rows(out, fmt)
        assert sorted(row["uri"] for row in rows) == sorted([odd, str(folder / "plain.png")])
        assert all(row["ok"] for row in rows), rows
        if fmt == "jsonl":
            out.read_bytes().decode("utf-8")  # still valid UTF-8: the odd name is escaped
        else:
            assert b"caf\xe9.png" in out.read_bytes()
        capsys.readouterr()
        assert main([*command[:-1], "--dry-run"]) == 0
        assert "2 listed, 2 already done, 0 to score" in capsys.readouterr().err
