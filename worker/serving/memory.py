"""Process memory hygiene for a many-threaded decoder.

glibc gives each thread that allocates its own malloc arena (up to 8 per core) and rarely returns
freed arena memory to the system, so a hundred task threads that each once decoded a
12-megapixel image keep that memory resident: the pixel budget bounds what is live, not what the
arenas hold. Capping the arenas (like ``MALLOC_ARENA_MAX=2``) keeps RSS near the live set
(bench/bench_memory.py measures both).

Capped arenas still fragment under steady load: a heap only shrinks from its top, so freed
blocks between live ones stay resident (a soak showed malloc's in-use bytes flat while its free
but held bytes, and the worker's RSS, grew for as long as it ran). :class:`MallocTrimmer` calls
``malloc_trim(0)`` every ``REALSCORE_MALLOC_TRIM_INTERVAL`` seconds, which hands the free pages
inside the heaps back to the system (bench/RESULTS.md, "Soak").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc malloc arenas unless ``MALLOC_ARENA_MAX`` already says otherwise."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas))
    except AttributeError:  # not glibc (musl, macOS): nothing to cap
        log.debug("mallopt unavailable; malloc arenas not capped")
        return False


class MallocTrimmer:
    """A daemon thread that calls glibc's ``malloc_trim(0)`` every ``interval_s`` seconds.

    ``malloc_trim(0)`` releases the free pages of every arena, not only a heap's top; it locks
    each arena while it walks it, a few milliseconds for a worker's heaps, so it runs on its own
    thread and not on the batcher's."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("the trim interval must be positive")
        self.interval_s = interval_s
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None
        self.trims = 0
        self.last_trim_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="realscore-malloc-trim", daemon=True)

    @property
    def available(self) -> bool:
        """False where the C library has no ``malloc_trim`` (musl, macOS)."""
        return self._trim is not None

    def trim(self) -> bool:
        """Release free heap pages now; whether any memory went back to the system."""
        if self._trim is None:
            return False
        started = time.monotonic()
        released = bool(self._trim(0))
        self.last_trim_s = time.monotonic() - started
        self.trims += 1
        return released

    def start(self) -> MallocTrimmer:
        if self.available:
            self._thread.start()
        else:
            log.debug("malloc_trim unavailable; freed heap memory is not handed back")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim()


_process_trimmer: MallocTrimmer | None = None
_process_lock = threading.Lock()


def start_malloc_trimmer(interval_s: float) -> MallocTrimmer | None:
    """The process's one trimmer, started on the first call (later calls get the same one);
    ``None`` when ``interval_s`` is 0 (off)."""
    global _process_trimmer
    if interval_s <= 0:
        return None
    with _process_lock:
        if _process_trimmer is None:
            _process_trimmer = MallocTrimmer(interval_s).start()
        return _process_trimmer
