"""Peak memory of 128 task threads reading large files, with and without a tight fetch budget.

``REALSCORE_MAX_FETCH_BYTES`` bounds the compressed bytes a worker holds from before their read
until their decode is counted in the pixel budget (``REALSCORE_MAX_PENDING_BYTES``). Without it,
every task thread reads its whole file and then waits, holding it, for room in the pixel budget
(and while a read ends, its chunks and their joined copy are both alive: twice the file). Each
configuration runs in its own process (the service ``realscore score`` starts: capped malloc
arenas, malloc trimmer, default pixel budget), scoring the same files; measured:

* peak RSS (``VmHWM``, reset after a two-image warm-up, so the figure is the burst's);
* the most bytes each budget held at once (sampled every 5 ms);
* images per second over the burst.

A child whose RSS passes ``--max-rss-mib`` (8000) is killed and its row says so: the machine is
shared, and 128 threads reading 40 MB files without a fetch budget go past it.

The files are PNGs stored without compression (zlib level 0), ``--megapixels`` each (5.3 MP:
16 MB; 13.3 MP: 40 MB, under the default ``MAX_IMAGE_BYTES`` of 50 MiB): valid images whose
decode costs little beside their size. ``--files`` distinct files are cycled through
``--images`` URIs; nothing caches a result, so each URI is read and decoded anew.
``FETCH_TIMEOUT`` is raised to 600 s: on two cores the queue for a small fetch budget is longer
than the default 30 s, and a fetch that gives up would end the burst early.

    python bench/fetch_budget_memory.py --images 384 --threads 128 --megapixels 5.3
    python bench/fetch_budget_memory.py --images 384 --threads 128 --megapixels 13.3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, Table, build, machine_line  # noqa: E402

CHILD = r"""
import json, re, sys, threading, time
sys.path.insert(0, {root!r})
from shared.settings import get_settings
from worker.serving.embedded import start_service

def status(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

paths = json.loads(open({paths!r}).read())
service = start_service(get_settings())
assert all(r["ok"] for r in service.score_uris(paths[:2])), "warm-up failed"
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets VmHWM to the current RSS: the peak below is the burst's
baseline = status("VmRSS")
held = {{"fetch": 0, "pixels": 0}}
done = threading.Event()

def sample():
    while not done.wait(0.005):
        held["fetch"] = max(held["fetch"], service.fetch_budget.in_use)
        held["pixels"] = max(held["pixels"], service.budget.in_use)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
started = time.monotonic()
results = service.score_uris(paths)
seconds = time.monotonic() - started
done.set()
sampler.join()
peak = status("VmHWM")
service.stop()
failed = [r for r in results if not r["ok"]]
assert not failed, failed[:3]
print(json.dumps({{"baseline_mib": baseline, "peak_mib": peak, "seconds": seconds,
                  "fetch_held_mib": held["fetch"] / 2**20, "pixels_held_mib": held["pixels"] / 2**20,
                  "pixel_budget_mib": service.budget.capacity / 2**20}}))
"""


def make_pngs(directory: Path, count: int, megapixels: float) -> list[str]:
    """``count`` distinct uncompressed PNGs of about ``megapixels`` MP (4:3)."""
    import numpy as np
    from PIL import Image

    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    width = int(megapixels * 1e6 / height)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
        path = directory / f"large{index}.png"
        image.save(path, compress_level=0)
        paths.append(str(path))
    return paths


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # ended meanwhile
        return 0.0
    found = re.search(r"VmRSS:\s+(\d+)", status)
    return int(found.group(1)) / 1024 if found else 0.0


def run_guarded(command: list[str], env: dict[str, str], max_rss_mib: float) -> dict | None:
    """The child's figures, or None if its RSS went over ``max_rss_mib`` (it is then killed: the
    machine is shared, and an unbounded burst of large files could take all of it)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + 1800
        while child.poll() is None:
            if rss_mib(child.pid) > max_rss_mib or time.monotonic() > deadline:
                child.kill()
                child.wait()
                print(f"stopped: RSS over {max_rss_mib} MiB (or 30 min)", file=sys.stderr)
                return None
            time.sleep(0.05)  # polling a child's RSS; not a synchronisation
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(err.read()[-4000:])
        return json.loads(out.read().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--threads", type=int, default=128)
    parser.add_argument("--files", type=int, default=8, help="distinct files, cycled")
    parser.add_argument("--megapixels", type=float, default=5.3)
    parser.add_argument("--budgets-mib", default="256,1048576", help="MAX_FETCH_BYTES values, MiB")
    parser.add_argument("--max-rss-mib", type=float, default=8000, help="a child over this is stopped")
    parser.add_argument("--out", type=Path, help="append the table to this file too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tower, head = build(work, "tiny")
        files = make_pngs(work, args.files, args.megapixels)
        size_mb = os.path.getsize(files[0]) / 1e6
        paths = work / "paths.json"
        paths.write_text(json.dumps([files[i % len(files)] for i in range(args.images)]))
        env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
        env.update({
            "REALSCORE_MODEL": str(tower), "REALSCORE_HEAD_WEIGHTS": str(head), "REALSCORE_DEVICE": "cpu",
            "REALSCORE_CONCURRENCY": str(args.threads), "REALSCORE_FETCH_TIMEOUT": "600",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        notes = [f"{machine_line('cpu')}; tiny tower; {args.images} URIs over {args.files} PNGs of "
                 f"{size_mb:.1f} MB ({args.megapixels} MP, stored), {args.threads} task threads"]
        out = open(args.out, "a") if args.out else None
        table = Table("Fetch budget: peak RSS of a burst of large files", [
            "MAX_FETCH_BYTES", "baseline RSS MiB", "peak RSS MiB", "burst cost MiB",
            "fetch budget held, max MiB", "pixel budget held, max MiB", "images/s",
        ], out, notes)
        peaks = {}
        for budget_mib in map(int, args.budgets_mib.split(",")):
            code = CHILD.format(root=str(ROOT), paths=str(paths))
            env["REALSCORE_MAX_FETCH_BYTES"] = str(budget_mib << 20)
            figures = run_guarded([sys.executable, "-c", code], env, args.max_rss_mib)
            if figures is None:
                table.row(f"{budget_mib} MiB", "–", f"over {args.max_rss_mib:.0f} MiB: stopped", "–", "–", "–", "–")
                continue
            peaks[budget_mib] = figures["peak_mib"] - figures["baseline_mib"]
            pixels = f"{figures['pixels_held_mib']:.1f} of {figures['pixel_budget_mib']:.0f}"
            table.row(f"{budget_mib} MiB", figures["baseline_mib"], figures["peak_mib"], peaks[budget_mib],
                      figures["fetch_held_mib"], pixels, args.images / figures["seconds"])
        if len(peaks) == 2:
            small, large = sorted(peaks)
            print(f"\nburst cost, {large} MiB / {small} MiB: {peaks[large] / peaks[small]:.2f}x")
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
