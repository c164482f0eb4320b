"""What the fetch deadline costs: ``Sources.fetch`` (on a reused helper thread, so that a stalled
mount or a dripping endpoint costs the task only its deadline) against the same read on the
calling thread, with the decode of the same JPEG for scale.

    PYTHONPATH=. python bench/bench_fetch.py [--repeats 3000]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from worker.model.decode import decode
from worker.serving.sources import LocalRef, Sources


def per_call_us(function, repeats: int) -> float:
    function()  # warm: the helper thread, the page cache
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    path = folder / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    sources = Sources(local_roots=[folder], max_bytes=1 << 26, timeout=30)
    ref = LocalRef(str(path))
    rows = [
        ("fetch on the calling thread", lambda: sources._fetch_local(ref, time.monotonic() + 30)),
        ("Sources.fetch (helper thread, deadline)", lambda: sources.fetch(str(path))),
        ("decode to RGB (for scale)", lambda: decode(path.read_bytes(), max_pixels=10**8)),
    ]
    print(f"640x480 JPEG, {path.stat().st_size} bytes, {args.repeats} repeats")
    print("| step | µs per image |\n| --- | --- |")
    for name, function in rows:
        repeats = args.repeats if "decode" not in name else max(1, args.repeats // 10)
        print(f"| {name} | {per_call_us(function, repeats):.0f} |")


if __name__ == "__main__":
    main()
