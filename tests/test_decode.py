"""Decoding every image kind users send, and a stable error code for every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import ErrorCode, ScoringError
from tests.images import png_bomb, write_variants
from worker.model.decode import decode, open_image


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_variants(tmp_path_factory.mktemp("variants"))


def _decode(path: Path, max_pixels: int = 10**8) -> Image.Image:
    return decode(path.read_bytes(), max_pixels=max_pixels)


@pytest.mark.parametrize(
    "name", ["upright.png", "rgba.png", "palette.gif", "grey8.png", "grey16.png", "cmyk.jpg", "photo.webp"]
)
def test_every_mode_becomes_8bit_rgb(variants: dict[str, Path], name: str) -> None:
    image = _decode(variants[name])
    assert image.mode == "RGB"
    assert image.size == (320, 240)


def test_sixteen_bit_is_scaled_not_clipped(variants: dict[str, Path]) -> None:
    eight = np.asarray(_decode(variants["grey8.png"]))
    sixteen = np.asarray(_decode(variants["grey16.png"]))
    assert np.array_equal(eight, sixteen)
    assert sixteen.max() < 255  # clipping would have saturated everything above 255/65535


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    transparent = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    transparent.save(tmp_path / "clear.png")
    assert np.asarray(_decode(tmp_path / "clear.png")).min() == 255


def test_exif_orientation_is_applied(variants: dict[str, Path]) -> None:
    upright = np.asarray(_decode(variants["upright.jpg"]), dtype=np.int16)
    rotated = np.asarray(_decode(variants["exif-rotated.jpg"]), dtype=np.int16)
    assert rotated.shape == upright.shape  # stored 240x320, shown 320x240
    assert np.abs(rotated - upright).mean() < 2.0


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("empty.png", ErrorCode.NOT_AN_IMAGE),
        ("notes.txt", ErrorCode.NOT_AN_IMAGE),
        ("truncated.jpg", ErrorCode.CORRUPT_IMAGE),
        ("bomb.png", ErrorCode.TOO_MANY_PIXELS),
    ],
)
def test_bad_files_get_their_code(variants: dict[str, Path], name: str, code: ErrorCode) -> None:
    with pytest.raises(ScoringError) as caught:
        _decode(variants[name])
    assert caught.value.code == code


def test_pixel_limit_is_ours_and_checked_on_the_header() -> None:
    # 5000 x 5000 is far below Pillow's own bomb limit; ours refuses it before decoding a pixel.
    with pytest.raises(ScoringError) as caught:
        open_image(png_bomb(5000, 5000), max_pixels=1_000_000)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS
    assert "REALSCORE_MAX_IMAGE_PIXELS" in caught.value.message


def test_formats_that_run_external_programs_are_refused() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ScoringError) as caught:
        open_image(eps, max_pixels=10**8)
    assert caught.value.code == ErrorCode.NOT_AN_IMAGE
