"""``realscore.score_many`` with good images and every error code a local file, URI or payload can
produce (S3's codes are in test_s3.py), through the real worker; and the fetch limits of
``worker.serving.sources`` that need a slow or endless source, at the unit level."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from shared import client
from shared.errors import ErrorCode, ScoringError
from shared.task_names import MAX_URIS_PER_TASK, SCORE, SCORE_MANY
from tests.images import png_bomb
from tests.tiny_clip import noise_image

TIMEOUT = 60


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, (320, 240)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cases(served_dir: Path, tmp_path_factory: pytest.TempPathFactory, worker_env: dict):
    """``(uri, expected code or None for a good image)`` in the order they are sent."""
    folder = served_dir / "many"
    folder.mkdir(exist_ok=True)
    outside = tmp_path_factory.mktemp("outside")
    noise_image(7, (100, 90)).save(outside / "secret.png")  # a good image, but not served

    noise_image(1, (200, 150)).save(folder / "good1.png")
    (folder / "good2.jpg").write_bytes(jpeg_bytes(2))
    noise_image(3, (64, 300)).save(folder / "good3.webp")
    (folder / "alias.png").symlink_to(folder / "good1.png")  # a symlink that stays inside: fine
    (folder / "escape.png").symlink_to(outside / "secret.png")
    (folder / "notes.txt").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_bomb(30_000, 30_000))  # Pillow's own bomb check
    (folder / "big.png").write_bytes(png_bomb(9_000, 9_000))  # over our 64 Mpx, under Pillow's
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(4)[:3000])
    limit = int(worker_env.get("REALSCORE_MAX_IMAGE_BYTES", 50 << 20))
    with open(folder / "huge.png", "wb") as handle:
        handle.truncate(limit + 1)  # sparse: costs no disk
    (folder / "subdir").mkdir(exist_ok=True)

    return [
        (str(folder / "good1.png"), None),
        ("relative/path.png", "bad_uri"),
        ("", "bad_uri"),
        ("s3://bucket-without-key", "bad_uri"),
        ("file://otherhost/img.png", "bad_uri"),
        (f"file://{folder / 'good2.jpg'}", None),
        ("http://example.com/a.jpg", "unsupported_scheme"),
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        (str(outside / "secret.png"), "forbidden_path"),
        ("/etc/hostname", "forbidden_path"),
        (str(folder / "escape.png"), "forbidden_path"),  # symlink out of the root
        (f"{served_dir}/../{outside.name}/secret.png", "forbidden_path"),  # `..` out of the root
        (f"file://{folder}/../../{outside.name}/secret.png", "forbidden_path"),
        (str(folder / "alias.png"), None),
        (str(folder / "missing.png"), "not_found"),
        (f"file://{folder / 'missing.jpg'}", "not_found"),
        (str(folder / "subdir"), "not_found"),
        (str(folder / "huge.png"), "too_large"),
        (str(folder / "bomb.png"), "too_many_pixels"),
        (str(folder / "big.png"), "too_many_pixels"),
        (str(folder / "notes.txt"), "not_an_image"),
        (str(folder / "empty.png"), "not_an_image"),
        (str(folder / "truncated.jpg"), "corrupt_image"),
        (123, "bad_request"),
        (None, "bad_request"),
        (["nested"], "bad_request"),
        (str(folder / "good3.webp"), None),
    ]


@pytest.mark.integration
def test_every_local_error_code_in_one_task_with_the_good_images_scored(worker, cases) -> None:
    uris = [uri for uri, _ in cases]
    handle = client.app.send_task(SCORE_MANY, args=[uris])  # raw: the client takes strings only
    results = handle.get(timeout=TIMEOUT)

    assert len(results) == len(cases)
    for (uri, code), result in zip(cases, results):
        expected_uri = uri if isinstance(uri, str) else repr(uri)
        assert result["uri"] == expected_uri, "results out of order"
        if code is None:
            assert result["ok"] is True, result
            assert result["error"] is None
            assert -1.0 <= result["score"] <= 1.0
            assert result["label"] in ("real", "ai")
            assert len(result["sha256"]) == 64
        else:
            assert result["ok"] is False, result
            assert result["error"]["code"] == code, (uri, result["error"])
            assert result["error"]["message"]
            assert result["score"] is None and result["label"] is None
    # The symlink inside the root is the same image as its target.
    by_uri = {r["uri"]: r for r in results}
    folder = Path(cases[0][0]).parent
    assert by_uri[str(folder / "alias.png")]["score"] == pytest.approx(
        by_uri[str(folder / "good1.png")]["score"], abs=1e-6
    )
    # source_unavailable is about S3's configuration (tests/test_security.py covers it);
    # out_of_memory has its own tests (test_decode_memory.py, test_modes.py).
    not_local = {"access_denied", "fetch_timeout", "internal", "source_unavailable", "out_of_memory"}
    expected_codes = {code.value for code in ErrorCode} - not_local
    assert {code for _, code in cases if code} == expected_codes


@pytest.mark.integration
def test_a_fifo_inside_the_root_does_not_hang_the_worker(worker, served_dir: Path) -> None:
    fifo = served_dir / "many-fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    result = client.score(str(fifo), timeout=TIMEOUT)
    assert result["ok"] is False
    assert result["error"]["code"] == "not_found"


@pytest.mark.integration
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["/x.png"] * (MAX_URIS_PER_TASK + 1), id="too-many-uris"),
        pytest.param("/a/single/string.png", id="a-string"),
        pytest.param({"uri": "/x.png"}, id="a-dict"),
        pytest.param(None, id="none"),
    ],
)
def test_malformed_score_many_payloads_are_bad_request_results(worker, args) -> None:
    results = client.app.send_task(SCORE_MANY, args=[args]).get(timeout=TIMEOUT)
    expected = len(args) if isinstance(args, list) else 1
    assert isinstance(results, list) and len(results) == expected
    assert all(r["ok"] is False and r["error"]["code"] == "bad_request" for r in results), results[:2]


@pytest.mark.integration
def test_malformed_score_payloads_are_bad_request_results(worker, served_dir: Path) -> None:
    sends = [
        client.app.send_task(SCORE, args=[42]),
        client.app.send_task(SCORE, args=[["/a.png"]]),
        client.app.send_task(SCORE, args=["/a.png", "/b.png"]),
        client.app.send_task(SCORE, args=[], kwargs={"url": "/a.png"}),
        client.app.send_task(SCORE_MANY, args=[["/a.png"], "extra"]),
    ]
    for handle in sends:
        value = handle.get(timeout=TIMEOUT)
        first = value[0] if isinstance(value, list) else value
        assert first["ok"] is False
        assert first["error"]["code"] == "bad_request", first


# Unit level: limits that need a slow, endless or huge source -------------------------------------


class FakeClock:
    """``time.monotonic`` for ``worker.serving.sources`` that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _sources(root: Path, **overrides):
    from worker.serving.sources import Sources

    options = dict(local_roots=[root], max_bytes=1 << 20, timeout=30.0)
    options.update(overrides)
    return Sources(**options)


def test_fetch_timeout_is_one_deadline_over_the_whole_read_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.serving.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)
    monkeypatch.setattr(sources.time, "monotonic", FakeClock())
    path = tmp_path / "slow.bin"
    path.write_bytes(b"x" * 1000)  # ten chunks: each read costs a (fake) second
    with pytest.raises(ScoringError) as caught:
        _sources(tmp_path, timeout=4.5).fetch(str(path))
    assert caught.value.code is ErrorCode.FETCH_TIMEOUT
    # The same file with a deadline longer than the reads is read whole.
    assert _sources(tmp_path, timeout=60).fetch(str(path)) == b"x" * 1000


def test_fetch_timeout_on_a_stream_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that keeps trickling (an S3 body, a socket) is cut at the deadline, not at EOF."""
    import worker.serving.sources as sources

    clock = FakeClock()
    monkeypatch.setattr(sources.time, "monotonic", clock)

    class Trickle(io.RawIOBase):
        reads = 0

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            return b"z" * 10

    stream = Trickle()
    deadline = clock.now + 5
    with pytest.raises(ScoringError) as caught:
        sources._read_capped(stream, max_bytes=1 << 30, deadline=deadline, what="stream")
    assert caught.value.code is ErrorCode.FETCH_TIMEOUT
    assert stream.reads <= 5


def test_too_large_is_found_while_reading_not_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body without a trustworthy length is cut one chunk past the cap, never read whole."""
    import worker.serving.sources as sources

    class Endless(io.RawIOBase):
        reads = 0

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            return b"\0" * size

    stream = Endless()
    with pytest.raises(ScoringError) as caught:
        sources._read_capped(stream, max_bytes=3 * sources.CHUNK_BYTES, deadline=float("inf"), what="x")
    assert caught.value.code is ErrorCode.TOO_LARGE
    assert stream.reads == 4


def test_too_large_local_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    with open(path, "wb") as handle:
        handle.truncate(10 << 30)  # 10 GB, sparse
    with pytest.raises(ScoringError) as caught:
        _sources(tmp_path, max_bytes=1000).fetch(str(path))
    assert caught.value.code is ErrorCode.TOO_LARGE
    exact = tmp_path / "exact.jpg"
    exact.write_bytes(b"a" * 1000)
    assert _sources(tmp_path, max_bytes=1000).fetch(str(exact)) == b"a" * 1000


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it must not hold a thread."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def fetch() -> None:
        try:
            outcome.append(_sources(tmp_path).fetch(str(fifo)))
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome.append(error)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock the stuck open() so the thread can end
        with open(fifo, "wb"):
            pass
        pytest.fail("fetching a FIFO blocked")
    assert isinstance(outcome[0], ScoringError) and outcome[0].code is ErrorCode.NOT_FOUND
