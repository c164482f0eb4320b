"""Seconds of header parsing that one crafted JPEG of ``--mb`` MB (REALSCORE_MAX_IMAGE_BYTES'
default is 50) costs: gpu mode's ``jpeghead.read_header`` (None: it hands the file to Pillow)
and ``decode.open_image`` (the overlong-header guard, then Pillow's ``Image.open``, which every
mode runs on a file the reader declines), against Pillow's ``Image.open`` alone (what
``open_image`` was before the guard). All are Python loops on the task thread, holding the GIL
between switches.

Prints a markdown table, asserts nothing.

    python bench/crafted_headers.py --mb 50
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from shared.errors import ScoringError  # noqa: E402
from worker.model import decode, jpeghead  # noqa: E402


def _base() -> tuple[bytes, bytes]:
    """(SOI and the tables and frame of a small JPEG, its scan to EOI)."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 120, 30)).save(buffer, "JPEG")
    data = buffer.getvalue()
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return data[:pos], data[pos:]


def cases(size: int) -> dict[str, bytes]:
    head, scan = _base()
    app = b"\xff\xe3\xff\xff" + b"\x00" * 65533
    return {
        "4-byte COM segments": b"\xff\xd8" + b"\xff\xfe\x00\x02" * (size // 4) + head[2:] + scan,
        "fill bytes (0xFF) before SOS": head + b"\xff" * size + scan,
        "non-0xFF junk before SOS": head + b"\x00" * size + scan,
        "64 KiB APP3 segments": b"\xff\xd8" + app * (size // len(app)) + head[2:] + scan,
    }


def _timed(function) -> tuple[float, str]:  # noqa: ANN001
    start = time.perf_counter()
    try:
        answer = function()
        shown = answer if isinstance(answer, str) else "None" if answer is None else "read"
    except ScoringError as error:
        shown = error.code.value
    return time.perf_counter() - start, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print("| crafted file | MB | jpeghead s | answer | open_image s | answer | bare Pillow open s | answer |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | --- |")
    for name, data in cases(int(args.mb * (1 << 20))).items():
        fast, fast_answer = _timed(lambda: jpeghead.read_header(data))
        slow, slow_answer = _timed(lambda: decode.open_image(data, max_pixels=64_000_000))
        # What open_image cost before the overlong-header guard: Pillow's parse alone.
        bare, bare_answer = _timed(lambda: _bare_open(data))
        print(
            f"| {name} | {len(data) / 1e6:.1f} | {fast:.3f} | {fast_answer} | {slow:.3f} | "
            f"{slow_answer} | {bare:.3f} | {bare_answer} |"
        )


def _bare_open(data: bytes) -> str:
    try:
        Image.open(io.BytesIO(data), formats=decode.ALLOWED_FORMATS)
    except Exception as error:  # noqa: BLE001 - a figure, not a verdict
        return type(error).__name__
    return "opened"


if __name__ == "__main__":
    main()
