"""Per-image overhead of ``ScoringService`` outside the model: small JPEGs (decode and resize are
cheap), the tiny tower, ``REALSCORE_DECODE=gpu`` (torchvision's decode_jpeg, on the CPU here).

Each measurement runs in a child process that imports the service from one checkout: this one,
and with ``--before`` another (e.g. main in a temporary ``git worktree``), the two alternating
round by round in one run, on the same files. Per child (best of ``--passes``):

- ``prepare``: one thread calls ``service.prepare(uri)`` (fetch through the deadline helper,
  sha256, header check, the mode's stage) for every file: process CPU ms per image;
- ``score_uris``: the whole service (task threads, batcher, model, results) on the same files:
  process CPU ms per image (``time.process_time``), of which the batcher thread's
  (``pthread_getcpuclockid``; on a CPU that is mostly the tiny forward, decode and resize, the
  device's work on a GPU host; torch runs single-threaded in the child so that work stays on
  the batcher thread) and the rest (task and fetch threads: the host work per image
  that competes for the GIL on a GPU host); and images/s, which on a loaded 2-core machine says
  little.

Prints a markdown table of medians over ``--rounds`` with the after/before ratio, asserts nothing.

    git worktree add --detach /tmp/before main
    python bench/service_overhead.py --before /tmp/before --images 512 --rounds 5

``--before`` may be given several times (e.g. two older commits): every checkout runs once per
round, in the order given and then this one, and each ratio is against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = {
    "prepare_cpu_ms": "prepare, one thread: process CPU ms/image",
    "score_cpu_ms": "score_uris: process CPU ms/image",
    "batcher_cpu_ms": "… of which the batcher thread (decode, resize, forward here)",
    "other_cpu_ms": "… of which all other threads (fetch, header, stage, hand-off, results)",
    "switches": "score_uris: voluntary context switches per image (a thread blocked: lock, GIL, I/O)",
    "preempted": "score_uris: involuntary context switches per image (preempted: machine load)",
    "images_per_s": "score_uris: images/s (wall clock, loaded machine)",
}


def _context_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all this process's threads so far (Linux
    ``/proc``; zeros elsewhere): a thread that blocks (a lock, the GIL, a wake-up it waits for)
    switches voluntarily; one preempted by the scheduler (machine load) involuntarily."""
    voluntary = involuntary = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def child(args: argparse.Namespace) -> None:
    """Measure the service of the checkout ``args.child``; print one JSON line."""
    sys.path.insert(0, str(args.child))
    import torch

    # The model's and resize's work then runs on the batcher thread itself, not in an intra-op
    # pool whose (spinning) threads would land in "all other threads".
    torch.set_num_threads(1)
    from shared.settings import load_settings
    from worker.model.loader import load_model
    from worker.serving.service import ScoringService

    import worker

    assert Path(worker.__file__).resolve().is_relative_to(args.child.resolve()), worker.__file__
    root = args.data
    paths = sorted(str(p) for p in (root / f"images-{args.size}").glob("*.jpg"))[: args.images]
    loaded = load_model(str(root / "clip"), root / "head.pth", device="cpu", dtype="auto")
    settings = load_settings(decode=args.decode, max_batch_size=args.batch)
    service = ScoringService(loaded, settings, local_roots=[root], threads=args.threads or None).start()
    best: dict[str, float] = {}
    try:
        service.score_uris(paths[: 2 * args.batch])  # warm-up: threads, helpers, allocator
        clock = time.pthread_getcpuclockid(service.batcher._thread.ident)
        for _ in range(args.passes):
            started = time.process_time()
            for path in paths:
                held = getattr(service.prepare(path), "held", None)
                if held is not None:  # not scored: give its pixel budget back (main since 726d49d)
                    held.release()
            figures = {"prepare_cpu_ms": (time.process_time() - started) * 1000 / len(paths)}
            switches = _context_switches()
            cpu, batcher, wall = time.process_time(), time.clock_gettime(clock), time.perf_counter()
            results = service.score_uris(paths)
            wall = time.perf_counter() - wall
            switches = [after - before for after, before in zip(_context_switches(), switches)]
            batcher = time.clock_gettime(clock) - batcher
            cpu = time.process_time() - cpu
            bad = [r for r in results if not r["ok"]]
            if bad:
                raise SystemExit(f"{len(bad)} images failed, e.g. {bad[0]}")
            figures["score_cpu_ms"] = cpu * 1000 / len(paths)
            figures["batcher_cpu_ms"] = batcher * 1000 / len(paths)
            figures["other_cpu_ms"] = (cpu - batcher) * 1000 / len(paths)
            figures["switches"] = switches[0] / len(paths)
            figures["preempted"] = switches[1] / len(paths)
            figures["images_per_s"] = len(paths) / wall
            for name, value in figures.items():
                better = max if name == "images_per_s" else min
                best[name] = better(best.get(name, value), value)
    finally:
        service.stop()
    print(json.dumps(best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="256x192", help="JPEG size WxH")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per checkout")
    parser.add_argument("--passes", type=int, default=3, help="passes per child (best kept)")
    parser.add_argument("--decode", default="gpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="fetch threads (default TASK_CONCURRENCY)")
    parser.add_argument("--threads-before", type=int, default=None,
                        help="fetch threads for the --before checkouts (default: --threads)")
    parser.add_argument("--data", type=Path, default=None, help="reuse a built tower and images here")
    parser.add_argument(
        "--before", type=Path, action="append", default=[],
        help="another checkout to compare (repeat for several; ratios are against the first)",
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child is not None:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="realscore-overhead-") as tmp:
        root = (args.data or Path(tmp)).resolve()
        _prepare_data(root, args)
        trees = {tree.name if len(args.before) > 1 else "before": tree.resolve()
                 for tree in args.before}
        trees["after"] = ROOT
        runs: dict[str, list[dict[str, float]]] = {tag: [] for tag in trees}
        for _ in range(args.rounds):
            for tag, tree in trees.items():
                threads = args.threads if tree == ROOT or args.threads_before is None else args.threads_before
                runs[tag].append(_run_child(tree, root, args, threads))
    _print_table(runs, args)


def _prepare_data(root: Path, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.common import build, make_jpegs

    if not (root / "head.pth").exists():
        build(root, "tiny")
    width, height = (int(v) for v in args.size.split("x"))
    images = root / f"images-{args.size}"
    if len(list(images.glob("*.jpg"))) < args.images:
        make_jpegs(images, args.images, size=(width, height))


def _run_child(tree: Path, root: Path, args: argparse.Namespace, threads: int) -> dict[str, float]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", str(tree), "--data", str(root),
        "--images", str(args.images), "--size", args.size, "--passes", str(args.passes),
        "--decode", args.decode, "--batch", str(args.batch), "--threads", str(threads),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    tags = list(runs)
    print(f"{args.images} JPEGs {args.size}, decode={args.decode}, batch {args.batch}, "
          f"{args.threads or 'TASK_CONCURRENCY'} threads"
          + (f" ({args.threads_before or 'TASK_CONCURRENCY'} for --before)" if args.threads_before is not None else "")
          + f"; median of {args.rounds} child processes "
          f"per checkout, each the best of {args.passes} passes\n")
    ratios = [f"{tag}/{tags[0]}" for tag in tags[1:]]
    print("| per image | " + " | ".join([*tags, *ratios]) + " |")
    print("| --- | " + " | ".join("---:" for _ in [*tags, *ratios]) + " |")
    for name, label in METRICS.items():
        if any(name not in run for tag in tags for run in runs[tag]):
            continue  # an older checkout's child does not measure it
        medians = [statistics.median(run[name] for run in runs[tag]) for tag in tags]
        cells = [f"{m:.1f}" if name in ("images_per_s", "switches", "preempted") else f"{m:.3f}" for m in medians]
        ratio = [f"{m / medians[0]:.2f}" for m in medians[1:]]
        print("| " + " | ".join([label, *cells, *ratio]) + " |")
    for tag in tags:
        shown = ", ".join(f"{run['other_cpu_ms']:.3f}" for run in runs[tag])
        print(f"\n{tag}: other threads' CPU ms/image per child: {shown}", end="")
    print()


if __name__ == "__main__":
    main()
