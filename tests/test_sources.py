"""URI parsing and the local-file policy of ``worker.serving.sources`` (S3 is in test_s3.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import ErrorCode, ScoringError
from worker.serving.sources import LocalRef, S3Ref, Sources, parse_uri


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("/data/a.jpg", LocalRef("/data/a.jpg")),
        ("file:///data/a%20b.jpg", LocalRef("/data/a b.jpg")),
        ("file://localhost/data/a.jpg", LocalRef("/data/a.jpg")),
        ("/data/\udcff.jpg", LocalRef("/data/\udcff.jpg")),  # os.fsdecode of a non-UTF-8 name
        ("s3://bucket/key/with/slashes.jpg", S3Ref("bucket", "key/with/slashes.jpg")),
    ],
)
def test_valid_uris(uri: str, parsed: object) -> None:
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("", ErrorCode.BAD_URI),
        (None, ErrorCode.BAD_URI),
        (42, ErrorCode.BAD_URI),
        ("relative/path.jpg", ErrorCode.BAD_URI),
        ("s3://bucket-only", ErrorCode.BAD_URI),
        ("s3://bucket/", ErrorCode.BAD_URI),
        ("file://otherhost/etc/passwd", ErrorCode.BAD_URI),
        ("/data/a\x00.jpg", ErrorCode.BAD_URI),
        # os.open raises ValueError, not OSError, on these: they were `internal`
        ("file:///data/a%00.jpg", ErrorCode.BAD_URI),
        ("/data/\ud800.jpg", ErrorCode.BAD_URI),
        ("file:///data/\ud800.jpg", ErrorCode.BAD_URI),
        ("s3://bucket/key\ud800.jpg", ErrorCode.BAD_URI),  # botocore's encode raised
        ("http://169.254.169.254/latest/meta-data", ErrorCode.UNSUPPORTED_SCHEME),
        ("https://example.com/a.jpg", ErrorCode.UNSUPPORTED_SCHEME),
        ("gs://bucket/key", ErrorCode.UNSUPPORTED_SCHEME),
    ],
)
def test_invalid_uris(uri: object, code: ErrorCode) -> None:
    with pytest.raises(ScoringError) as caught:
        parse_uri(uri)
    assert caught.value.code == code


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.bin").write_bytes(b"x" * 100)
    (outside / "secret.bin").write_bytes(b"s" * 10)
    (root / "escape").symlink_to(outside / "secret.bin")
    (root / "inside-link").symlink_to(root / "ok.bin")
    (root / "sub").mkdir()
    return {"root": root, "outside": outside}


def _code(sources: Sources, uri: str) -> ErrorCode:
    with pytest.raises(ScoringError) as caught:
        sources.fetch(uri)
    return caught.value.code


def test_local_roots_policy(tree: dict[str, Path]) -> None:
    root = tree["root"]
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    assert sources.fetch(str(root / "ok.bin")) == b"x" * 100
    assert sources.fetch(f"file://{root}/ok.bin") == b"x" * 100
    assert sources.fetch(str(root / "inside-link")) == b"x" * 100  # a link that stays inside
    assert _code(sources, str(root / "escape")) == ErrorCode.FORBIDDEN_PATH  # symlink out
    assert _code(sources, f"{root}/../outside/secret.bin") == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, str(tree["outside"] / "secret.bin")) == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, str(root / "missing.jpg")) == ErrorCode.NOT_FOUND
    assert _code(sources, str(root / "sub")) == ErrorCode.NOT_FOUND
    assert _code(sources, str(root / "ok.bin" / "child")) == ErrorCode.NOT_FOUND


def test_root_prefix_is_not_enough(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media-private").mkdir()
    (tmp_path / "media-private" / "a.bin").write_bytes(b"a")
    sources = Sources(local_roots=[tmp_path / "media"], max_bytes=10, timeout=5)
    assert _code(sources, str(tmp_path / "media-private" / "a.bin")) == ErrorCode.FORBIDDEN_PATH


def test_empty_roots_refuse_local_files_and_say_which_setting(tree: dict[str, Path]) -> None:
    sources = Sources(local_roots=[], max_bytes=1000, timeout=5)
    with pytest.raises(ScoringError) as caught:
        sources.fetch(str(tree["root"] / "ok.bin"))
    assert caught.value.code == ErrorCode.FORBIDDEN_PATH
    assert "REALSCORE_LOCAL_ROOTS" in caught.value.message


def test_a_missing_file_outside_the_roots_is_forbidden_not_missing(tree: dict[str, Path]) -> None:
    """Whether a file exists outside the roots is none of the caller's business."""
    sources = Sources(local_roots=[tree["root"]], max_bytes=1000, timeout=5)
    assert _code(sources, str(tree["outside"] / "missing.jpg")) == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, f"{tree['root']}/../outside/missing.jpg") == ErrorCode.FORBIDDEN_PATH


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_local_fetch_checks_the_opened_file_without_resolving_names(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-image path: no Python resolution of the name, the policy still holds."""
    sources = Sources(local_roots=[tree["root"]], max_bytes=1000, timeout=5)

    def no_resolve(self: Path, strict: bool = False) -> Path:
        raise AssertionError(f"resolved {self} by name")

    monkeypatch.setattr(Path, "resolve", no_resolve)
    assert sources.fetch(str(tree["root"] / "ok.bin")) == b"x" * 100
    assert sources.fetch(str(tree["root"] / "inside-link")) == b"x" * 100
    assert sources.fetch(f"{tree['root']}/sub/../ok.bin") == b"x" * 100
    assert _code(sources, str(tree["root"] / "escape")) == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, str(tree["outside"] / "secret.bin")) == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, str(tree["root"] / "sub")) == ErrorCode.NOT_FOUND


def test_embedded_mode_trusts_every_path(tree: dict[str, Path]) -> None:
    sources = Sources(local_roots=None, max_bytes=1000, timeout=5)
    assert sources.fetch(str(tree["outside"] / "secret.bin")) == b"s" * 10


def test_size_limit(tree: dict[str, Path]) -> None:
    sources = Sources(local_roots=[tree["root"]], max_bytes=99, timeout=5)
    with pytest.raises(ScoringError) as caught:
        sources.fetch(str(tree["root"] / "ok.bin"))
    assert caught.value.code == ErrorCode.TOO_LARGE
    assert "REALSCORE_MAX_IMAGE_BYTES" in caught.value.message


def test_special_files_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    sources = Sources(local_roots=[tmp_path], max_bytes=1 << 20, timeout=10)
    assert _code(sources, str(fifo)) == ErrorCode.NOT_FOUND


def test_read_loop_caps_a_stream_that_declares_no_size() -> None:
    import io
    import time

    from worker.serving.sources import _read_capped

    with pytest.raises(ScoringError) as caught:
        _read_capped(io.BytesIO(b"z" * (3 << 20)), 1 << 20, time.monotonic() + 10, "stream")
    assert caught.value.code == ErrorCode.TOO_LARGE


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_access_denied(tree: dict[str, Path]) -> None:
    path = tree["root"] / "locked.bin"
    path.write_bytes(b"l")
    path.chmod(0)
    sources = Sources(local_roots=[tree["root"]], max_bytes=10, timeout=5)
    assert _code(sources, str(path)) == ErrorCode.ACCESS_DENIED


@pytest.mark.parametrize("timeout", [3.0, 30.0, 120.0])
def test_s3_retries_fit_inside_the_fetch_deadline(timeout: float) -> None:
    sources = Sources(local_roots=[], max_bytes=1, timeout=timeout, s3_endpoint_url="http://127.0.0.1:9")
    config = sources.s3.meta.config
    attempts = config.retries["total_max_attempts"]
    assert (config.connect_timeout + config.read_timeout) * attempts <= timeout
    assert config.read_timeout <= 5.0  # a stalled read overruns the deadline by at most this


def test_symlink_loop_is_not_found_not_internal(tree: dict[str, Path]) -> None:
    root = tree["root"]
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    for roots in ([root], None):  # resolve() raises on the policy path; open() without roots
        sources = Sources(local_roots=roots, max_bytes=1000, timeout=5)
        with pytest.raises(ScoringError) as caught:
            sources.fetch(str(root / "loop-a"))
        assert caught.value.code == ErrorCode.NOT_FOUND
        assert "symlink loop" in caught.value.message


def test_name_too_long_is_bad_uri_with_a_short_message(tree: dict[str, Path]) -> None:
    path = str(tree["root"] / ("x" * 5000))
    for roots in ([tree["root"]], None):
        sources = Sources(local_roots=roots, max_bytes=1000, timeout=5)
        with pytest.raises(ScoringError) as caught:
            sources.fetch(path)
        assert caught.value.code == ErrorCode.BAD_URI
        assert "too long" in caught.value.message
        assert len(caught.value.message) < 500


def test_other_os_errors_from_resolve_or_open_are_not_internal(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import worker.serving.sources as sources_module

    def failing_open(path: str, flags: int) -> int:
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(sources_module, "_open_nonblocking", failing_open)
    sources = Sources(local_roots=[tree["root"]], max_bytes=1000, timeout=5)
    with pytest.raises(ScoringError) as caught:
        sources.fetch(str(tree["root"] / "ok.bin"))
    assert caught.value.code == ErrorCode.NOT_FOUND
    assert "Input/output error" in caught.value.message

    def failing_resolve(self: Path, strict: bool = False) -> Path:
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", str(self))

    monkeypatch.setattr(Path, "resolve", failing_resolve)  # Python 3.13 raises ELOOP here
    # Only the name-based check (no O_PATH, no /proc/self/fd) resolves a path in Python.
    monkeypatch.setattr(sources_module, "_O_PATH", 0)
    monkeypatch.setattr(sources_module, "_opened_path", lambda fd: None)
    with pytest.raises(ScoringError) as caught:
        sources.fetch(str(tree["root"] / "ok.bin"))
    assert caught.value.code == ErrorCode.NOT_FOUND
    assert "symlink loop" in caught.value.message


@pytest.mark.parametrize("uri", ["s3://a b/k", "s3://bad!name/k"])
def test_invalid_bucket_name_is_bad_uri_before_any_request(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Port 9 (discard) would refuse a connection: botocore must reject the name before sending.
    sources = Sources(local_roots=[], max_bytes=10, timeout=3, s3_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ScoringError) as caught:
        sources.fetch(uri)
    assert caught.value.code == ErrorCode.BAD_URI
    assert "bucket name" in caught.value.message


def _swap_after_check(
    sources: Sources, monkeypatch: pytest.MonkeyPatch, directory: Path, target: Path
) -> None:
    """Replace ``directory`` by a symlink to ``target`` at the last moment before the file is
    opened: after the policy check by name (no ``/proc``), or just before the kernel walks the
    name (``/proc``: the check is on the opened file, there is no check before it to race)."""
    import worker.serving.sources as sources_module

    checked, open_path = sources.check_local_path, sources_module._open_path
    swapped: list[bool] = []

    def swap() -> None:
        if not swapped:
            swapped.append(True)
            directory.rename(directory.with_name(directory.name + "-moved"))
            directory.symlink_to(target, target_is_directory=True)

    def check_then_swap(path: str) -> Path:
        resolved = checked(path)
        swap()
        return resolved

    def swap_then_open(path: str) -> int:
        swap()
        return open_path(path)

    monkeypatch.setattr(sources, "check_local_path", check_then_swap)
    monkeypatch.setattr(sources_module, "_open_path", swap_then_open)


@pytest.mark.parametrize("proc", [True, False], ids=["proc-fd", "no-proc"])
def test_directory_swapped_for_a_symlink_after_the_check_is_refused(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    import worker.serving.sources as sources_module

    root, outside = tree["root"], tree["outside"]
    (root / "album").mkdir()
    (root / "album" / "secret.bin").write_bytes(b"inside")  # same name as the file outside
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    if not proc:  # a platform without /proc has no O_PATH either: the name-based check
        monkeypatch.setattr(sources_module, "_O_PATH", 0)
        monkeypatch.setattr(sources_module, "_opened_path", lambda fd: None)
    _swap_after_check(sources, monkeypatch, root / "album", outside)
    with pytest.raises(ScoringError) as caught:
        sources.fetch(str(root / "album" / "secret.bin"))  # open() now follows album -> outside
    assert caught.value.code == ErrorCode.FORBIDDEN_PATH
    assert "REALSCORE_LOCAL_ROOTS" in caught.value.message


def test_swap_that_stays_inside_the_roots_is_still_served(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree["root"]
    (root / "album").mkdir()
    (root / "album" / "ok.bin").write_bytes(b"old")
    (root / "other").mkdir()
    (root / "other" / "ok.bin").write_bytes(b"new")
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    _swap_after_check(sources, monkeypatch, root / "album", root / "other")
    assert sources.fetch(str(root / "album" / "ok.bin")) == b"new"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_opened_path_is_the_kernels_name(tree: dict[str, Path]) -> None:
    from worker.serving.sources import _opened_path

    with open(tree["root"] / "inside-link", "rb") as handle:  # a symlink to ok.bin
        assert _opened_path(handle.fileno()) == str((tree["root"] / "ok.bin").resolve())


def test_bucket_outside_s3_buckets_is_forbidden_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sources = Sources(
        local_roots=[], max_bytes=10, timeout=3, s3_endpoint_url="http://127.0.0.1:9",
        s3_buckets=["media", "uploads"],
    )

    def no_client() -> None:
        raise AssertionError("a refused bucket must not reach S3")

    monkeypatch.setattr(sources, "_make_s3_client", no_client)
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://private-backups/db.jpg")
    assert caught.value.code == ErrorCode.FORBIDDEN_PATH
    assert "REALSCORE_S3_BUCKETS" in caught.value.message
    assert "private-backups" in caught.value.message


@pytest.mark.parametrize(
    ("buckets", "served"),
    [(None, True), (["*"], True), ([], False), (["media"], False)],
    ids=["embedded-trusts-all", "star", "empty-fails-closed", "listed-only"],
)
def test_s3_bucket_policy(
    buckets: list[str] | None, served: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeS3:
        def get_object(self, *, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's names
            import io

            return {"Body": io.BytesIO(b"img"), "ContentLength": 3}

    sources = Sources(local_roots=[], max_bytes=10, timeout=3, s3_buckets=buckets)
    monkeypatch.setattr(sources, "_make_s3_client", FakeS3)
    if served:
        assert sources.fetch("s3://any-bucket/a.jpg") == b"img"
        return
    with pytest.raises(ScoringError) as caught:
        sources.fetch("s3://any-bucket/a.jpg")
    assert caught.value.code == ErrorCode.FORBIDDEN_PATH
    assert "REALSCORE_S3_BUCKETS" in caught.value.message


def test_s3_buckets_setting_reaches_the_service_sources(
    monkeypatch: pytest.MonkeyPatch, loaded_model
) -> None:
    from shared.settings import load_settings
    from worker.serving.service import ScoringService

    monkeypatch.setenv("REALSCORE_S3_BUCKETS", '["media", "uploads"]')
    settings = load_settings()
    assert settings.s3_buckets == ["media", "uploads"]
    service = ScoringService(loaded_model, settings)  # not started: no threads to stop
    assert service.sources.s3_buckets == {"media", "uploads"}
    monkeypatch.delenv("REALSCORE_S3_BUCKETS")
    assert load_settings().s3_buckets == []  # the default: no bucket (fail closed)
    embedded = ScoringService(loaded_model, load_settings(), local_roots=None)
    assert embedded.sources.s3_buckets is None  # the embedded CLI trusts its own user


def test_s3_endpoint_that_never_answers_is_a_fetch_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real socket that accepts and then says nothing: the deadline, not botocore, decides."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    sources = Sources(local_roots=[], max_bytes=1 << 20, timeout=1.2, s3_endpoint_url=endpoint)
    started = time.monotonic()
    try:
        with pytest.raises(ScoringError) as caught:
            sources.fetch("s3://bucket/stalled.jpg")
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        listener.close()
    assert caught.value.code == ErrorCode.FETCH_TIMEOUT
    assert accepted  # it really reached the silent server
    assert time.monotonic() - started < 1.2 + 1.0  # the deadline plus at most one socket timeout


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_the_checked_descriptor_is_what_is_read_not_the_name_again(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is reopened through /proc/self/fd/N of the checked O_PATH descriptor: a name
    swapped for a link out of the roots after the check still reads the checked file."""
    import worker.serving.sources as sources_module

    root, outside = tree["root"], tree["outside"]
    (root / "photo.bin").write_bytes(b"checked")
    opened_path = sources_module._opened_path

    def check_then_swap(fd: int) -> str | None:
        answer = opened_path(fd)
        (root / "photo.bin").unlink()
        (root / "photo.bin").symlink_to(outside / "secret.bin")
        return answer

    monkeypatch.setattr(sources_module, "_opened_path", check_then_swap)
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    assert sources.fetch(str(root / "photo.bin")) == b"checked"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
@pytest.mark.parametrize("proc", [True, False], ids=["proc-fd", "no-proc"])
def test_no_descriptor_is_left_open_on_any_outcome(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    import socket

    import worker.serving.sources as sources_module

    root = tree["root"]
    os.mkfifo(root / "fifo")
    (root / "big.bin").write_bytes(b"b" * 2000)
    (root / "loop").symlink_to(root / "loop")
    (root / "to-dev").symlink_to("/dev/zero")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock"))
    if not proc:
        monkeypatch.setattr(sources_module, "_opened_path", lambda fd: None)
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    names = ["ok.bin", "big.bin", "fifo", "sock", "sub", "escape", "loop", "to-dev", "missing",
             "ok.bin/child", "../outside/secret.bin", "inside-link"]
    rounds = 20

    def outcomes() -> list[object]:
        seen: list[object] = []
        for name in names:
            try:
                seen.append(len(sources.fetch(f"{root}/{name}")))
            except ScoringError as error:
                seen.append(error.code)
        return seen

    first = outcomes()  # helper threads started, modules imported
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(rounds):
        assert outcomes() == first
    # one descriptor left per fetch would be rounds * len(names); allow a stray few
    assert len(os.listdir("/proc/self/fd")) - before < rounds
    listener.close()
    assert first == [100, ErrorCode.TOO_LARGE, ErrorCode.NOT_FOUND, ErrorCode.NOT_FOUND,
                     ErrorCode.NOT_FOUND, ErrorCode.FORBIDDEN_PATH, ErrorCode.NOT_FOUND,
                     ErrorCode.FORBIDDEN_PATH, ErrorCode.NOT_FOUND, ErrorCode.NOT_FOUND,
                     ErrorCode.FORBIDDEN_PATH, 100]


@pytest.mark.parametrize("error", ["loop", "EACCES"])
def test_a_path_outside_the_roots_is_forbidden_whatever_resolving_it_says(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """A missing file outside the roots was forbidden_path but a symlink loop there not_found,
    and one under a directory we may not search access_denied: an oracle for what exists
    outside the roots. Inside them, the resolve error still says what is wrong."""
    import errno

    root, outside = tree["root"], tree["outside"]
    if error == "loop":
        (outside / "loop").symlink_to(outside / "loop")
        (root / "loop").symlink_to(root / "loop")
    else:
        resolve = Path.resolve

        def denied(self: Path, strict: bool = False) -> Path:
            if self.name == "loop":
                raise OSError(errno.EACCES, "Permission denied", str(self))
            return resolve(self, strict)

        monkeypatch.setattr(Path, "resolve", denied)
    sources = Sources(local_roots=[root], max_bytes=1000, timeout=5)
    assert _code(sources, str(outside / "loop")) == ErrorCode.FORBIDDEN_PATH
    assert _code(sources, str(outside / "missing")) == ErrorCode.FORBIDDEN_PATH
    (root / "via").symlink_to(outside)  # inside by name, outside once the link is followed
    assert _code(sources, str(root / "via" / "loop")) == ErrorCode.FORBIDDEN_PATH
    inside = ErrorCode.NOT_FOUND if error == "loop" else ErrorCode.ACCESS_DENIED
    if error == "EACCES":  # only the name-based check resolves in Python
        import worker.serving.sources as sources_module

        monkeypatch.setattr(sources_module, "_O_PATH", 0)
    assert _code(sources, str(root / "loop")) == inside
