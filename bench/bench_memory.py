"""Peak memory of a burst of 12-megapixel images, with and without a tight pixel budget.

Every in-flight image holds a task thread; without a bound, 64 threads decode 64 twelve-megapixel
images at once (about 36 MB each as RGB, several copies during conversion). Each configuration
runs in its own process so its peak RSS is its own.

    python bench/bench_memory.py --images 48 --threads 48
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
from shared.settings import load_settings
from worker.model.loader import load_model
from worker.serving.service import ScoringService
from worker.serving.memory import limit_malloc_arenas
if {arena_cap}:
    limit_malloc_arenas()
loaded = load_model({tower!r}, {head!r}, device="cpu", dtype="float32")
settings = load_settings(max_pending_bytes={budget}, concurrency={threads}, max_batch_size=16,
                         max_image_pixels=20_000_000)
service = ScoringService(loaded, settings, local_roots=None, threads={threads}).start()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = service.score_uris({paths!r})
service.stop()
assert all(r["ok"] for r in results)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"baseline_mib": before / 1024, "peak_mib": peak / 1024}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=48)
    parser.add_argument("--budgets-mib", default="256,65536")
    args = parser.parse_args()

    from PIL import Image

    from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tower = make_tiny_clip(tmp_path / "clip")
        head = make_seed_checkpoint(tmp_path / "head.pth", tower)
        big = noise_image(0, (400, 300)).resize((4000, 3000), Image.Resampling.BILINEAR)
        paths = []
        for i in range(args.images):
            path = tmp_path / f"big{i}.jpg"
            big.save(path, quality=85)
            paths.append(str(path))
        print(f"{args.images} JPEGs of 4000x3000 (12 MP), {args.threads} threads, tiny tower\n")
        print("| MAX_PENDING_BYTES | malloc arenas capped | baseline RSS MiB | peak RSS MiB | burst cost MiB |")
        print("| ---: | --- | ---: | ---: | ---: |")
        configs = [(b, cap) for cap in (False, True) for b in map(int, args.budgets_mib.split(","))]
        for budget_mib, cap in configs:
            code = CHILD.format(root=str(root), tower=str(tower), head=str(head), arena_cap=cap,
                                budget=budget_mib << 20, threads=args.threads, paths=paths)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {budget_mib} MiB | {'yes' if cap else 'no'} | {figures['baseline_mib']:.0f} | {figures['peak_mib']:.0f} | "
                  f"{figures['peak_mib'] - figures['baseline_mib']:.0f} |")


if __name__ == "__main__":
    main()
