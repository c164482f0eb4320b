"""The whole serving pipeline, layer by layer, on the same photo-like 1024x768 JPEGs:

(i)   the model alone: ``LoadedModel.score_and_features`` on preprocessed CPU batches (the copies
      to the device included, as the worker runs it);
(ii)  ``ScoringService`` in this process (fetch, decode, preprocess, batcher, model);
(iii) a real ``realscore worker`` on a private ``redis-server`` (started here, its own port), fed by
      ``client.score_many``;
(iv)  the same worker fed by ``client.score`` (one image per task) from 64 threads: images/s and
      p50/p99 latency;

(ii)-(iv) for each decode mode, (iii)-(iv) for each ``--procs-per-gpu``. Random-weight towers of real
shape (no hub). Each row is printed and appended to ``--out`` as soon as it is measured. Prints
figures, asserts nothing.

    python bench/pipeline.py --tower tiny --device cpu --images 256 --procs-per-gpu 1,2
    python bench/pipeline.py --tower large14 --device cuda --decode gpu,exact --procs-per-gpu 1,4 \\
        --images 2048 --seconds 10 --out /tmp/pipeline.md
    python bench/pipeline.py --tower large14 --device cuda --skip ii,iii,iv --model-batches 32,64 \\
        --compile default --data /tmp/rs-data      # (i) compiled; the compile time in the row

``--data DIR`` keeps the tower and the JPEGs in DIR and reuses them on the next run (bench/gpu.sh
runs several short invocations, each under its own time cap, on one set of files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, TOWERS, Table, build, machine_line, make_jpegs, percentile  # noqa: E402

_HURRY = False  # set on SIGTERM (e.g. gpu.sh's time cap): stop workers fast, leave nothing behind
COLUMNS = ["path", "decode", "procs", "images", "images/s", "p50 ms", "p99 ms", "mean batch"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout} s")


class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port (``BENCH_REDIS_SERVER`` or the
    one on PATH), no persistence, noeviction as a broker's Redis must be."""

    def __init__(self, log_dir: Path) -> None:
        binary = os.environ.get("BENCH_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise SystemExit("pipeline.py: no redis-server (PATH or BENCH_REDIS_SERVER)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(log_dir / "redis.log", "wb")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a time cap's signal to our group must not take it first
        )
        import redis

        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, 20, "private redis-server")
        client.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


class BenchWorker:
    """``realscore worker --procs-per-gpu P`` as a subprocess, its metrics on consecutive ports."""

    def __init__(self, env: dict[str, str], procs: int, log_path: Path, cwd: Path = ROOT) -> None:
        self.metrics_port = free_port() if procs == 1 else _free_run(procs)
        self.env = {**env, "REALSCORE_METRICS_PORT": str(self.metrics_port)}
        self.procs = procs
        self.nodes = ["bench@localhost"] if procs == 1 else [f"bench-{p}@localhost" for p in range(procs)]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [sys.executable, "-m", "shared.cli", "worker", "-n", "bench@localhost"]
        if procs > 1:
            command[4:4] = ["--procs-per-gpu", str(procs)]
        self.process = subprocess.Popen(
            command, env=self.env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, app, timeout: float) -> None:
        def all_answer() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            replies = app.control.ping(destination=self.nodes, timeout=0.5)
            return {node for reply in replies for node in reply} >= set(self.nodes)

        wait_until(all_answer, timeout, "worker processes answer ping")

    def batches(self) -> tuple[float, float]:
        """(forward passes, images in them) summed over the processes' metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        count = total = 0.0
        for port in range(self.metrics_port, self.metrics_port + self.procs):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:
                return float("nan"), float("nan")
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "realscore_batch_size_count":
                        count += sample.value
                    elif sample.name == "realscore_batch_size_sum":
                        total += sample.value
        return count, total

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(4 if _HURRY else 90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def _free_run(count: int) -> int:
    """The first of ``count`` consecutive free ports (the supervisor gives child k base + k)."""
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base + 1, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def _mean_batch(before: tuple[float, float], after: tuple[float, float]) -> str:
    batches, images = after[0] - before[0], after[1] - before[1]
    return f"{images / batches:.1f}" if batches > 0 else "-"


def prepare_data(root: Path, tower: str, images: int) -> tuple[Path, Path, list[str]]:
    """The tower, its head and ``images`` JPEGs under ``root``, reused when a previous run with
    the same tower left them there (a ``done`` marker is written last)."""
    marker = root / f"done-{tower}-{images}"
    if marker.exists():
        paths = sorted(str(p) for p in (root / "images").glob("photo*.jpg"))[:images]
        return root / "clip", root / "head.pth", paths
    tower_dir, head = build(root, tower)
    paths = make_jpegs(root / "images", images)
    marker.touch()
    return tower_dir, head, paths


def model_alone(loaded, paths: list[str], batch: int, seconds: float) -> tuple[float, int]:
    """Images/s of the model as a ``score`` task runs it (``launch`` + ``collect``, no features
    copied back) on a CPU batch of real preprocessed images: the copy to the device included."""
    import torch

    from worker.model.decode import decode

    pixels = [loaded.preprocessing(decode(Path(p).read_bytes(), max_pixels=10**9)) for p in paths[:batch]]
    while len(pixels) < batch:
        pixels += pixels[: batch - len(pixels)]
    stacked = torch.stack(pixels)
    loaded.collect(loaded.launch(stacked))  # warm-up
    done, started = 0, time.perf_counter()
    while True:
        loaded.collect(loaded.launch(stacked))  # waits for the device: synchronised
        done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 2 * batch:
            return done / elapsed, done


def in_process(loaded, settings, paths: list[str]) -> tuple[float, float, float]:
    """(images/s, mean batch, seconds to start: a compile's included) of one ``ScoringService``
    scoring ``paths`` from its thread pool."""
    from worker.serving.service import ScoringService

    began = time.perf_counter()
    service = ScoringService(loaded, settings, local_roots=None).start()
    start_s = time.perf_counter() - began
    try:
        service.score_uris(paths[: 2 * settings.max_batch_size])  # warm-up
        batches = service.batcher.batches_run
        started = time.perf_counter()
        results = service.score_uris(paths)
        elapsed = time.perf_counter() - started
        batches = service.batcher.batches_run - batches
    finally:
        service.stop()
    _check(results)
    return len(paths) / elapsed, len(paths) / max(batches, 1), start_s


def _check(results: list[dict]) -> None:
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} images failed, e.g. {bad[0]}")


def single_image_callers(paths: list[str], callers: int, seconds: float) -> tuple[float, list[float], int]:
    """``client.score`` in a loop from ``callers`` threads for ``seconds``: (images/s, latencies
    in ms, failures)."""
    from shared import client

    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds

    def caller() -> None:
        while time.monotonic() < deadline:
            with lock:
                path = paths[next(counter) % len(paths)]
            started = time.perf_counter()
            try:
                ok = client.score(path, timeout=60)["ok"]
            except Exception:  # noqa: BLE001 - a bench counts failures, it does not stop on them
                ok = False
            elapsed_ms = (time.perf_counter() - started) * 1000
            with lock:
                if ok:
                    latencies.append(elapsed_ms)
                else:
                    failures[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, failures[0]


def settings_for(mode: str, args: argparse.Namespace, **overrides: object):
    from shared.settings import Settings, load_settings

    values: dict[str, object] = dict(overrides)
    if args.compile != "off":
        values["compile"] = args.compile
    if "decode" in Settings.model_fields:
        values["decode"] = mode
    elif mode != "exact":
        raise SystemExit(f"pipeline.py: --decode {mode}: this checkout has no REALSCORE_DECODE")
    if args.batch:
        values["max_batch_size"] = args.batch
    return load_settings(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--decode", default="exact", help="comma-separated decode modes")
    parser.add_argument("--procs-per-gpu", default="1,2", help="comma-separated process counts")
    parser.add_argument("--images", type=int, default=256, help="distinct 1024x768 JPEGs")
    parser.add_argument("--batch", type=int, default=0, help="MAX_BATCH_SIZE (default: the setting's)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of (i) and of each (iv)")
    parser.add_argument("--callers", type=int, default=64, help="threads calling client.score in (iv)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a worker to start")
    parser.add_argument("--out", type=Path, default=None, help="append the tables to this file")
    parser.add_argument("--skip", default="", help="comma-separated paths to skip: i,ii,iii,iv")
    parser.add_argument("--model-batches", default="", help="comma-separated batch sizes for (i) "
                        "(default: MAX_BATCH_SIZE)")
    parser.add_argument("--compile", default="off", help="REALSCORE_COMPILE for every path: (i) "
                        "compiles each of its batch sizes and shows the compile time; off by default")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for (i)")
    parser.add_argument("--data", type=Path, default=None, help="keep and reuse tower and JPEGs here")
    args = parser.parse_args()
    def hurry(signum: int, _frame: object) -> None:
        global _HURRY
        _HURRY = True
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop our processes

    signal.signal(signal.SIGTERM, hurry)
    modes = [m for m in args.decode.split(",") if m]
    procs_list = [int(p) for p in args.procs_per_gpu.split(",") if p]
    skip = set(args.skip.split(","))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = open(args.out, "a") if args.out else None
    with tempfile.TemporaryDirectory(prefix="realscore-pipeline-") as tmp:
        root = Path(tmp)
        data = args.data or root
        data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tower_dir, head, paths = prepare_data(data, args.tower, args.images)
        prepared_s = time.perf_counter() - started

        from worker.model.loader import load_model

        loaded = load_model(str(tower_dir), head, device=args.device, dtype=args.dtype)
        base = settings_for(modes[0], args)
        notes = [
            f"- machine: {machine_line(args.device)}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}`",
            f"- tower {args.tower} ({str(loaded.dtype).removeprefix('torch.')}) on {loaded.device}, "
            f"{len(paths)} photo-like 1024x768 JPEGs (built in {prepared_s:.0f} s), "
            f"MAX_BATCH_SIZE {base.max_batch_size}, {base.task_concurrency} task threads per process, "
            f"{args.callers} callers for (iv), REALSCORE_COMPILE {args.compile}"
            + (f", GIL switch interval {base.switch_interval_ms:g} ms"
               if hasattr(base, "switch_interval_ms") else ""),
        ]
        table = Table("Pipeline: images/s by layer", COLUMNS, out, notes)
        if "i" not in skip:
            batches = [int(b) for b in args.model_batches.split(",") if b] or [base.max_batch_size]
            for batch in batches:
                label = "(i) model alone, launch + collect"
                if args.compile != "off":
                    print(f"pipeline.py: compiling ({args.compile}) for batch {batch}...", flush=True)
                    began = time.perf_counter()
                    loaded.compile(args.compile, [batch], backend=args.compile_backend)
                    took = time.perf_counter() - began
                    label += f", compiled {args.compile} ({took:.0f} s to compile)"
                    print(f"pipeline.py: compiled {args.compile} for batch {batch} in {took:.1f} s", flush=True)
                rate, done = model_alone(loaded, paths, batch, args.seconds)
                table.row(label, "-", "-", done, rate, "-", "-", batch)
            loaded.compiled_sizes, loaded._features = (), None  # (ii) compiles as the service does

        redis_server = None if {"iii", "iv"} <= skip else PrivateRedis(root)
        try:
            for mode in modes:
                if _HURRY:
                    break
                settings = settings_for(mode, args)
                if "ii" not in skip:
                    label = "(ii) ScoringService, in process"
                    try:
                        rate, mean, start_s = in_process(loaded, settings, paths)
                    except Exception as error:  # noqa: BLE001 - e.g. a graph capture: say so, go on
                        reason = str(error).splitlines()[0][:160] if str(error) else ""
                        table.row(f"{label}: failed: {type(error).__name__}: {reason}", mode, 1,
                                  "-", "-", "-", "-", "-")
                        continue
                    if args.compile != "off":  # compiled by start(), on the batcher thread
                        label += f", compiled {args.compile} ({start_s:.0f} s to start)"
                    table.row(label, mode, 1, len(paths), rate, "-", "-", f"{mean:.1f}")
                if redis_server is None:
                    continue
                for procs in procs_list:
                    if _HURRY:
                        break
                    _through_worker(table, args, mode, procs, paths, tower_dir, head, redis_server, root, skip)
        finally:
            if redis_server is not None:
                redis_server.stop()
    if out is not None:
        out.close()


def _through_worker(table, args, mode, procs, paths, tower_dir, head, redis_server, root, skip) -> None:
    """(iii) and (iv) through a real worker group of ``procs`` processes."""
    from shared import client
    from shared.celery_app import app, configure
    from shared.settings import load_settings

    configure(app, load_settings(broker_url=redis_server.url, result_backend=redis_server.url))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "REALSCORE_MODEL": str(tower_dir),
        "REALSCORE_HEAD_WEIGHTS": str(head),
        "REALSCORE_DEVICE": args.device,
        "REALSCORE_DTYPE": args.dtype,
        "REALSCORE_DECODE": mode,
        "REALSCORE_BROKER_URL": redis_server.url,
        "REALSCORE_RESULT_BACKEND": redis_server.url,
        "REALSCORE_LOCAL_ROOTS": json.dumps([str(Path(paths[0]).parent)]),
        "REALSCORE_CACHE_URL": "",
        "REALSCORE_COMPILE": args.compile,
    }
    if args.batch:
        env["REALSCORE_MAX_BATCH_SIZE"] = str(args.batch)
    worker = BenchWorker(env, procs, root / f"worker-{mode}-{procs}.log")
    try:
        worker.wait_ready(app, args.start_timeout)
        _check(client.score_many(paths[: min(len(paths), 64 * procs)], timeout=300))  # warm-up
        if "iii" not in skip:
            before = worker.batches()
            started = time.perf_counter()
            results = client.score_many(paths, timeout=600)
            elapsed = time.perf_counter() - started
            _check(results)
            table.row("(iii) worker, client.score_many", mode, procs, len(paths), len(paths) / elapsed,
                      "-", "-", _mean_batch(before, worker.batches()))
        if "iv" not in skip:
            before = worker.batches()
            rate, latencies, failures = single_image_callers(paths, args.callers, args.seconds)
            label = f"(iv) worker, client.score x {args.callers} threads"
            if failures:
                label += f" ({failures} failed)"
            table.row(label, mode, procs, len(latencies), rate, f"{percentile(latencies, 50):.0f}",
                      f"{percentile(latencies, 99):.0f}", _mean_batch(before, worker.batches()))
    except Exception as error:  # noqa: BLE001 - report and go on to the next configuration
        if _HURRY:
            return
        table.row(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", mode, procs,
                  "-", "-", "-", "-", "-")
        print(worker.log_tail(), file=sys.stderr, flush=True)
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
