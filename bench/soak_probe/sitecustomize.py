"""Bench-only memory probe for ``bench/soak.py --probe DIR`` (never imported by production code).

Put this folder on ``PYTHONPATH`` and set ``SOAK_PROBE=DIR``: every Python process
started so then writes one JSON line per ``SOAK_PROBE_EVERY`` seconds (default 20) to
``DIR/<pid>.jsonl``: RSS, glibc's ``mallinfo2`` (bytes in use vs free but held by malloc),
tracemalloc's traced bytes and the top allocation sites' growth since the first sample (with
``SOAK_PROBE_TRACEMALLOC=<frames>``), thread count and the object counts by type that grew.
``SOAK_PROBE_TRIM=1`` also calls ``malloc_trim(0)`` after each sample and records RSS after it,
to tell memory malloc holds free from memory still in use.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("SOAK_PROBE")


def _start() -> None:
    import collections
    import ctypes
    import gc
    import json
    import sys
    import threading
    import time
    import tracemalloc

    # Tracing starts at the warm-up marker: traced from start-up, torch's imports take minutes.
    # What grows afterwards is what a leak would be.
    frames = int(os.environ.get("SOAK_PROBE_TRACEMALLOC", "0") or 0)
    every = float(os.environ.get("SOAK_PROBE_EVERY", "20"))
    trim = os.environ.get("SOAK_PROBE_TRIM") == "1"
    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2

    def rss(field: str = "VmRSS") -> float:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    path = os.path.join(_DIR, f"{os.getpid()}.jsonl")
    first: dict = {}

    def sample(n: int) -> dict:
        info = libc.mallinfo2()
        row: dict = {
            "t": round(time.monotonic() - began, 1),
            "argv": " ".join(sys.argv[:6]) if n == 0 else None,
            "rss_mib": round(rss(), 1),
            # Anonymous memory (heaps, tensors) vs pages of mapped files (libtorch's code, model
            # files), which fill in as new code paths run and are no leak.
            "rss_anon_mib": round(rss("RssAnon"), 1),
            "rss_file_mib": round(rss("RssFile"), 1),
            "threads": threading.active_count(),
            "malloc_in_use_mib": round((info.uordblks + info.hblkhd) / 2**20, 1),
            "malloc_free_held_mib": round(info.fordblks / 2**20, 1),
            "malloc_heap_mib": round(info.arena / 2**20, 1),
            "malloc_mmapped_mib": round(info.hblkhd / 2**20, 1),
        }
        # Growth is counted from the first sample after the soak's warm-up (its marker file).
        baseline = os.path.exists(os.path.join(_DIR, "warm"))
        counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        if not baseline:
            pass
        elif not first.get("counts"):
            first["counts"] = counts
        else:
            grown = {k: v - first["counts"].get(k, 0) for k, v in counts.items()}
            row["objects_grown"] = dict(sorted(grown.items(), key=lambda kv: -kv[1])[:15])
        row["objects"] = sum(counts.values())
        if frames and baseline and not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        elif frames and baseline:
            current, _ = tracemalloc.get_traced_memory()
            row["traced_mib"] = round(current / 2**20, 1)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if "snap" not in first:
                first["snap"] = snap
            else:
                stats = snap.compare_to(first["snap"], "traceback")[:12]
                row["top_growth"] = [
                    {"kib": round(s.size_diff / 1024, 1), "count": s.count_diff,
                     "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in s.traceback]}
                    for s in stats
                ]
        if trim:
            libc.malloc_trim(0)
            row["rss_after_trim_mib"] = round(rss(), 1)
        return row

    def loop() -> None:
        n = 0
        while True:
            time.sleep(every)  # the probe's sampling period
            try:
                row = sample(n)
            except Exception as error:  # noqa: BLE001 - a probe must not kill the worker
                row = {"error": repr(error)}
            with open(path, "a") as out:
                out.write(json.dumps(row) + "\n")
            n += 1

    began = time.monotonic()
    threading.Thread(target=loop, name="soak-probe", daemon=True).start()


if _DIR:
    _start()
