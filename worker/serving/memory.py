"""Process memory hygiene for a many-threaded decoder.

glibc gives each thread that allocates its own malloc arena (up to 8 per core) and rarely returns
freed arena memory to the system, so a hundred task threads that each once decoded a
12-megapixel image keep that memory resident: the pixel budget bounds what is live, not what the
arenas hold. Capping the arenas (like ``MALLOC_ARENA_MAX=2``) keeps RSS near the live set
(bench/bench_memory.py measures both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc malloc arenas unless ``MALLOC_ARENA_MAX`` already says otherwise."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        log.debug("mallopt unavailable; malloc arenas not capped")
        return False
