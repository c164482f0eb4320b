"""Soak: real ``realscore worker`` processes under steady mixed load for a set time.

Starts a private ``redis-server`` (append-only, ``noeviction``, as compose runs it) and
``--workers`` worker processes on the tiny CLIP (the cost of the model is not what a soak is
about: lost tasks, latency tails and memory growth are), then runs closed-loop clients for
``--warmup`` plus ``--seconds``: interactive single images (good and bad), interactive 32-image
chunks, and bulk 128-image chunks (what a backfill sends). Prints tasks sent vs answered,
throughput, p50/p95/p99 per kind, and each worker's RSS after the warm-up load, over time and at
the end.

    python bench/soak.py --seconds 600 --workers 2

``--probe DIR`` adds a memory probe to each worker (bench/soak_probe/sitecustomize.py): malloc's
in-use vs free-but-held bytes, object counts by type, tracemalloc growth (``--tracemalloc``);
``--worker-env`` and ``--trim-workers`` set one worker apart for an A/B in the same run.

Figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery import Celery  # noqa: E402

from shared.celery_app import configure  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from shared.task_names import BULK_QUEUE, SCORE, SCORE_MANY  # noqa: E402
from tests.processes import free_port, wait_until  # noqa: E402
from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, int] = {}
        self.answered: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {}
        self.images = 0
        self.errors: dict[str, int] = {}

    def record(self, kind: str, seconds: float | None, rows: list[dict]) -> None:
        with self.lock:
            self.sent[kind] = self.sent.get(kind, 0) + 1
            if seconds is None:
                return
            self.answered[kind] = self.answered.get(kind, 0) + 1
            self.latency.setdefault(kind, []).append(seconds)
            self.images += len(rows)
            for row in rows:
                if not row["ok"]:
                    code = row["error"]["code"]
                    self.errors[code] = self.errors.get(code, 0) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600, help="measured time, after --warmup")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds of the same load before the RSS baseline: the first minute fills "
                        "thread pools and the working set, which is not growth")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--singles", type=int, default=4, help="client threads sending single images")
    parser.add_argument("--timeout", type=float, default=120, help="each caller's timeout")
    parser.add_argument("--probe", type=Path, help="write each worker's memory probe (bench/soak_probe) "
                        "to this folder: RSS, malloc in use vs free, object counts by type")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="with --probe: trace Python allocations, FRAMES deep (slows the workers)")
    parser.add_argument("--trim-workers", default="", metavar="N,N",
                        help="with --probe: these workers call malloc_trim(0) after every sample")
    parser.add_argument("--worker-env", action="append", default=[], metavar="N:NAME=VALUE",
                        help="an environment variable for worker N only (e.g. 1:MALLOC_ARENA_MAX=8)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="realscore-soak-"))
    tower = make_tiny_clip(work / "tower")
    head = make_seed_checkpoint(work / "modelo_final.pth", tower)
    media = work / "media"
    media.mkdir()
    good = []
    for i in range(16):
        noise_image(i, (160 + 16 * i, 120 + 8 * i)).save(media / f"good{i}.png")
        good.append(str(media / f"good{i}.png"))
    (media / "bad.png").write_bytes(b"this is not an image")
    bad = [str(media / "bad.png"), str(media / "missing.png"), "s3:/broken"]

    port = free_port()
    redis_dir = work / "redis"
    redis_dir.mkdir()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(redis_dir), "--appendonly", "yes", "--maxmemory", "512mb",
         "--maxmemory-policy", "noeviction", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    app = configure(Celery("realscore-soak"), load_settings(broker_url=url, result_backend=url))
    env = {
        **os.environ,
        "REALSCORE_BROKER_URL": url,
        "REALSCORE_RESULT_BACKEND": url,
        "REALSCORE_MODEL": str(tower),
        "REALSCORE_HEAD_WEIGHTS": str(head),
        "REALSCORE_DEVICE": "cpu",
        "REALSCORE_LOCAL_ROOTS": f'["{media}"]',
        "REALSCORE_MAX_BATCH_SIZE": "16",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if args.probe:
        args.probe.mkdir(parents=True, exist_ok=True)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent / "soak_probe"), env.get("PYTHONPATH", "")])
        env["SOAK_PROBE"] = str(args.probe)
        env["SOAK_PROBE_TRACEMALLOC"] = str(args.tracemalloc)
    trimmed = {int(n) for n in args.trim_workers.split(",") if n}
    workers = []
    for n in range(args.workers):
        log = open(work / f"worker{n}.log", "wb")
        own = dict(env, SOAK_PROBE_TRIM="1" if n in trimmed else "0")
        for setting in args.worker_env:
            index, _, assignment = setting.partition(":")
            if int(index) == n:
                name, _, value = assignment.partition("=")
                own[name] = value
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "worker", "-n", f"soak{n}@%h", "--concurrency", "32"],
            env=own, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    tally = Tally()
    stop = threading.Event()
    try:
        names = [f"soak{n}@{platform.node()}" for n in range(args.workers)]
        wait_until(lambda: len(app.control.ping(destination=names, timeout=1)) == args.workers, 180, "workers")
        # Warm-up, then the RSS baseline.
        app.send_task(SCORE_MANY, args=[good * 4]).get(timeout=120)
        rss_start = [rss_mib(w.pid) for w in workers]
        if args.probe:  # the probes count growth from their next sample on
            (args.probe / "warm").touch()
            print(f"probe: worker pids {[w.pid for w in workers]}, files in {args.probe}", flush=True)

        def run(kind: str, make: callable, queue: str | None = None) -> None:
            rng = random.Random(kind)
            while not stop.is_set():
                name, payload = make(rng)
                started = time.monotonic()
                handle = app.send_task(name, args=[payload], queue=queue, task_id=str(uuid.uuid4()))
                try:
                    value = handle.get(timeout=args.timeout)
                except Exception:  # noqa: BLE001 - an unanswered task is what we count
                    tally.record(kind, None, [])
                    continue
                handle.forget()
                tally.record(kind, time.monotonic() - started, value if isinstance(value, list) else [value])

        def single(rng: random.Random) -> tuple[str, str]:
            return SCORE, rng.choice(bad) if rng.random() < 0.1 else rng.choice(good)

        def chunk(size: int) -> callable:
            def make(rng: random.Random) -> tuple[str, list[str]]:
                return SCORE_MANY, [rng.choice(bad) if rng.random() < 0.05 else rng.choice(good) for _ in range(size)]
            return make

        threads = [threading.Thread(target=run, args=(f"single", single)) for _ in range(args.singles)]
        threads.append(threading.Thread(target=run, args=("chunk32", chunk(32))))
        threads.append(threading.Thread(target=run, args=("bulk128", chunk(128), BULK_QUEUE)))
        began = time.monotonic()
        for thread in threads:
            thread.start()
        samples: list[tuple[float, list[float]]] = []
        total = args.warmup + args.seconds
        ticks = sorted({*range(15, int(total) + 1, 15), args.warmup, total})  # RSS every 15 s
        for tick in ticks:
            time.sleep(max(0.0, tick - (time.monotonic() - began)))
            samples.append((tick, [rss_mib(w.pid) for w in workers]))
        stop.set()
        for thread in threads:
            thread.join(args.timeout + 10)
        elapsed = time.monotonic() - began
        rss_end = [rss_mib(w.pid) for w in workers]
    finally:
        stop.set()
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        codes = [w.wait(120) for w in workers]
        redis.terminate()
        redis.wait(10)

    print(f"soak: {args.workers} workers x 32 threads, tiny CLIP on CPU, {elapsed:.0f} s "
          f"({args.warmup:.0f} s warm-up + {args.seconds:.0f} s measured), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| kind | sent | answered | p50 s | p95 s | p99 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in sorted(tally.sent):
        lat = tally.latency.get(kind, [])
        print(f"| {kind} | {tally.sent[kind]} | {tally.answered.get(kind, 0)} | "
              f"{percentile(lat, .5):.3f} | {percentile(lat, .95):.3f} | {percentile(lat, .99):.3f} |")
    sent, answered = sum(tally.sent.values()), sum(tally.answered.values())
    print()
    print(f"tasks sent {sent}, answered {answered}, lost {sent - answered}")
    print(f"images answered {tally.images} ({tally.images / elapsed:.1f} images/s); error results by code: {tally.errors}")
    # Growth is measured from the end of the warm-up load (thread pools and the working set fill
    # during it), and from a quarter of the measured time on, where a leak would still show.
    loaded = next(rss for at, rss in samples if at >= args.warmup)
    quarter = next(rss for at, rss in samples if at >= args.warmup + args.seconds / 4)
    print(f"RSS baseline: after {args.warmup:.0f} s of warm-up load (the single warm-up task before it left "
          f"{'/'.join(f'{r:.0f}' for r in rss_start)} MiB)")
    for n, (a, q, b) in enumerate(zip(loaded, quarter, rss_end)):
        print(f"worker {n}: RSS {a:.0f} MiB after warm-up, {q:.0f} MiB at a quarter, {b:.0f} MiB at the end "
              f"({(b - a) / a * 100:+.1f} % from warm-up, {(b - q) / q * 100:+.1f} % from a quarter)")
    # With the malloc trimmer RSS is a saw-tooth (high before a trim, low after): the peaks of
    # the two halves of the measured time compare like with like.
    middle = args.warmup + args.seconds / 2
    halves = ([rss for at, rss in samples if args.warmup <= at <= middle], [rss for at, rss in samples if at > middle])
    if all(halves):
        for n in range(len(workers)):
            first, second = max(r[n] for r in halves[0]), max(r[n] for r in halves[1])
            print(f"worker {n}: highest RSS sample {first:.0f} MiB in the first half, {second:.0f} MiB in "
                  f"the second ({(second - first) / first * 100:+.1f} %)")
    print("RSS samples (s: MiB per worker): " + ", ".join(
        f"{at:.0f}: {'/'.join(f'{r:.0f}' for r in rss)}" for at, rss in samples))
    print(f"worker exit codes after SIGTERM: {codes}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if sent == answered else 1


if __name__ == "__main__":
    sys.exit(main())
