"""The backfill's bookkeeping cost, and interactive latency while a backfill saturates a worker.

One real ``realscore worker`` (tiny tower: the model costs least, so bookkeeping shows most) on a
private ``redis-server``, and one folder of small PNGs, scored alternately by

* ``client.score_many(uris, bulk=True)``: all chunks sent at once, gathered in order; and
* ``realscore backfill FOLDER --out FILE --chunk-size 256`` (same chunks, default in-flight
  window), its wall time as it reports it (from the first chunk sent to the last row written:
  listing, SQLite state, output writes, polling);

and, during one more backfill, single interactive ``client.score`` calls every 0.2 s, against the
same calls on the idle worker (p50/p99).

    python bench/backfill_throughput.py --images 1024 --rounds 3

Prints a markdown table; figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared import client  # noqa: E402
from shared.celery_app import app, configure  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from tests.processes import WorkerProcess  # noqa: E402
from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image  # noqa: E402
from tests.worker_helpers import private_redis  # noqa: E402


from bench.backfill_memory import _RUN  # noqa: E402 - runs the CLI, reports its peak RSS

PEAKS: list[float] = []
CPU: list[float] = []


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def backfill(folder: Path, out: Path, env: dict, *extra: str) -> float:
    """Seconds the backfill reports for its run (its peak RSS goes to PEAKS, CPU s to CPU)."""
    before = _children_cpu()
    result = subprocess.run(
        [sys.executable, "-c", _RUN, "backfill", str(folder), "--out", str(out), "--chunk-size", "256", *extra],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    CPU.append(_children_cpu() - before)
    lines = result.stderr.strip().splitlines()
    PEAKS.append(int(lines[-1].split()[1]) / 1024)
    return float(re.search(r"; ([0-9.]+) s, ", lines[-2]).group(1))


def latencies(stop: threading.Event, uri: str, into: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        client.score(uri, timeout=60)
        into.append((time.monotonic() - started) * 1000)
        stop.wait(0.2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, private_redis() as url:
        work = Path(tmp)
        clip = make_tiny_clip(work / "clip")
        head = make_seed_checkpoint(work / "head.pth", clip)
        folder = work / "images"
        folder.mkdir()
        uris = []
        for index in range(args.images):
            path = folder / f"{index:05d}.png"
            noise_image(index % 32, (96, 72)).save(path)
            uris.append(str(path))
        env = {
            "REALSCORE_MODEL": str(clip), "REALSCORE_HEAD_WEIGHTS": str(head), "REALSCORE_DEVICE": "cpu",
            "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url,
            "REALSCORE_LOCAL_ROOTS": json.dumps([str(work)]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        configure(app, load_settings(broker_url=url, result_backend=url))
        worker = WorkerProcess(env, work / "worker.log").start()
        try:
            worker.wait_ready(app)
            client.score_many(uris[:64], bulk=True, timeout=300)  # warm up
            direct, driven, direct_cpu = [], [], []
            for round_ in range(args.rounds):
                started, cpu = time.monotonic(), time.process_time()
                rows = client.score_many(uris, bulk=True, timeout=600)
                direct.append(time.monotonic() - started)
                direct_cpu.append(time.process_time() - cpu)
                assert len(rows) == len(uris)
                driven.append(backfill(folder, work / f"out-{round_}.jsonl", env))
                print(f"round {round_}: score_many {direct[-1]:.2f} s, backfill {driven[-1]:.2f} s", flush=True)

            idle: list[float] = []
            stop = threading.Event()
            probe = threading.Thread(target=latencies, args=(stop, uris[0], idle))
            probe.start()
            time.sleep(8)
            stop.set()
            probe.join()
            busy: list[float] = []
            stop = threading.Event()
            probe = threading.Thread(target=latencies, args=(stop, uris[1], busy))
            probe.start()
            backfill(folder, work / "out-busy.jsonl", env)
            stop.set()
            probe.join()
            gentle: list[float] = []
            stop = threading.Event()
            probe = threading.Thread(target=latencies, args=(stop, uris[2], gentle))
            probe.start()
            backfill(folder, work / "out-gentle.jsonl", env, "--chunk-size", "32", "--max-in-flight", "1")
            stop.set()
            probe.join()
        finally:
            worker.stop()
    d, b = statistics.median(direct), statistics.median(driven)
    print(f"\npython {platform.python_version()}, {os.cpu_count()} CPUs; {args.images} images, {args.rounds} rounds")
    print("| path | median s | images/s |\n| --- | ---: | ---: |")
    print(f"| client.score_many(bulk=True) | {d:.2f} | {args.images / d:.0f} |")
    print(f"| realscore backfill | {b:.2f} | {args.images / b:.0f} |")
    print(f"\nbackfill / score_many: {b / d:.3f} (bookkeeping cost {100 * (b / d - 1):+.1f} %)")
    print(f"client CPU per 1000 images: score_many {1000 * statistics.median(direct_cpu) / args.images:.2f} s, "
          f"backfill {1000 * statistics.median(CPU[: args.rounds]) / args.images:.2f} s (whole process, start-up included)")
    print(f"backfill peak RSS: {max(PEAKS):.0f} MiB (runs: {', '.join(f'{p:.0f}' for p in PEAKS)})")
    print("\n| interactive client.score | calls | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: |")
    for name, values in (("idle worker", idle), ("during a backfill", busy),
                         ("during a backfill, --chunk-size 32 --max-in-flight 1", gentle)):
        print(f"| {name} | {len(values)} | {percentile(values, 0.5):.0f} | {percentile(values, 0.99):.0f} |")


if __name__ == "__main__":
    main()
