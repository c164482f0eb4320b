"""A backfill's progress: a tqdm bar on a terminal, a log line every few seconds otherwise, and
the summary printed at the end (scored, errors by code, real/ai counts, wall time, images/s)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import IO, Any


class Progress:
    def __init__(self, *, stream: IO[str] | None = None, tty: bool | None = None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.total: int | None = None
        self.listed = 0
        self.skipped = 0
        self.written = 0
        self.ok = 0
        self.labels: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.resent = 0
        self.retried = 0
        self._every_s = every_s
        self._last_line = self.started
        self._bar = None
        if self.stream.isatty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def restart_clock(self) -> None:
        self.started = self._last_line = time.monotonic()

    # Counting -------------------------------------------------------------------------------
    def listed_one(self) -> None:
        self.listed += 1

    def listing_done(self) -> None:
        self.total = self.listed - self.skipped
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def skipped_done(self, count: int) -> None:
        self.skipped += count

    def wrote(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("ok"):
                self.ok += 1
                self.labels[str(row.get("label"))] += 1
            else:
                self.errors[(row.get("error") or {}).get("code", "internal")] += 1
        self.written += len(rows)
        if self._bar is not None:
            self._bar.set_postfix_str(f"errors={sum(self.errors.values())}", refresh=False)
            self._bar.update(len(rows))
        elif time.monotonic() - self._last_line >= self._every_s:
            self._last_line = time.monotonic()
            self.line(self.status())

    # Reporting ------------------------------------------------------------------------------
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.written / elapsed if elapsed > 0 else 0.0

    def status(self) -> str:
        total = "?" if self.total is None else str(self.total)
        rate = self.rate()
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", eta {max(self.total - self.written, 0) / rate:.0f} s"
        return (
            f"{self.written}/{total} written, {sum(self.errors.values())} errors, "
            f"{rate:.1f} img/s{eta} ({self.skipped} already done)"
        )

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(f"realscore backfill: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        errors = ", ".join(f"{code} {count}" for code, count in sorted(self.errors.items())) or "none"
        labels = ", ".join(f"{label} {count}" for label, count in sorted(self.labels.items())) or "none"
        return (
            f"{self.written} rows written ({self.ok} scored: {labels}; errors: {errors}); "
            f"{self.skipped} already done; {self.retried} images retried; {self.resent} chunks re-sent; "
            f"{elapsed:.1f} s, {self.rate():.1f} img/s"
        )
