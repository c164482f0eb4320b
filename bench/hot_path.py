"""Per-call cost of the hot path's steps, before and after: loads ``worker/serving/sources.py``,
``budget.py``, ``batcher.py`` and ``worker/model/decode.py`` (and ``jpeghead.py`` where the
checkout has it) from another checkout (``--before``, e.g. main in a temporary ``git worktree``)
beside this one, and times both in one process, interleaved, best of several runs:

- the fetch hand-off, ``Sources.fetch`` of a local file, and the local read alone (no helper);
- the header check as ``gpu`` mode needs it (format, mode, size, EXIF orientation) of ``--file``:
  Pillow's ``Image.open`` + ``getexif`` before, ``jpeghead.read_header`` where it exists;
- the pixel budget's hold + acquire/release;
- the batcher thread's CPU time per item (``pthread_getcpuclockid``), with a forward step that
  does nothing, fed by ``--threads`` threads that submit and wait, as task threads do;
- ``ScoringService.map``'s ordered map of a no-op over ``--threads`` threads (process CPU per
  item): ``worker/serving/lanepool.py`` where the checkout has it, else ``ThreadPoolExecutor.map``.

Prints a markdown table, asserts nothing.

    git worktree add --detach /tmp/before HEAD~1
    python bench/hot_path.py --before /tmp/before --file some.jpg
"""

from __future__ import annotations

import argparse
import importlib.util
import struct
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _hand_off(sources: ModuleType):
    """An empty job through the checkout's fetch deadline helper (moved to deadlines.py)."""
    if hasattr(sources, "_within_deadline"):  # older checkouts
        return lambda: sources._within_deadline(time.monotonic() + 10, "x", lambda: None)
    return lambda: sources.deadlines.within_deadline(time.monotonic() + 10, RuntimeError, lambda: None)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _best_us(function, calls: int, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def _batcher_us_per_item(module: ModuleType, threads: int, items: int) -> float:
    """Batcher-thread CPU µs per item: ``threads`` submitters, ``items`` items in all."""
    batcher = module.DynamicBatcher(
        lambda batch: batch, finish=lambda batch: batch, pipeline_depth=2,
        max_batch_size=32, max_wait_s=0.002,
    ).start()
    clock = time.pthread_getcpuclockid(batcher._thread.ident)
    per_thread = items // threads

    def submitter() -> None:
        for i in range(per_thread):
            batcher.submit(i).result()

    started = time.clock_gettime(clock)
    workers = [threading.Thread(target=submitter) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    spent = time.clock_gettime(clock) - started
    batcher.stop()
    return spent / (per_thread * threads) * 1e6


def _map_us_per_item(module: ModuleType | None, threads: int, items: int) -> float:
    """Process CPU µs per item of an ordered map of a no-op, ``items`` at a time, 5 maps."""
    if module is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads)
        run, stop = pool.map, pool.shutdown
    else:
        pool = module.LanePool(threads, "bench")
        run, stop = pool.imap, pool.shutdown
    work = list(range(items))
    list(run(lambda x: x, work))  # threads started
    started = time.process_time()
    for _ in range(5):
        list(run(lambda x: x, work))
    spent = time.process_time() - started
    stop()
    return spent / (5 * items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--file", type=Path, required=True, help="a local image to fetch")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=64, help="batcher submitters")
    parser.add_argument("--items", type=int, default=6400, help="batcher items per run")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT}
    sources = {tag: _load(f"{tag}_sources", tree / "worker/serving/sources.py") for tag, tree in trees.items()}
    budgets = {tag: _load(f"{tag}_budget", tree / "worker/serving/budget.py") for tag, tree in trees.items()}
    batchers = {tag: _load(f"{tag}_batcher", tree / "worker/serving/batcher.py") for tag, tree in trees.items()}
    decoders = {tag: _load(f"{tag}_decode", tree / "worker/model/decode.py") for tag, tree in trees.items()}
    heads = {
        tag: _load(f"{tag}_jpeghead", tree / "worker/model/jpeghead.py")
        for tag, tree in trees.items()
        if (tree / "worker/model/jpeghead.py").exists()
    }
    pools = {
        tag: _load(f"{tag}_lanepool", tree / "worker/serving/lanepool.py")
        if (tree / "worker/serving/lanepool.py").exists() else None
        for tag, tree in trees.items()
    }
    path = str(args.file.resolve())
    data = args.file.read_bytes()
    max_pixels = 50_000_000

    # The same picture as a phone would write it: an Exif block (orientation 6, a maker, a date)
    # and an ICC profile segment before the JFIF one.
    entries = [(0x010F, 2, 4, b"Cam\x00"), (0x0112, 3, 1, struct.pack("<HH", 6, 0)),
               (0x0132, 2, 20, struct.pack("<I", 8 + 2 + 3 * 12 + 4))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + b"2026:11:26 12:00:00\x00"
    icc = b"ICC_PROFILE\x00\x01\x01" + bytes(512)
    phone = data[:2] + b"".join(
        b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
        for marker, body in ((0xE1, b"Exif\x00\x00" + tiff), (0xE2, icc))
    ) + data[2:]

    def header_check(tag: str, data: bytes = data):
        decode = decoders[tag]
        if tag in heads:
            def check() -> object:
                header = heads[tag].read_header(data)
                if header is None:  # not a plain JPEG: Pillow's way, as the mode does
                    image = decode.open_image(data, max_pixels=max_pixels)
                    return image.format, image.mode, image.size, decode.orientation(image)
                decode.check_header_size(header.width, header.height, max_pixels=max_pixels)
                return "JPEG", header.mode, (header.width, header.height), header.orientation
        else:
            def check() -> object:
                image = decode.open_image(data, max_pixels=max_pixels)
                return image.format, image.mode, image.size, decode.orientation(image)
        return check
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, tag: str, function) -> None:
        rows.setdefault(name, {}).setdefault(tag, []).append(_best_us(function, args.calls))

    for _ in range(args.repeats):
        for tag in trees:
            module = sources[tag]
            record("hand-off of an empty job to a fetch helper", tag, _hand_off(module))
            fetcher = module.Sources(local_roots=[Path(path).parent], max_bytes=1 << 26, timeout=10)
            record(f"Sources.fetch of {args.file.name} ({args.file.stat().st_size} bytes)", tag,
                   lambda: fetcher.fetch(path))
            ref = module.LocalRef(path)
            record("local read alone (policy check, open, read; no helper)", tag,
                   lambda: fetcher._fetch_local(ref, time.monotonic() + 10))
            record(f"header check as gpu mode needs it ({args.file.name})", tag, header_check(tag))
            record("header check, the same with an Exif block (orientation 6) and an ICC segment",
                   tag, header_check(tag, phone))
            budget = budgets[tag].SharedBudget(1 << 30)

            def cycle() -> None:
                with budget.hold(1000):
                    pass
                budget.release(budget.acquire(1000))

            record("pixel budget: hold + acquire/release, nobody waiting", tag, cycle)
            rows.setdefault(f"batcher thread CPU per item, {args.threads} submitters, no-op forward", {}) \
                .setdefault(tag, []).append(
                    min(_batcher_us_per_item(batchers[tag], args.threads, args.items) for _ in range(3)))
            rows.setdefault(f"ordered map of a no-op, {args.threads} threads, 512 items a map "
                            "(process CPU)", {}).setdefault(tag, []).append(
                    min(_map_us_per_item(pools[tag], args.threads, 512) for _ in range(3)))
    print("| operation | before µs | after µs | after/before |\n| --- | ---: | ---: | ---: |")
    for name, by_tag in rows.items():
        before, after = min(by_tag["before"]), min(by_tag["after"])
        print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
