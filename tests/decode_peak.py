"""Subprocess helper for tests/test_decode_memory.py: decode one file, print the estimate and the
measured peak resident memory of the decode (VmHWM after resetting it), as JSON.

Run as ``python tests/decode_peak.py FILE exact|tensor``; imports no torch, so the process is small.
``python tests/decode_peak.py FILE oom``: decode with the address space capped just above what
is mapped now, and print the error code the decode reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from worker.model import decode  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def out_of_memory(path: str) -> None:
    import resource

    from shared.errors import ScoringError

    data = Path(path).read_bytes()
    image = decode.open_image(data, max_pixels=10**9)
    limit = status_kib("VmSize") * 1024 + (16 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        decode.to_rgb(image)
        print(json.dumps({"code": None}))
    except ScoringError as error:
        print(json.dumps({"code": error.code.value, "message": error.message}))


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "oom":
        return out_of_memory(path)
    Image.core.set_blocks_max(0)  # no cached blocks from reading the header skew the baseline
    data = Path(path).read_bytes()
    image = decode.open_image(data, max_pixels=10**9)
    if mode == "tensor" and image.format == "JPEG" and image.mode in ("RGB", "L"):
        width, height = image.size
        short = min(width, height)
        image.draft(image.mode, (2 * 224 * width // short, 2 * 224 * height // short))
    estimate = decode.decoded_bytes_estimate(image, rgb_array=mode == "tensor")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = status_kib("VmRSS")
    rgb = decode.to_rgb(image)
    kept = np.asarray(rgb) if mode == "tensor" else rgb
    peak = (status_kib("VmHWM") - baseline) * 1024
    print(json.dumps({"estimate": estimate, "peak": peak, "mode": image.mode, "kept": kept is not None}))


if __name__ == "__main__":
    main()
