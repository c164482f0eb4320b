"""Throughput of the scoring path, before and after dynamic batching, in one run.

Builds a randomly initialised CLIP tower of real shape (no hub needed: the weights do not change
the cost), saves it like a hub checkpoint, loads it through the production loader, and measures:

1. the model alone, one forward per batch size (the ceiling);
2. decode + preprocess per image on the CPU (can the CPU feed the model?);
3. the whole ScoringService (fetch, decode, preprocess, batcher, model) with ``max_batch_size=1``
   ("before": one forward per image) and with dynamic batching ("after"), as a ratio.

    python bench/bench_service.py --tower base32 --images 192           # CPU-sized
    python bench/bench_service.py --tower large14 --images 2048 --device cuda --batch 64

Prints a markdown table; figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import TOWERS, build  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from tests.tiny_clip import noise_image  # noqa: E402
from worker.model.decode import decode  # noqa: E402
from worker.model.loader import load_model  # noqa: E402
from worker.serving.service import ScoringService  # noqa: E402


def make_images(directory: Path, count: int, size: tuple[int, int]) -> list[str]:
    paths = []
    for i in range(count):
        path = directory / f"img{i:05d}.jpg"
        noise_image(i % 16, size).save(path, quality=90)
        paths.append(str(path))
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(loaded, batch: int, repeats: int) -> float:
    pixels = torch.randn(batch, *loaded.preprocessing.output_shape)
    loaded.score(pixels)  # warm-up
    _sync(loaded.device)
    started = time.perf_counter()
    for _ in range(repeats):
        loaded.score(pixels)
    _sync(loaded.device)
    return batch * repeats / (time.perf_counter() - started)


def preprocess_rate(loaded, paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        loaded.preprocessing(decode(Path(path).read_bytes(), max_pixels=10**9))
    return len(paths) / (time.perf_counter() - started)


def service_rate(loaded, paths: list[str], max_batch: int, threads: int, wait_ms: float) -> tuple[float, float]:
    settings = load_settings(max_batch_size=max_batch, max_wait_ms=wait_ms, concurrency=threads)
    service = ScoringService(loaded, settings, local_roots=None, threads=threads).start()
    service.score_uris(paths[: min(len(paths), 2 * max_batch)])  # warm-up
    batches_before = service.batcher.batches_run
    started = time.perf_counter()
    results = service.score_uris(paths)
    elapsed = time.perf_counter() - started
    batches = service.batcher.batches_run - batches_before
    service.stop()
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:1]
    return len(paths) / elapsed, len(paths) / max(batches, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="base32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", default="640x480", help="source image size WxH")
    parser.add_argument("--batch", type=int, default=32, help="MAX_BATCH_SIZE for 'after'")
    parser.add_argument("--threads", type=int, default=0, help="fetch threads (default 4 x batch)")
    parser.add_argument("--wait-ms", type=float, default=10.0)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    threads = args.threads or 4 * args.batch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tower_dir, head = build(root, args.tower)
        loaded = load_model(str(tower_dir), head, device=args.device, dtype=args.dtype)
        paths = make_images(root, args.images, (width, height))
        rows = [("model alone, batch 1", model_only(loaded, 1, 8))]
        for batch in sorted({8, args.batch}):
            rows.append((f"model alone, batch {batch}", model_only(loaded, batch, 3)))
        rows.append(("decode + preprocess, 1 thread", preprocess_rate(loaded, paths[:32])))
        before, before_batch = service_rate(loaded, paths, 1, threads, 0.0)
        after, after_batch = service_rate(loaded, paths, args.batch, threads, args.wait_ms)
        rows.append(("service, MAX_BATCH_SIZE=1 (before)", before))
        rows.append((f"service, MAX_BATCH_SIZE={args.batch} (after)", after))

    device = loaded.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nmachine: {platform.node()} · {name} · {os.cpu_count()} CPUs · torch {torch.__version__}")
    print(f"tower {args.tower} ({loaded.dtype}), {args.images} JPEGs {args.size}, {threads} threads")
    print("\n| what | images/s |\n| --- | ---: |")
    for label, rate in rows:
        print(f"| {label} | {rate:.1f} |")
    print(f"\nmean batch: before {before_batch:.1f}, after {after_batch:.1f}")
    print(f"dynamic batching speed-up (after / before): {after / before:.2f}x")


if __name__ == "__main__":
    main()
