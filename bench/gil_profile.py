"""Who holds the GIL while ``ScoringService`` scores: py-spy's ``--gil`` samples, by thread and
by function.

The H100 figures say the service is bounded by something other than the GPU: ~770 images/s in
``gpu`` mode whatever MAX_BATCH_SIZE (32, 64, 128), against 1 846 for the model alone. If that
bound is the one GIL the batcher thread shares with the task threads, the GIL is held nearly all
the time while it runs, and these samples say by whom and in what. A child process loads the
model, starts the service and warms it up; then ``py-spy record --gil`` samples it for
``--seconds`` while it scores the files over and over (``score_uris``, the path of ``score_many``).

Prints: images/s while sampled; the share of sampling ticks at which some thread held the GIL
(near 100 %: the GIL is the bound); that time split by thread kind (batcher, lane/fetch threads,
other); and the functions the GIL holders were in (self and inclusive). ``--all`` samples every
thread that is not idle instead (CPU, not GIL). Needs ``py-spy`` (``pip install py-spy``) on PATH
or beside this Python, and the right to trace a child (root, or ptrace allowed). Prints figures,
asserts nothing.

    python bench/gil_profile.py --tower tiny --device cpu --decode gpu --seconds 10
    python bench/gil_profile.py --tower large14 --device cuda --decode gpu --data /tmp/rs-data --out gil-profile.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOWERS, machine_line, py_spy_frame  # noqa: E402

THREAD_KINDS = (("watchdog", "batcher's watchdog"), ("realscore-batcher", "batcher"),
                ("realscore-interactive", "lane threads"), ("realscore-bulk", "lane threads"),
                ("realscore-fetch", "fetch helpers"))


def child(args: argparse.Namespace) -> None:
    """Load, start, warm up; say READY; on GO, score the files for ``--seconds``; say the rate."""
    from bench.pipeline import prepare_data, settings_for
    from worker.model.loader import load_model
    from worker.serving.service import ScoringService

    tower_dir, head, paths = prepare_data(args.data, args.tower, args.images)
    loaded = load_model(str(tower_dir), head, device=args.device, dtype="auto")
    settings = settings_for(args.decode, args)
    service = ScoringService(loaded, settings, local_roots=None).start()
    try:
        service.score_uris(paths[: 2 * settings.max_batch_size])
        print("READY", flush=True)
        sys.stdin.readline()
        scored, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            results = service.score_uris(paths)
            scored += sum(r["ok"] for r in results)
        elapsed = time.perf_counter() - started
        print(json.dumps({"images_per_s": scored / elapsed, "seconds": elapsed}), flush=True)
    finally:
        service.stop()


def _thread_kind(frame: str) -> str:
    for marker, kind in THREAD_KINDS:
        if marker in frame:
            return kind
    return "other"


def summarise(raw: Path, ticks: int, top: int) -> list[str]:
    """Markdown lines: GIL (or CPU) share, by thread kind and by function, from py-spy's raw
    stacks (``--threads``: the first frame names the thread)."""
    by_kind: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        names = [py_spy_frame(frame) for frame in frames]
        total += count
        by_kind[_thread_kind(thread)] += count
        for name in set(names):
            inclusive[name] += count
        if names:
            own[names[-1]] += count
    lines = [f"- samples: {total} of {ticks} ticks (**{total / max(ticks, 1):.0%}**)\n",
             "| thread kind | share of ticks |", "| --- | ---: |"]
    lines += [f"| {kind} | {count / max(ticks, 1):.1%} |" for kind, count in by_kind.most_common()]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines += ["", f"| function ({title}) | share of samples |", "| --- | ---: |"]
        lines += [f"| `{name}` | {count / max(total, 1):.1%} |" for name, count in counter.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode", default="gpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=0, help="MAX_BATCH_SIZE (default: the setting's)")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--all", action="store_true", help="sample busy threads (CPU), not GIL holders")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--data", type=Path, default=None, help="keep and reuse tower and JPEGs here")
    parser.add_argument("--out", type=Path, default=None, help="append the tables to this file")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw stacks here")
    parser.add_argument("--py-spy", default=None, help="the py-spy binary (default: PATH, else beside python)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child:
        child(args)
        return

    py_spy = shutil.which(args.py_spy or "py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("gil_profile.py: py-spy not found (pip install py-spy)")
    with tempfile.TemporaryDirectory(prefix="realscore-gil-") as scratch:
        data = args.data or Path(scratch) / "data"
        data.mkdir(parents=True, exist_ok=True)
        raw = args.raw or Path(scratch) / "stacks.txt"
        command = [sys.executable, __file__, "--child", *sys.argv[1:]]
        if args.data is None:
            command += ["--data", str(data)]
        worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdin is not None and worker.stdout is not None
            if worker.stdout.readline().strip() != "READY":
                raise SystemExit(f"gil_profile.py: the service did not start (exit {worker.wait()})")
            sampled = int(args.seconds * 0.9)  # within the scoring loop, not past its end
            record = [py_spy, "record", "--pid", str(worker.pid), "--rate", str(args.rate),
                      "--duration", str(sampled), "--format", "raw", "--threads", "--nonblocking",
                      "-o", str(raw)]
            if not args.all:
                record.append("--gil")
            worker.stdin.write("GO\n")
            worker.stdin.flush()
            spy = subprocess.run(record, capture_output=True, text=True, timeout=sampled + 60)
            figures = json.loads(worker.stdout.readline())
            worker.wait(60)
        finally:
            if worker.poll() is None:
                worker.kill()
        if spy.returncode != 0 or not raw.exists():
            raise SystemExit(f"gil_profile.py: py-spy failed: {spy.stderr.strip()[-800:]}")
        what = "busy threads (CPU)" if args.all else "GIL holders"
        lines = [
            f"\n### {what} while `ScoringService` scores (`bench/gil_profile.py`)\n",
            f"- machine: {machine_line(args.device)}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `python bench/gil_profile.py {' '.join(sys.argv[1:])}`",
            f"- tower {args.tower}, decode {args.decode}, {figures['images_per_s']:.1f} images/s while "
            f"sampled ({args.rate}/s for {sampled} s)",
            *summarise(raw, args.rate * sampled, args.top),
        ]
    print("\n".join(lines), flush=True)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
