"""What one single-image task costs the worker process, outside the model.

A real ``realscore worker`` (one process, the tiny tower, small JPEGs so decode and forward are
nearly free) on a private ``redis-server``, fed by ``client.score`` from ``--callers`` threads
for ``--seconds``. Prints tasks/s, p50/p99 latency and the worker's CPU per task (all its
threads, from ``/proc``): on a GPU host that CPU, under one GIL, is what caps a process's
single-image tasks (the performance issue's "message overhead"). With ``--profile`` it also
samples the worker with py-spy (``pip install py-spy``) and prints where that CPU goes,
by function, inclusive and self.

With ``--before DIR`` (another checkout, e.g. ``git worktree add --detach /tmp/before main``)
both checkouts' workers are measured, alternating, ``--rounds`` times each, on the same files.

    python bench/task_overhead.py --seconds 10 --callers 32
    python bench/task_overhead.py --before /tmp/before --rounds 3
    python bench/task_overhead.py --profile --seconds 15

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, build, make_jpegs, percentile, py_spy_frame  # noqa: E402
from bench.pipeline import BenchWorker, PrivateRedis, single_image_callers  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (a procs-per-gpu supervisor's)."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return total


def measure(checkout: Path, data: Path, redis_server: PrivateRedis, args: argparse.Namespace) -> dict:
    """One worker of ``checkout`` under load: tasks/s, latency and worker CPU ms per task."""
    from shared import client
    from shared.celery_app import app, configure
    from shared.settings import load_settings

    configure(app, load_settings(broker_url=redis_server.url, result_backend=redis_server.url))
    paths = sorted(str(p) for p in (data / "images").glob("*.jpg"))
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "PYTHONUNBUFFERED": "1",
        "REALSCORE_MODEL": str(data / "clip"),
        "REALSCORE_HEAD_WEIGHTS": str(data / "head.pth"),
        "REALSCORE_DEVICE": "cpu",
        "REALSCORE_DECODE": args.decode,
        "REALSCORE_BROKER_URL": redis_server.url,
        "REALSCORE_RESULT_BACKEND": redis_server.url,
        "REALSCORE_LOCAL_ROOTS": f'["{data / "images"}"]',
        "REALSCORE_CACHE_URL": "",
        "OMP_NUM_THREADS": "1",
    }
    worker = BenchWorker(env, 1, data / f"worker-{checkout.name}.log", cwd=checkout)
    try:
        worker.wait_ready(app, 300)
        single_image_callers(paths, args.callers, 2.0)  # warm-up
        pid = worker.process.pid
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "250",
                 "--duration", str(int(args.seconds)), "--format", "raw", "--nonblocking",
                 "--output", str(data / "profile.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        cpu_before = _cpu_seconds(pid)
        rate, latencies, failures = single_image_callers(paths, args.callers, args.seconds)
        cpu = _cpu_seconds(pid) - cpu_before
        if profiler is not None:
            profiler.wait(60)
        tasks = max(len(latencies), 1)
        return {
            "tasks/s": rate,
            "p50 ms": percentile(latencies, 50),
            "p99 ms": percentile(latencies, 99),
            "worker CPU ms/task": cpu / tasks * 1000,
            "failed": failures,
        }
    finally:
        worker.stop()


def print_profile(path: Path, top: int) -> None:
    """Inclusive and self samples per function from py-spy's raw (collapsed) stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [py_spy_frame(frame) for frame in stack.split(";")[1:]]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    print(f"\npy-spy: {total} samples of busy threads")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n| function ({title}) | share |\n| --- | ---: |")
        for frame, count in counter.most_common(top):
            print(f"| `{frame}` | {count / total:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="128x96", help="JPEG size WxH")
    parser.add_argument("--decode", default="exact")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="sample the worker with py-spy")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profile-out", type=Path, default=None, help="keep py-spy's raw stacks here")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="task-overhead-"))
    build(data, "tiny")
    width, height = (int(v) for v in args.size.split("x"))
    make_jpegs(data / "images", args.images, (width, height))
    redis_server = PrivateRedis(data)
    checkouts = ([args.before.resolve()] if args.before else []) + [ROOT]
    runs: dict[Path, list[dict]] = {checkout: [] for checkout in checkouts}
    try:
        for _ in range(args.rounds):
            for checkout in checkouts:
                runs[checkout].append(measure(checkout, data, redis_server, args))
                print(checkout, runs[checkout][-1], flush=True)
    finally:
        redis_server.stop()
    print(f"\n{args.callers} callers x {args.seconds:g} s, {args.images} JPEGs {args.size}, "
          f"decode={args.decode}, tiny tower on the CPU; median of {args.rounds} run(s)\n")
    names = ["before", "after"] if args.before else ["this checkout"]
    print("| per task | " + " | ".join(names) + (" | after/before |" if args.before else " |"))
    print("| --- |" + " ---: |" * (len(names) + (1 if args.before else 0)))
    for key in ("tasks/s", "p50 ms", "p99 ms", "worker CPU ms/task", "failed"):
        values = [statistics.median(run[key] for run in runs[c]) for c in checkouts]
        cells = [f"{v:.2f}" if key == "worker CPU ms/task" else f"{v:.0f}" for v in values]
        ratio = f" | {values[-1] / values[0]:.2f}" if args.before and values[0] else (" | -" if args.before else "")
        print(f"| {key} | " + " | ".join(cells) + ratio + " |")
    if args.profile:
        print_profile(data / "profile.txt", args.top)
        if args.profile_out:
            shutil.copy(data / "profile.txt", args.profile_out)
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
