"""Peak RSS of ``realscore backfill`` against the size of its listing: it should stay flat.

Each measurement is one fresh process running ``realscore backfill``, which reports its own peak
RSS (``VmHWM`` of ``/proc/self/status``: the high-water mark of the image it exec'ed; a child's
``ru_maxrss`` would include the pages it shared with this process, moto's buckets and all,
between fork and exec). Measured:

1. a local tree of small PNGs, ``--dry-run`` (listing plus the SQLite lookups);
2. the same tree once every file is done (a rerun: listing, skipping through the SQLite state,
   the whole driver loop; needs Redis for the workers' ping, no worker);
3. an S3 prefix on moto's standalone server, ``--dry-run`` (boto3's paginator over HTTP). moto
   sorts the whole bucket for every 1000-key page, so its listing time grows with the square of
   the bucket: 200 000 keys take over half an hour on the 2-core VM; ``--s3-keys`` picks the size.

    python bench/backfill_memory.py --local 2000 20000 --s3-keys 2000 20000

Prints a markdown table; figures go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
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


def peak_rss_mib(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, last line) of one ``realscore backfill`` process."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _RUN, "backfill", *args], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"backfill failed:\n{result.stderr}")
    lines = result.stderr.strip().splitlines()
    peak_kib = int(lines[-1].split()[1])
    return peak_kib / 1024, time.monotonic() - started, lines[-2]


def make_tree(root: Path, count: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, "PNG")
    data = buffer.getvalue()
    for index in range(count):
        folder = root / f"{index // 1000:03d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{index:07d}.png").write_bytes(data)


def mark_all_done(root: Path, out: Path) -> None:
    """The state a finished run leaves (rows themselves are not needed to skip)."""
    state = BackfillState(state_path(str(out)))
    state.bind(source=f"{root} glob=None", format="jsonl")
    uris = list(iter_local(str(root)))
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
        rss, seconds, last = peak_rss_mib([str(root), "--out", str(work / f"dry-{size}.jsonl"), "--dry-run"], {})
        rows.append(f"| local tree, --dry-run | {size} | {rss:.0f} | {seconds:.1f} |")
        print(rows[-1], "  ", last, flush=True)
        out = work / f"done-{size}.jsonl"
        mark_all_done(root, out)
        env = {"REALSCORE_BROKER_URL": redis_url, "REALSCORE_RESULT_BACKEND": redis_url}
        rss, seconds, last = peak_rss_mib([str(root), "--out", str(out)], env)
        rows.append(f"| local tree, rerun with every file done | {size} | {rss:.0f} | {seconds:.1f} |")
        print(rows[-1], "  ", last, flush=True)
    return rows


def s3_rows(sizes: list[int], work: Path) -> list[str]:
    import boto3
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    from tests.processes import free_port

    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(credentials)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    rows = []
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for size in sizes:
            bucket = f"bench-{size}"
            s3.create_bucket(Bucket=bucket)
            backend = s3_backends["123456789012"]["global"]
            for index in range(size):  # straight into moto's store: 100x faster than PUTs
                backend.put_object(bucket, f"media/{index // 1000:03d}/{index:07d}.jpg", b"x")
            backend.put_object(bucket, "elsewhere/x.jpg", b"x")
            env = {**credentials, "REALSCORE_S3_ENDPOINT_URL": endpoint}
            args = [f"s3://{bucket}/media/", "--out", str(work / f"s3-{size}.jsonl"), "--dry-run"]
            rss, seconds, last = peak_rss_mib(args, env)
            rows.append(f"| S3 prefix on moto, --dry-run | {size} | {rss:.0f} | {seconds:.1f} |")
            print(rows[-1], "  ", last, flush=True)
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--s3-keys", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="for the rerun's ping")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print("| listing | objects | peak RSS MiB | seconds |\n| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        rows = local_rows(args.local, Path(tmp), args.redis) + s3_rows(args.s3_keys, Path(tmp))
    print("\n".join(["", "| listing | objects | peak RSS MiB | seconds |", "| --- | ---: | ---: | ---: |", *rows]))


if __name__ == "__main__":
    main()
