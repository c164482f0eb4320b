"""The malloc trimmer hands fragmented free heap memory back to the system (worker/serving/memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.processes import wait_until
from worker.serving import memory
from worker.serving.memory import MallocTrimmer, start_malloc_trimmer

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(not MallocTrimmer(1).available, reason="no malloc_trim (not glibc)")

# In a fresh process: 64 KiB blocks (below the mmap threshold, so on the heap) each followed by
# a small block that stays allocated, as a long-lived object lands between two image buffers.
# Freeing the big blocks leaves holes the heap cannot shrink past: what a soak's workers showed.
FRAGMENT = textwrap.dedent("""
    import ctypes, json
    from worker.serving.memory import MallocTrimmer
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    big, small = [], []
    before = rss()
    for _ in range(512):
        block = libc.malloc(64 << 10)
        ctypes.memset(block, 1, 64 << 10)
        big.append(block)
        small.append(libc.malloc(64))
    full = rss()
    for block in big:
        libc.free(block)
    freed = rss()
    MallocTrimmer(60).trim()
    print(json.dumps({"before": before, "full": full, "freed": freed, "trimmed": rss()}))
""")


@glibc_only
def test_trim_hands_back_free_pages_between_live_blocks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    import json

    mib = json.loads(done.stdout)
    assert mib["full"] - mib["before"] >= 28  # 32 MiB of blocks were touched
    assert mib["full"] - mib["freed"] < 8, mib  # free() alone gives (almost) nothing back
    assert mib["freed"] - mib["trimmed"] >= 24, mib  # the trim gives most of it back


@glibc_only
def test_trimmer_thread_trims_every_interval_until_stopped() -> None:
    trimmer = MallocTrimmer(0.02).start()
    try:
        wait_until(lambda: trimmer.trims >= 3, 10, "three trims")
    finally:
        trimmer.stop()
    count = trimmer.trims
    assert not trimmer._thread.is_alive()
    assert trimmer.trim() in (True, False) and trimmer.trims == count + 1  # only the direct call


def test_one_trimmer_per_process_and_zero_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_process_trimmer", None)
    assert start_malloc_trimmer(0) is None
    first = start_malloc_trimmer(3600)
    try:
        assert first is not None and start_malloc_trimmer(3600) is first
    finally:
        if first is not None:
            first.stop()
    with pytest.raises(ValueError):
        MallocTrimmer(0)
