"""The pixel budget's estimate bounds the real peak memory of a decode, measured (issue 10 item 4).

Each file is decoded in a small subprocess (tests/decode_peak.py, no torch) that resets its peak
resident size (VmHWM) before the decode and reads it after: a measurement that fails when an
estimate is too low, unlike a timer. Memory exhaustion while decoding is ``out_of_memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.settings import load_settings
from worker.model import decode

HELPER = Path(__file__).with_name("decode_peak.py")
WIDTH, HEIGHT = 3000, 2000  # 6 MP: frames dominate the estimate's fixed 8 MiB allowance


def run_helper(path: Path, mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(HELPER), str(path), mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("big")
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    red, green = (x * 255 // WIDTH).astype(np.uint8), (y * 255 // HEIGHT).astype(np.uint8)
    rgb = Image.fromarray(np.stack([red, green, red // 2 + green // 2], -1), "RGB")
    rotated = Image.Exif()
    rotated[0x0112] = 6
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(red))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    files = {
        "rgb.jpg": (rgb, {"quality": 90}),
        "rotated.jpg": (rgb, {"quality": 90, "exif": rotated.tobytes()}),
        "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 90}),
        "rgba.png": (rgba, {"compress_level": 1}),
        "grey16.png": (Image.fromarray((x * 65535 // WIDTH).astype(np.uint16)), {"compress_level": 1}),
        "palette-transparent.png": (palette, {"transparency": 0, "compress_level": 1}),
        "grey.png": (rgb.convert("L"), {"compress_level": 1}),
    }
    paths = {}
    for name, (image, options) in files.items():
        paths[name] = folder / name
        image.save(paths[name], **options)
    return paths


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("rgb.jpg", "exact"),
        ("rotated.jpg", "exact"),
        ("cmyk.jpg", "exact"),
        ("rgba.png", "exact"),
        ("grey16.png", "exact"),
        ("palette-transparent.png", "exact"),
        ("grey.png", "tensor"),
        ("cmyk.jpg", "tensor"),
        ("rotated.jpg", "tensor"),
    ],
)
def test_estimate_bounds_the_measured_peak(big_files: dict[str, Path], name: str, mode: str) -> None:
    measured = run_helper(big_files[name], mode)
    assert measured["peak"] <= measured["estimate"], measured
    if mode == "exact":  # and it is not so loose that it starves the budget
        assert measured["estimate"] <= 3 * measured["peak"] + (8 << 20), measured


def test_memory_exhaustion_while_decoding_is_out_of_memory(big_files: dict[str, Path]) -> None:
    measured = run_helper(big_files["rgba.png"], "oom")
    assert measured["code"] == "out_of_memory", measured


@pytest.mark.parametrize("cores", [2, 16, 64])
def test_default_budget_decodes_a_12mp_jpeg_per_core(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the costliest plain JPEG (a transposed copy)
    path = tmp_path / "12mp.jpg"
    Image.new("RGB", (4000, 3000), (90, 120, 150)).save(path, quality=90, exif=exif.tobytes())
    image = decode.open_image(path.read_bytes(), max_pixels=10**9)
    compressed = 6 << 20  # a generous 12-MP JPEG file
    per_image = decode.decoded_bytes_estimate(image) + compressed
    assert load_settings().pending_bytes // per_image >= cores
