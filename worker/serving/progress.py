"""A progress bar for commands over many files (``score`` on a folder, ``evaluate``).

Drawn on stderr and only when stderr is a terminal: piped or logged output (and stdout's JSON
lines) never carry it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[T], T]]:
    """Yields ``tick(value) -> value``, which advances the bar by one (safe from any thread)."""
    if total < 2 or not sys.stderr.isatty():
        yield lambda value: value
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="img", file=sys.stderr, leave=False) as bar:

        def tick(value: T) -> T:
            bar.update(1)
            return value

        yield tick
