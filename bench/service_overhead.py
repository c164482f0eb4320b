"""Per-image overhead of ``ScoringService`` outside the model: small JPEGs (decode and resize are
cheap), the tiny tower, ``REALSCORE_DECODE=gpu`` (torchvision's decode_jpeg, on the CPU here).

Two figures per run:
- ``prepare``: one thread calls ``service.prepare(uri)`` (fetch through the deadline helper,
  sha256, header check, the mode's stage) for every file: the task thread's own cost per image;
- ``score_uris``: the whole service (task threads, batcher, model, results) on the same files.

Run it at two commits (e.g. the parent in a temporary ``git worktree``) for a before/after
ratio on the same machine. Prints figures, asserts nothing.

    python bench/service_overhead.py --images 512 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build, make_jpegs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="256x192", help="JPEG size WxH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", default="gpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="fetch threads (default TASK_CONCURRENCY)")
    parser.add_argument("--data", type=Path, default=None, help="reuse a built tower and images here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="realscore-overhead-") as tmp:
        root = args.data or Path(tmp)
        if not (root / "head.pth").exists():
            build(root, "tiny")
        width, height = (int(v) for v in args.size.split("x"))
        images = root / f"images-{args.size}"
        paths = sorted(str(p) for p in images.glob("*.jpg"))[: args.images]
        if len(paths) < args.images:
            paths = make_jpegs(images, args.images, size=(width, height))

        from shared.settings import load_settings
        from worker.model.loader import load_model
        from worker.serving.service import ScoringService

        loaded = load_model(str(root / "clip"), root / "head.pth", device="cpu", dtype="auto")
        settings = load_settings(decode=args.decode, max_batch_size=args.batch)
        service = ScoringService(loaded, settings, local_roots=[root], threads=args.threads or None).start()
        try:
            service.score_uris(paths[: 2 * args.batch])  # warm-up
            prepare_ms, score_rate = [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                for path in paths:
                    service.prepare(path).held.release()  # not scored: give its budget back
                prepare_ms.append((time.perf_counter() - started) * 1000 / len(paths))
                started = time.perf_counter()
                results = service.score_uris(paths)
                score_rate.append(len(paths) / (time.perf_counter() - started))
                bad = [r for r in results if not r["ok"]]
                if bad:
                    raise SystemExit(f"{len(bad)} images failed, e.g. {bad[0]}")
        finally:
            service.stop()
    print(f"prepare, one thread: {min(prepare_ms):.3f} ms/image (best of {args.rounds})")
    print(f"score_uris, {args.threads or settings.task_concurrency} threads: {max(score_rate):.1f} images/s (best of {args.rounds})")


if __name__ == "__main__":
    main()
