"""Preprocessing modes (REALSCORE_DECODE) side by side: speed and deviation from ``exact``.

For each mode, image size and format, on photo-like images (smooth gradients and blobs plus
sensor noise, tests/images.py ``photo_like``):

- ``stage``: the task threads' share (header check + the mode's CPU work), 1 and N threads;
- ``collate``: the forward step's share (the mode's device work: upload, JPEG decode in ``gpu``
  mode, resize, crop, normalize), in batches of ``--batch``, synchronized;
- ``bound``: what the two overlapped can deliver, ``min(stage N threads, collate)``;
- deviation from ``exact`` in normalized pixel units (mean, p99, max) and in score (max |diff|)
  through the ``--tower`` model.

Then the ``exact`` path's cheap wins, before (the previous code, kept here) and after.

    python bench/preprocess.py                                     # CPU, tiny tower
    python bench/preprocess.py --tower large14 --device cuda --out /tmp/preprocess.md

Prints markdown tables; with ``--out`` each row is also appended to FILE as soon as it is
measured (a GPU run with a hard time limit keeps what it got). No asserts: figures only.
Imports torch, torchvision, transformers and Pillow only (no pydantic, Celery or boto3), so it
runs as is on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from bench.common import TOWERS, build  # noqa: E402
from tests.images import photo_like  # noqa: E402
from worker.model import decode  # noqa: E402
from worker.model.loader import load_model  # noqa: E402
from worker.model.modes import MODES, Mode, make_mode  # noqa: E402

SIZES = {"1024x768": (1024, 768), "4000x3000": (4000, 3000)}


class Table:
    """Prints markdown rows, and appends each to ``--out`` the moment it exists."""

    def __init__(self, out: Path | None) -> None:
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a") as handle:
                handle.write(text + "\n")

    def header(self, title: str, columns: list[str]) -> None:
        self.line(f"\n{title}\n")
        self.line("| " + " | ".join(columns) + " |")
        self.line("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(columns))) + " |")

    def row(self, cells: list[object]) -> None:
        self.line("| " + " | ".join(_cell(c) for c in cells) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:.1f}"
    return str(value)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_one(mode: Mode, data: bytes) -> object:
    """The task thread's part, header check included, as the service calls it."""
    return mode.stage_bytes(data, 10**9, lambda nbytes: nullcontext()).payload


def timed_loop(work: Callable[[int], int], seconds: float) -> float:
    """Run ``work(round)`` (returns images done) until ``seconds`` pass; images per second."""
    done, rounds = 0, 0
    started = time.perf_counter()
    while True:
        done += work(rounds)
        rounds += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def stage_rate(mode: Mode, blobs: list[bytes], threads: int, seconds: float) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: stage_one(mode, b), blobs[:threads]))  # warm-up
        return timed_loop(lambda _: len(list(pool.map(lambda b: stage_one(mode, b), blobs))), seconds)


def collate_rate(mode: Mode, payloads: list[object], batch: int, seconds: float) -> float:
    batches = [payloads[i : i + batch] for i in range(0, len(payloads), batch)]
    mode.collate(batches[0])  # warm-up
    sync(mode.device)

    def one_round(_: int) -> int:
        for chunk in batches:
            mode.collate(chunk)
        sync(mode.device)
        return len(payloads)

    return timed_loop(one_round, seconds)


def deviation(loaded, modes: dict[str, Mode], blobs: list[bytes], name: str) -> tuple[float, ...]:
    """Pixels (mean, p99, max) and score (max |diff|) of ``name`` against ``exact``."""
    exact = modes["exact"].collate([stage_one(modes["exact"], b) for b in blobs]).pixels.float()
    other = modes[name].collate([stage_one(modes[name], b) for b in blobs]).pixels.float()
    difference = (other - exact).abs().flatten().cpu()
    p99 = float(torch.quantile(difference[:: max(1, difference.numel() // 1_000_000)], 0.99))
    scores_exact = loaded.collect(loaded.launch(exact))[0]
    scores_other = loaded.collect(loaded.launch(other))[0]
    score = max(abs(a - b) for a, b in zip(scores_exact, scores_other))
    return float(difference.mean()), p99, float(difference.max()), score


def _legacy_16bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode != "I" or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb_variant(*, copy_transpose: bool, convert_rgb: bool, float64: bool) -> Callable:
    """The exact path's decode with each cheap win switched on or off (all off: the old code)."""

    def to_rgb(image: Image.Image) -> Image.Image:
        image.load()
        if copy_transpose:
            image = ImageOps.exif_transpose(image)  # a full copy even with nothing to rotate
        else:
            ImageOps.exif_transpose(image, in_place=True)
        if image.mode.startswith("I"):
            return (_legacy_16bit(image) if float64 else decode.to_rgb(image)).convert("RGB")
        return image.convert("RGB") if convert_rgb or image.mode != "RGB" else image

    return to_rgb


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def resident_peak_mib(function: Callable[[], object]) -> float:
    """Peak resident growth while ``function`` runs (Linux: VmHWM reset through clear_refs);
    NaN where that is not available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed pages would otherwise hide a new peak
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _status_kib("VmRSS")
        function()
        return (_status_kib("VmHWM") - baseline) / 1024
    except (OSError, AttributeError):
        return float("nan")


def cheap_wins(table: Table, seconds: float) -> None:
    """Before/after of each of the exact path's cheap wins: time and numpy's traced peak."""
    photo = photo_like(1, (4000, 3000))
    jpeg = encode(photo, "JPEG")
    grey16 = encode(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), "PNG")
    old = dict(copy_transpose=True, convert_rgb=True, float64=True)
    cases = [
        ("exif_transpose in place, not a copy (4000x3000 RGB JPEG)", jpeg,
         old, {**old, "copy_transpose": False}),
        ("no convert('RGB') of an RGB frame (same JPEG)", jpeg,
         {**old, "copy_transpose": False}, {**old, "copy_transpose": False, "convert_rgb": False}),
        ("integer 16-bit scaling, no float64 (4000x3000 16-bit PNG)", grey16,
         old, {**old, "float64": False}),
    ]
    table.header(
        "exact path, cheap wins (decode to RGB only, 1 thread)",
        ["win", "before img/s", "after img/s", "before numpy peak MiB", "after numpy peak MiB",
         "before resident peak MiB", "after resident peak MiB"],
    )
    Image.core.set_blocks_max(0)  # Pillow's freed blocks must not hide the next frame's cost
    for label, data, before, after in cases:
        rates, peaks, resident = [], [], []
        for switches in (before, after):
            function = to_rgb_variant(**switches)
            rates.append(timed_loop(lambda _: function(decode.open_image(data, max_pixels=10**9)) and 1, seconds))
            tracemalloc.start()
            function(decode.open_image(data, max_pixels=10**9))
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
            resident.append(resident_peak_mib(lambda: function(decode.open_image(data, max_pixels=10**9))))
        table.row([label, *rates, *peaks, *resident])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset")
    parser.add_argument("--formats", default="JPEG,PNG")
    parser.add_argument("--images", type=int, default=8, help="distinct images per size and format")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="N for 'N threads'")
    parser.add_argument("--batch", type=int, default=32, help="collate batch size")
    parser.add_argument("--out", type=Path, help="append each table row here as soon as measured")
    parser.add_argument("--skip-cheap-wins", action="store_true")
    args = parser.parse_args()
    table = Table(args.out)

    with tempfile.TemporaryDirectory() as tmp:
        tower_dir, head = build(Path(tmp), args.tower)
        loaded = load_model(str(tower_dir), head, device=args.device, dtype=args.dtype)
    device = loaded.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    table.line(
        f"\nmachine: {platform.node()} · {gpu} · {os.cpu_count()} CPUs · torch {torch.__version__} · "
        f"tower {args.tower} ({loaded.dtype}) on {device} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    table.line(f"command: python {' '.join(sys.argv)}")
    names = [m for m in args.modes.split(",") if m]
    modes = {name: make_mode(name, loaded.preprocessing, device, loaded.dtype) for name in {"exact", *names}}
    speed_columns = ["mode", "image", "stage 1 thread", f"stage {args.threads} threads",
                     f"collate (batch {args.batch})", "bound img/s"]
    deviation_rows = []
    table.header("images/s per preprocessing mode", speed_columns)
    for size_name in args.sizes.split(","):
        for fmt in args.formats.split(","):
            count = args.images if size_name == "1024x768" else max(2, args.images // 4)
            blobs = [encode(photo_like(seed, SIZES[size_name]), fmt) for seed in range(count)]
            label = f"{size_name} {fmt}"
            for name in names:
                mode = modes[name]
                one = stage_rate(mode, blobs, 1, args.seconds)
                many = stage_rate(mode, blobs, args.threads, args.seconds)
                payloads = [stage_one(mode, b) for b in blobs]
                while len(payloads) < args.batch:
                    payloads += payloads[: args.batch - len(payloads)]
                collate = collate_rate(mode, payloads, args.batch, args.seconds)
                table.row([name, label, one, many, collate, min(many, collate)])
                if name != "exact":
                    deviation_rows.append([name, label, *deviation(loaded, modes, blobs, name)])
    table.header(
        "deviation from exact (normalized pixel units; score in [-1, 1])",
        ["mode", "image", "pixel mean", "pixel p99", "pixel max", "score max abs diff"],
    )
    for row in deviation_rows:
        table.row(row)
    if not args.skip_cheap_wins:
        cheap_wins(table, args.seconds)


if __name__ == "__main__":
    main()
