"""The backfill's parts at the unit level: the streamed listing, the SQLite resume state, the
output file (CSV parses back to the same rows) and the command's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.backfill_output import OutputFile, read_rows
from shared.backfill_state import BackfillState, StateMismatch, state_path
from shared.listing import ListingError, iter_local, parse_source

REPO = Path(__file__).resolve().parents[1]


def _row(uri: str, ok: bool = True) -> dict:
    return {
        "uri": uri, "ok": ok, "score": 0.25 if ok else None, "label": "real" if ok else None,
        "threshold": 0.0, "model": "m+head:abc", "sha256": "ab" * 32 if ok else None,
        "error": None if ok else {"code": "not_an_image", "message": 'says "no", then, a comma\nand a line'},
        "elapsed_ms": 12.5, "cached": False,
    }


def test_local_listing_is_recursive_filters_image_extensions_and_takes_a_glob(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.JPG", "a/y.png", "a/b/z.webp", "notes.txt", "a/b/raw.cr2"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlinked folder is not followed
    root = str(tmp_path)
    assert sorted(iter_local(root)) == sorted(str(tmp_path / n) for n in ("x.JPG", "a/y.png", "a/b/z.webp"))
    assert list(iter_local(root, "*.cr2")) == [str(tmp_path / "a/b/raw.cr2")]
    assert list(iter_local(root, "a/*.png")) == [str(tmp_path / "a/y.png")]


def test_sources_parse_and_refuse() -> None:
    source = parse_source("s3://media/uploads/2024/")
    assert (source.bucket, source.prefix) == ("media", "uploads/2024/")
    assert parse_source("s3://media").prefix == ""
    for bad in ("s3://", "http://x/y", "/no/such/folder"):
        with pytest.raises(ListingError):
            parse_source(bad)


def test_state_marks_each_uri_once_and_survives_reopening(tmp_path: Path) -> None:
    path = state_path(str(tmp_path / "out.jsonl"))
    state = BackfillState(path)
    state.bind(source="/data", format="jsonl")
    assert state.begin_rows([("a", "ok"), ("b", "not_found")]) == ["a", "b"]
    state.commit(100)
    assert state.begin_rows([("b", "ok"), ("c", "ok")]) == ["c"]  # b already has its row
    state.rollback()  # c's row never reached the output
    state.close()

    again = BackfillState(path)
    assert again.committed_bytes == 100
    assert again.done_among(["a", "b", "c", "d"]) == {"a", "b"}
    with pytest.raises(StateMismatch):
        again.bind(source="/other", format="jsonl")
    again.close()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_output_parses_back_to_the_rows_and_cuts_what_was_never_committed(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / f"out.{fmt}")
    rows = [_row("/d/a b,c.png"), _row("s3://bucket/día 1.jpg", ok=False), _row('/d/"q".png')]
    output = OutputFile(path, fmt, 0)  # type: ignore[arg-type]
    committed = output.append(rows[:2])
    output.append(rows[2:])  # written, but the state was never committed (a crash)
    output.close()
    assert list(read_rows(path, fmt)) == rows  # type: ignore[arg-type]

    OutputFile(path, fmt, committed).close()  # type: ignore[arg-type]
    assert list(read_rows(path, fmt)) == rows[:2]  # type: ignore[arg-type]


def _backfill(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "backfill", *args],
        env={**os.environ, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def test_the_command_refuses_a_chunk_timeout_within_the_visibility_timeout(tmp_path: Path) -> None:
    result = _backfill(str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--chunk-timeout", "30",
                       env={"REALSCORE_VISIBILITY_TIMEOUT": "60"})
    assert result.returncode == 2, result.stderr
    assert "visibility timeout" in result.stderr
    bad = _backfill(str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--chunk-size", "257")
    assert bad.returncode == 2 and "--chunk-size" in bad.stderr
    missing = _backfill(str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_an_output_without_its_state_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"uri": "x"}\n')
    result = _backfill(str(tmp_path), "--out", str(out), "--dry-run")
    assert result.returncode == 2 and "state file" in result.stderr


class _Handle:
    def __init__(self, rows: list[dict] | None) -> None:
        self.rows = rows
        self.abandoned = False

    def ready(self) -> bool:
        return self.rows is not None

    def get(self) -> list[dict]:
        assert self.rows is not None
        return self.rows

    def abandon(self) -> None:
        self.abandoned = True


class _Scorer:
    """Answers each chunk with error rows (``code``), never a score; ``lose`` chunks never answer."""

    def __init__(self, code: str, lose: int = 0) -> None:
        from shared.errors import ErrorCode
        from shared.results import ResultFactory

        self.factory, self.code, self.lose = ResultFactory("m"), ErrorCode(code), lose
        self.sent: list[list[str]] = []
        self.handles: list[_Handle] = []

    def send(self, uris: list[str]) -> _Handle:
        self.sent.append(list(uris))
        lost = len(self.sent) <= self.lose
        handle = _Handle(None if lost else [dict(self.factory.error(u, self.code, "x")) for u in uris])
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        pass


def _driver(tmp_path: Path, scorer: _Scorer, uris: list[str], **plan: float):
    from shared.backfill import Backfill, Plan
    from shared.backfill_progress import Progress

    state = BackfillState(str(tmp_path / "s.sqlite"))
    output = OutputFile(str(tmp_path / "o.jsonl"), "jsonl", 0)
    settings = {"chunk_size": 2, "max_in_flight": 2, "chunk_timeout": 60.0, "retries": 1, **plan}
    return Backfill(iter(uris), scorer, state, output, Plan(**settings), Progress(tty=False)), output


class _NoInterrupt:
    requested = False


def test_a_chunk_that_never_answers_is_sent_again_and_written_once(tmp_path: Path) -> None:
    scorer = _Scorer("not_found", lose=1)
    backfill, output = _driver(tmp_path, scorer, ["a", "b", "c"], chunk_timeout=0.2)
    backfill.run(_NoInterrupt())  # type: ignore[arg-type]
    output.close()
    assert scorer.handles[0].abandoned and scorer.sent[0] == ["a", "b"]
    assert sorted(scorer.sent[1:]) == [["a", "b"], ["c"]]
    assert sorted(row["uri"] for row in read_rows(str(tmp_path / "o.jsonl"), "jsonl")) == ["a", "b", "c"]


def test_source_unavailable_is_retried_then_stops_without_writing_rows(tmp_path: Path) -> None:
    from shared.backfill import SourceUnavailable

    scorer = _Scorer("source_unavailable")
    backfill, output = _driver(tmp_path, scorer, ["a", "b"], retries=1)
    with pytest.raises(SourceUnavailable, match="source_unavailable"):
        backfill.run(_NoInterrupt())  # type: ignore[arg-type]
    output.close()
    assert scorer.sent == [["a", "b"], ["a", "b"]]  # one retry, then the stop
    assert list(read_rows(str(tmp_path / "o.jsonl"), "jsonl")) == []  # a rerun scores them


class _FakeResult:
    """Stands in for a Celery AsyncResult; ``fail`` maps a method name to what it raises."""

    def __init__(self, rows: list[dict] | None = None, **fail: Exception) -> None:
        self.rows, self.fail = rows, fail
        self.called: list[str] = []

    def _call(self, name: str) -> None:
        self.called.append(name)
        if name in self.fail:
            raise self.fail[name]

    def ready(self) -> bool:
        self._call("ready")
        return True

    def get(self, timeout: float, propagate: bool) -> list[dict]:
        self._call("get")
        return list(self.rows or [])

    def forget(self) -> None:
        self._call("forget")

    def revoke(self) -> None:
        self._call("revoke")


def _gave_up() -> RuntimeError:
    """Celery's result consumer after its reconnects, chained from one of the backend's
    connection errors that is not a ConnectionError (KeyError is one of them)."""
    from celery.backends.asynchronous import E_RETRY_LIMIT_EXCEEDED

    try:
        raise KeyError("celery-task-meta-x")
    except KeyError as error:
        try:
            raise RuntimeError(E_RETRY_LIMIT_EXCEEDED) from error
        except RuntimeError as gave_up:
            return gave_up


@pytest.mark.parametrize("where", ["send-gave-up", "ready-gave-up", "ready-refused", "ready-bug"])
def test_a_lost_backend_ends_the_backfill_with_one_line_however_celery_says_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, where: str
) -> None:
    """Through the queue scorer (the client sends, the backfill polls the handles): Redis
    refusing, or Celery's bare RuntimeError after its reconnects, whether it comes out of sending
    a chunk or polling it, is a lost backend (exit 1, one line, the resume command); any other
    RuntimeError is a bug and keeps its traceback."""
    import types

    import redis

    from shared import backfill_command, client
    from shared.cli import EXIT_FAILURE, build_parser

    failure = {
        "send-gave-up": _gave_up(),
        "ready-gave-up": _gave_up(),
        "ready-refused": redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        "ready-bug": RuntimeError("dictionary changed size during iteration"),
    }[where]

    def send_task(*args: object, **options: object) -> _FakeResult:
        if where.startswith("send"):
            raise failure
        return _FakeResult(ready=failure)

    monkeypatch.setattr(client, "app", types.SimpleNamespace(send_task=send_task))
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(b"never read")
    args = build_parser().parse_args(
        ["backfill", str(source), "--out", str(tmp_path / "o.jsonl"), "--max-in-flight", "1"]
    )
    if where == "ready-bug":
        with pytest.raises(RuntimeError, match="dictionary changed size"):
            backfill_command.run(args)
        assert "lost the broker" not in capsys.readouterr().err
        return
    assert backfill_command.run(args) == EXIT_FAILURE
    err = capsys.readouterr().err
    lost = [line for line in err.splitlines() if "lost the broker" in line]
    assert len(lost) == 1, err
    assert lost[0].startswith(
        "realscore backfill: lost the broker or result backend: Redis (broker or result backend) is unreachable: "
    )
    assert "Retry limit" not in err and "resume with" in err


def test_polling_and_abandoning_a_queued_chunk_say_broker_unavailable_but_fetching_it_does_not() -> None:
    """ready() and abandon() end the backfill on an unreachable Redis, as sending does; get()'s
    failures are the chunk's (the driver retries it) and keep the backend's own error."""
    import redis
    from kombu.exceptions import OperationalError

    from shared import client
    from shared.backfill_scorers import _TaskHandle

    with pytest.raises(client.BrokerUnavailable):
        _TaskHandle(_FakeResult(ready=_gave_up())).ready()
    with pytest.raises(client.BrokerUnavailable):
        _TaskHandle(_FakeResult(revoke=OperationalError("Error 111 connecting"))).abandon()
    with pytest.raises(client.BrokerUnavailable):
        _TaskHandle(_FakeResult(forget=redis.ConnectionError("Error 111 connecting"))).abandon()
    refused = redis.ConnectionError("Error 111 connecting")
    with pytest.raises(redis.ConnectionError) as caught:
        _TaskHandle(_FakeResult(get=refused)).get()
    assert caught.value is refused


@pytest.mark.parametrize("retries", [1, 0])
def test_a_result_lost_with_the_backend_counts_as_a_failed_chunk(tmp_path: Path, retries: int) -> None:
    """The chunk came back (ready) but fetching its rows lost the backend: the chunk failed, its
    images are retried (or, with no retries left, written with the error as the backend said
    it); the backfill goes on."""
    import redis

    from shared.backfill_scorers import _TaskHandle

    class LosesFirstResult(_Scorer):
        def send(self, uris: list[str]):  # type: ignore[override]
            handle = super().send(uris)
            if len(self.sent) > 1:
                return handle
            refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return _TaskHandle(_FakeResult(get=refused, forget=refused))

    scorer = LosesFirstResult("not_found")
    backfill, output = _driver(tmp_path, scorer, ["a", "b"], retries=retries)
    backfill.run(_NoInterrupt())  # type: ignore[arg-type]
    output.close()
    rows = sorted(read_rows(str(tmp_path / "o.jsonl"), "jsonl"), key=lambda row: row["uri"])
    assert [row["uri"] for row in rows] == ["a", "b"]
    if retries:
        assert scorer.sent == [["a", "b"], ["a", "b"]]
        assert backfill.progress.retried == 2
        assert [row["error"]["code"] for row in rows] == ["not_found", "not_found"]
    else:
        assert scorer.sent == [["a", "b"]]
        assert backfill.progress.retried == 0
        assert all(row["error"]["code"] == "internal" for row in rows)
        assert all(row["error"]["message"].startswith("the chunk failed: ConnectionError: Error 111") for row in rows)


def test_a_broker_lost_while_sending_is_reported_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """shared.client turns an unreachable Redis into BrokerUnavailable (a ConnectionError, not a
    kombu or redis error): sending a chunk then ends the backfill with one line and exit 1."""
    from shared import backfill_command, client
    from shared.cli import EXIT_FAILURE, build_parser

    class Unreachable(_Scorer):
        def send(self, uris: list[str]) -> _Handle:
            raise client.BrokerUnavailable("Redis (broker or result backend) is unreachable: refused")

    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(b"never read")
    monkeypatch.setattr(backfill_command, "_scorer", lambda args: Unreachable("not_found"))
    args = build_parser().parse_args(
        ["backfill", str(source), "--out", str(tmp_path / "o.jsonl"), "--in-process", "--max-in-flight", "1"]
    )
    assert backfill_command.run(args) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "lost the broker or result backend: Redis (broker or result backend) is unreachable" in err
    assert "resume with" in err
