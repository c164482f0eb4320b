"""Fuzzing the real fetch -> decode -> preprocess -> score path with hypothesis.

Seeds are small valid files of every format we decode (PNG, APNG, JPEG with EXIF, GIF animated,
WebP animated, TIFF multi-page, 16-bit, CMYK, palette with transparency, BMP) plus hostile ones
(huge declared dimensions in tiny files, EXIF orientation bombs). Hypothesis mutates them
(truncation, bit flips, header only, spliced or repeated bytes), writes each under a name whose
extension may lie, and scores it through :class:`ScoringService` on the tiny CLIP, from a local
root, exactly as a worker would. Every input must end in a score or a stable error code other
than ``internal``, within the task deadline, with bounded memory.

CI runs a fixed, derandomised budget (``REALSCORE_TEST_FUZZ_EXAMPLES``, default 200). A longer,
random run:

    REALSCORE_TEST_FUZZ_EXAMPLES=5000 REALSCORE_TEST_FUZZ_RANDOM=1 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import io
import os
import resource
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.errors import ErrorCode
from tests.images import png_bomb

EXAMPLES = int(os.environ.get("REALSCORE_TEST_FUZZ_EXAMPLES", "200"))
RANDOM = os.environ.get("REALSCORE_TEST_FUZZ_RANDOM", "") not in ("", "0")
TASK_DEADLINE_S = 60.0  # per image; generous: a hang, not a slow machine, is what it catches
MAX_PIXELS = 4_000_000
MAX_BYTES = 4 << 20
# Peak RSS may grow by at most this over the whole run. One image at the pixel cap costs well
# under 100 MB; a decode that ignored the cap (a 65535 x 65535 header) would need gigabytes.
RSS_GROWTH_LIMIT = 1 << 30
CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value}
EXTENSIONS = [".png", ".jpg", ".gif", ".webp", ".tif", ".bmp", ".txt", ""]


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 0)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gif_huge_screen() -> bytes:
    """A 1x1 GIF frame on a declared 65535x65535 logical screen."""
    small = _save(Image.new("P", (1, 1)), "GIF")
    return small[:6] + struct.pack("<HH", 65535, 65535) + small[10:]


def _exif_bomb() -> bytes:
    """A JPEG whose EXIF has an invalid orientation and thousands of IFD entries."""
    exif = Image.Exif()
    exif[0x0112] = 9  # orientation outside 1..8
    for tag in range(0x9000, 0x9000 + 3000):
        exif[tag] = 1
    return _save(_noise(5, (32, 24)), "JPEG", exif=exif.tobytes())


def _seeds() -> dict[str, bytes]:
    rgb = _noise(1, (48, 40))
    frames = [_noise(i, (40, 32)) for i in range(3)]
    rotated = Image.Exif()
    rotated[0x0112] = 6
    grey16 = Image.fromarray((np.arange(40 * 32, dtype=np.uint16).reshape(32, 40) * 50))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "png": _save(rgb, "PNG"),
        "rgba.png": _save(_noise(2, (40, 40), "RGBA"), "PNG"),
        "grey16.png": _save(grey16, "PNG"),
        "apng": _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        "jpeg-exif": _save(rgb, "JPEG", exif=rotated.tobytes()),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "gif-animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "gif-transparent": _save(palette, "GIF", transparency=0),
        "webp-animated": _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "tiff-multipage": _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "bmp": _save(rgb, "BMP"),
        "png-huge-header": png_bomb(65535, 65535),
        "gif-huge-screen": _gif_huge_screen(),
        "exif-bomb.jpg": _exif_bomb(),
        "png-one-idat-lie": _save(rgb, "PNG")[:33] + _chunk(b"IDAT", zlib.compress(b"\0" * 10)) + _chunk(b"IEND", b""),
    }


SEEDS = _seeds()


@st.composite
def hostile_files(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["keep", "truncate", "flip", "header", "splice", "repeat"]))
        if not data:
            break
        if kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 16))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "header":
            data = data[: draw(st.integers(1, min(64, len(data))))]
        elif kind == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "repeat":
            start = draw(st.integers(0, len(data) - 1))
            piece = data[start : start + draw(st.integers(1, 256))]
            data[start:start] = piece * draw(st.integers(1, 8))
    extension = draw(st.sampled_from(EXTENSIONS))
    return extension, bytes(data)


@pytest.fixture(scope="module")
def fuzz_service(loaded_model, tmp_path_factory: pytest.TempPathFactory):
    from shared.settings import load_settings
    from worker.serving.service import ScoringService

    root = tmp_path_factory.mktemp("fuzz")
    config = load_settings(
        max_image_pixels=MAX_PIXELS, max_image_bytes=MAX_BYTES, fetch_timeout=30, max_batch_size=4,
        max_wait_ms=0,
    )
    service = ScoringService(loaded_model, config, local_roots=[root], threads=2).start()
    try:
        yield service, root
    finally:
        service.stop()


def test_seeds_cover_what_they_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeds are what their names say (else the fuzzer would mutate something else)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # only headers are read here
    assert Image.open(io.BytesIO(SEEDS["apng"])).n_frames == 3
    assert Image.open(io.BytesIO(SEEDS["gif-animated"])).n_frames == 3
    assert Image.open(io.BytesIO(SEEDS["webp-animated"])).n_frames == 3
    assert Image.open(io.BytesIO(SEEDS["tiff-multipage"])).n_frames == 3
    assert Image.open(io.BytesIO(SEEDS["png-huge-header"])).size == (65535, 65535)
    assert Image.open(io.BytesIO(SEEDS["gif-huge-screen"])).size == (65535, 65535)
    assert Image.open(io.BytesIO(SEEDS["grey16.png"])).mode.startswith("I")


def test_every_hostile_file_ends_in_a_score_or_an_error_code(fuzz_service) -> None:
    service, root = fuzz_service
    watchdog = ThreadPoolExecutor(1, thread_name_prefix="fuzz")
    counter = iter(range(10**9))
    outcomes: dict[str, int] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @settings(
        max_examples=EXAMPLES,
        derandomize=not RANDOM,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_files())
    def one(case: tuple[str, bytes]) -> None:
        extension, data = case
        path = Path(root) / f"case-{next(counter)}{extension}"
        path.write_bytes(data)
        try:
            result = watchdog.submit(service.score_uri, str(path)).result(timeout=TASK_DEADLINE_S)
        finally:
            path.unlink()
        if result["ok"]:
            assert -1.0 <= result["score"] <= 1.0, result
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        else:
            assert result["error"]["code"] in CODES, result["error"]
            outcomes[result["error"]["code"]] = outcomes.get(result["error"]["code"], 0) + 1

    try:
        one()
    finally:
        watchdog.shutdown(wait=False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < RSS_GROWTH_LIMIT, f"peak RSS grew by {grown >> 20} MiB"
    # The run exercised both outcomes, and more than one kind of refusal.
    assert outcomes.get("ok", 0) > 0 and len(outcomes) >= 3, outcomes
    print(f"fuzz outcomes over {sum(outcomes.values())} files: {dict(sorted(outcomes.items()))}")
