"""Peak RSS of ``realscore backfill`` against the size of its listing: it should stay flat.

Each measurement is one fresh process running ``realscore backfill``, which reports its own peak
RSS (``VmHWM`` of ``/proc/self/status``: the high-water mark of the image it exec'ed; a child's
``ru_maxrss`` would include the pages it shared with this process, moto's buckets and all,
between fork and exec), its wall time and CPU time, and this process's CPU time meanwhile (moto's
server threads, when the backfill lists or reads S3). Measured:

1. a local tree of small PNGs, ``--dry-run`` (listing plus the SQLite lookups);
2. the same tree once every file is done (a rerun: listing, skipping through the SQLite state,
   the whole driver loop; needs Redis for the workers' ping, no worker);
3. an S3 prefix on moto's standalone server, ``--dry-run``: the listing itself (boto3's
   paginator over HTTP, 1000 keys a page) and the lookups in an empty state;
4. with ``--s3-resume``, the same prefix resumed with all but ``--score`` keys done (spread
   evenly through the listing): the whole listing over HTTP, the skips through an SQLite state
   of that size, and the ``--score`` others sent in chunks to a real ``realscore worker`` (tiny
   tower, its own redis-server), which reads them from moto and scores them; every row checked.

The keys are put straight into moto's store, not by PUTs over HTTP (``--put-sample`` measures
how long PUTs would take); only the listing and the workers' reads go over HTTP. moto sorts and
scans the whole bucket for every 1000-key page, so its listing time grows with the square of the
bucket, and on this CPU that is most of the wall time at 200 000 keys (the moto column).

    python bench/backfill_memory.py --local 2000 20000 --s3-keys 20000 100000 200000 \
        --s3-resume 20000 200000 --put-sample 2000

Prints markdown tables; figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.backfill_state import BackfillState, state_path  # noqa: E402
from shared.listing import iter_local  # noqa: E402


_RUN = """
import re, sys
from shared.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("VmHWM_KiB", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), file=sys.stderr)
sys.exit(code)
"""
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
COLUMNS = ("| listing | objects | peak RSS MiB | seconds | backfill CPU s | moto server CPU s |\n"
           "| --- | ---: | ---: | ---: | ---: | ---: |")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Run:
    peak_mib: float  # the backfill process's own VmHWM
    seconds: float  # its wall time, start-up included
    cpu: float  # its CPU seconds (user + system)
    here_cpu: float  # this process's CPU seconds meanwhile: moto's server threads, when serving
    last: str  # its summary line


def backfill(args: list[str], env: dict[str, str]) -> Run:
    """One ``realscore backfill`` process, measured."""
    started, cpu, here = time.monotonic(), _children_cpu(), time.process_time()
    result = subprocess.run(
        [sys.executable, "-c", _RUN, "backfill", *args], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True,
    )
    seconds, here_cpu, cpu = time.monotonic() - started, time.process_time() - here, _children_cpu() - cpu
    if result.returncode != 0:
        raise RuntimeError(f"backfill failed:\n{result.stderr}")
    lines = result.stderr.strip().splitlines()
    return Run(int(lines[-1].split()[1]) / 1024, seconds, cpu, here_cpu, lines[-2])


def row(listing: str, objects: int, run: Run, server: bool = False) -> str:
    moto = f"{run.here_cpu:.1f}" if server else "–"
    line = f"| {listing} | {objects} | {run.peak_mib:.0f} | {run.seconds:.1f} | {run.cpu:.1f} | {moto} |"
    print(line, "  ", run.last, flush=True)
    return line


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def make_tree(root: Path, count: int) -> None:
    data = small_png()
    for index in range(count):
        folder = root / f"{index // 1000:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{index:07d}.png").write_bytes(data)


def mark_done(source: str, uris: list[str], out: Path) -> None:
    """The state a run that wrote ``uris`` leaves (rows themselves are not needed to skip)."""
    state = BackfillState(state_path(str(out)))
    state.bind(source=f"{source} glob=None", format="jsonl")
    for start in range(0, len(uris), 1000):
        state.begin_rows((uri, "ok") for uri in uris[start : start + 1000])
        state.commit(0)
    state.close()
    out.write_bytes(b"")


def local_rows(sizes: list[int], work: Path, redis_url: str) -> list[str]:
    rows = []
    for size in sizes:
        root = work / f"tree-{size}"
        root.mkdir()
        make_tree(root, size)
        run = backfill([str(root), "--out", str(work / f"dry-{size}.jsonl"), "--dry-run"], {})
        rows.append(row("local tree, --dry-run", size, run))
        out = work / f"done-{size}.jsonl"
        mark_done(str(root), list(iter_local(str(root))), out)
        env = {"REALSCORE_BROKER_URL": redis_url, "REALSCORE_RESULT_BACKEND": redis_url}
        rows.append(row("local tree, rerun with every file done", size, backfill([str(root), "--out", str(out)], env)))
    return rows


def s3_key(index: int) -> str:
    return f"media/{index // 1000:03d}/{index:07d}.png"


class Moto:
    """moto's standalone S3 server, in this process, over HTTP on a loopback port."""

    def __init__(self) -> None:
        import boto3
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends
        from moto.server import ThreadedMotoServer

        from tests.processes import free_port

        os.environ.update(CREDENTIALS)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        self.backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]

    def fill(self, bucket: str, size: int, data: bytes) -> float:
        """``size`` keys under ``media/`` (and one elsewhere) straight into moto's store; seconds."""
        self.client.create_bucket(Bucket=bucket)
        started = time.monotonic()
        for index in range(size):
            self.backend.put_object(bucket, s3_key(index), data)
        self.backend.put_object(bucket, "elsewhere/x.png", data)
        return time.monotonic() - started

    def put_rate(self, bucket: str, count: int, threads: int, data: bytes) -> float:
        """PUTs per second over HTTP from ``threads`` threads sharing one boto3 client."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              config=Config(max_pool_connections=threads))
        client.create_bucket(Bucket=bucket)
        started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=s3_key(i), Body=data), range(count)))
        return count / (time.monotonic() - started)

    def stop(self) -> None:
        self.server.stop()


class Worker:
    """One ``realscore worker`` (tiny tower) on its own redis-server, reading S3 from moto."""

    def __init__(self, work: Path, endpoint: str) -> None:
        from contextlib import ExitStack

        from shared.celery_app import app, configure
        from shared.settings import load_settings
        from tests.processes import WorkerProcess
        from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip
        from tests.worker_helpers import private_redis

        self._stack = ExitStack()
        url = self._stack.enter_context(private_redis())
        clip = make_tiny_clip(work / "clip")
        head = make_seed_checkpoint(work / "head.pth", clip)
        self.env = {**CREDENTIALS, "REALSCORE_BROKER_URL": url, "REALSCORE_RESULT_BACKEND": url,
                    "REALSCORE_S3_ENDPOINT_URL": endpoint}
        worker_env = {**self.env, "REALSCORE_MODEL": str(clip), "REALSCORE_HEAD_WEIGHTS": str(head),
                      "REALSCORE_DEVICE": "cpu", "REALSCORE_S3_BUCKETS": '["*"]',
                      "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        configure(app, load_settings(broker_url=url, result_backend=url))
        self.process = WorkerProcess(worker_env, work / "worker.log").start()
        self._stack.callback(self.process.stop)
        self.process.wait_ready(app)

    def stop(self) -> None:
        self._stack.close()


def resume_row(bucket: str, size: int, score: int, work: Path, worker: Worker) -> str:
    """The prefix resumed with all but ``score`` keys done, those scored by the worker."""
    step = max(1, size // score)
    undone = set(range(0, size, step))
    out = work / f"resume-{size}.jsonl"
    mark_done(f"s3://{bucket}/media/", [f"s3://{bucket}/{s3_key(i)}" for i in range(size) if i not in undone], out)
    run = backfill([f"s3://{bucket}/media/", "--out", str(out)], worker.env)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(undone) and all(r["ok"] for r in rows), run.last
    assert {r["uri"] for r in rows} == {f"s3://{bucket}/{s3_key(i)}" for i in undone}
    return row(f"S3 prefix on moto, rerun with all but {len(undone)} done, those scored", size, run, server=True)


def s3_rows(dry: list[int], resume: list[int], score: int, put_sample: int, work: Path) -> list[str]:
    moto = Moto()
    worker = None
    data = small_png()
    rows = []
    try:
        if put_sample:
            for threads in (1, 16):
                rate = moto.put_rate(f"puts-{threads}", put_sample, threads, data)
                print(f"PUT over HTTP, {threads} threads: {put_sample} keys at {rate:.0f}/s; "
                      f"200 000 keys would take {200_000 / rate / 60:.1f} min", flush=True)
        for size in sorted(set(dry) | set(resume)):
            bucket = f"bench-{size}"
            seconds = moto.fill(bucket, size, data)
            print(f"{size} keys put into moto's store in {seconds:.1f} s", flush=True)
            if size in dry:
                args = [f"s3://{bucket}/media/", "--out", str(work / f"s3-{size}.jsonl"), "--dry-run"]
                env = {**CREDENTIALS, "REALSCORE_S3_ENDPOINT_URL": moto.endpoint}
                rows.append(row("S3 prefix on moto, --dry-run", size, backfill(args, env), server=True))
            if size in resume:
                worker = worker or Worker(work, moto.endpoint)
                rows.append(resume_row(bucket, size, score, work, worker))
    finally:
        if worker is not None:
            worker.stop()
        moto.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--s3-keys", type=int, nargs="*", default=[2000, 20000], help="--dry-run sizes")
    parser.add_argument("--s3-resume", type=int, nargs="*", default=[], help="resumed-run sizes")
    parser.add_argument("--score", type=int, default=1000, help="keys left to score in a resumed run")
    parser.add_argument("--put-sample", type=int, default=0, help="keys PUT over HTTP to time it")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="for the local rerun's ping")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        rows = local_rows(args.local, Path(tmp), args.redis)
        rows += s3_rows(args.s3_keys, args.s3_resume, args.score, args.put_sample, Path(tmp))
    print("\n".join(["", COLUMNS, *rows]))


if __name__ == "__main__":
    main()
