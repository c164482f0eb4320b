"""The backfill driver: stream a listing, keep a bounded number of chunks in flight, append rows.

Memory stays flat whatever the listing's size: the listing is a generator, what is done lives
in SQLite (:mod:`shared.backfill_state`), and at most ``max_in_flight`` chunks of
``chunk_size`` URIs (plus the few waiting for a retry) are held here.

A row is final when it is ``ok`` or carries an error that retrying cannot change; ``internal``,
``fetch_timeout`` and a chunk whose result never came are sent again, up to ``retries`` times,
then written with their error. Every URI gets exactly one row.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shared.backfill_output import Format, OutputFile
from shared.backfill_progress import Progress
from shared.backfill_scorers import ChunkHandle, ChunkScorer, ScorerBroken
from shared.backfill_state import BackfillState
from shared.errors import ErrorCode
from shared.results import ResultFactory

TRANSIENT_CODES = frozenset({
    ErrorCode.FETCH_TIMEOUT.value, ErrorCode.INTERNAL.value, ErrorCode.SOURCE_UNAVAILABLE.value,
})
# Not this image but the workers' access to the source (credentials, endpoint): every image would
# fail alike, so once retries do not help the backfill stops instead of writing error rows that a
# rerun, after the fix, would skip.
SYSTEMIC_CODES = frozenset({ErrorCode.SOURCE_UNAVAILABLE.value})
POLL_S = 0.05
# Rows for chunks that never came back carry no model identity: no worker answered.
_NO_ANSWER = ResultFactory(model="")


@dataclass
class Plan:
    chunk_size: int
    max_in_flight: int
    chunk_timeout: float
    retries: int
    drain_timeout: float = 10.0


@dataclass
class _Chunk:
    uris: list[str]
    attempts: list[int]
    handle: ChunkHandle
    sent: float = field(default_factory=time.monotonic)


class SourceUnavailable(RuntimeError):
    """The workers cannot reach the source; nothing about it was written."""


class Interrupt:
    """First Ctrl-C: stop sending and drain; the second leaves at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class Backfill:
    def __init__(
        self,
        listing: Iterator[str],
        scorer: ChunkScorer,
        state: BackfillState,
        output: OutputFile,
        plan: Plan,
        progress: Progress,
    ) -> None:
        self._listing = listing
        self._scorer = scorer
        self._state = state
        self._output = output
        self.plan = plan
        self.progress = progress
        self._retry: deque[tuple[str, int]] = deque()
        self._in_flight: list[_Chunk] = []
        self._listed_all = False
        self.interrupted = False

    # Listing ----------------------------------------------------------------------------------
    def _fresh(self, wanted: int) -> list[str]:
        """Up to ``wanted`` listed URIs that have no row yet (fewer only at the listing's end)."""
        fresh: list[str] = []
        while len(fresh) < wanted and not self._listed_all:
            batch = list(itertools.islice(self._listing, wanted - len(fresh)))
            if not batch:
                self._listed_all = True
                self.progress.listing_done()
                break
            for _ in batch:
                self.progress.listed_one()
            done = self._state.done_among(batch)
            self.progress.skipped_done(len(done))
            fresh.extend(uri for uri in batch if uri not in done)
        return fresh

    def _next_chunk(self) -> tuple[list[str], list[int]] | None:
        uris: list[str] = []
        attempts: list[int] = []
        while self._retry and len(uris) < self.plan.chunk_size:
            uri, attempt = self._retry.popleft()
            uris.append(uri)
            attempts.append(attempt)
        fresh = self._fresh(self.plan.chunk_size - len(uris))
        uris.extend(fresh)
        attempts.extend([0] * len(fresh))
        return (uris, attempts) if uris else None

    # Results ----------------------------------------------------------------------------------
    def _settle(self, chunk: _Chunk, rows: list[dict[str, Any]]) -> None:
        """Write the final rows, queue the transient ones for another try."""
        final = []
        systemic = None
        for uri, attempt, row in zip(chunk.uris, chunk.attempts, rows):
            row["uri"] = uri
            code = (row.get("error") or {}).get("code") if not row.get("ok") else None
            if code in TRANSIENT_CODES and attempt < self.plan.retries:
                self._retry.append((uri, attempt + 1))
                self.progress.retried += 1
            elif code in SYSTEMIC_CODES:
                systemic = systemic or row
            else:
                final.append(row)
        fresh = set(self._state.begin_rows((row["uri"], (row.get("error") or {}).get("code") or "ok") for row in final))
        written = [row for row in final if row["uri"] in fresh]  # a URI scored twice: one row
        try:
            size = self._output.append(written)
        except BaseException:
            self._state.rollback()
            raise
        self._state.commit(size)
        self.progress.wrote(written)
        if systemic is not None:
            error = systemic["error"] or {}
            raise SourceUnavailable(f"{error.get('code')}: {error.get('message')} ({systemic['uri']})")

    def _failed(self, chunk: _Chunk, message: str) -> None:
        rows = [dict(_NO_ANSWER.error(uri, ErrorCode.INTERNAL, message)) for uri in chunk.uris]
        self._settle(chunk, rows)

    def _collect(self, chunk: _Chunk) -> None:
        try:
            rows = chunk.handle.get()
        except ScorerBroken:
            raise  # not the chunk's fault: stop, write nothing, and a rerun scores it
        except Exception as error:  # noqa: BLE001 - a failed chunk is retried, not fatal
            self._failed(chunk, f"the chunk failed: {type(error).__name__}: {error}")
            return
        if len(rows) != len(chunk.uris):
            self._failed(chunk, f"the chunk returned {len(rows)} rows for {len(chunk.uris)} URIs")
            return
        self._settle(chunk, rows)

    # The loop ---------------------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self._in_flight) < self.plan.max_in_flight:
            nxt = self._next_chunk()
            if nxt is None:
                return
            uris, attempts = nxt
            self._in_flight.append(_Chunk(uris, attempts, self._scorer.send(uris)))

    def _poll(self) -> bool:
        """Collect what has come back and re-send what is overdue; whether anything moved."""
        moved = False
        now = time.monotonic()
        for chunk in list(self._in_flight):
            if chunk.handle.ready():
                self._in_flight.remove(chunk)
                self._collect(chunk)
                moved = True
            elif now - chunk.sent > self.plan.chunk_timeout:
                self._in_flight.remove(chunk)
                chunk.handle.abandon()
                self.progress.resent += 1
                self._failed(chunk, f"no result within the chunk timeout ({self.plan.chunk_timeout:g} s)")
                moved = True
        return moved

    def run(self, interrupt: Interrupt) -> None:
        drain_deadline = None
        while True:
            if interrupt.requested and drain_deadline is None:
                drain_deadline = time.monotonic() + self.plan.drain_timeout
                self.interrupted = True
                self.progress.line(
                    f"interrupted: waiting up to {self.plan.drain_timeout:g} s for "
                    f"{len(self._in_flight)} chunks in flight (Ctrl-C again to leave now)"
                )
            if drain_deadline is None:
                self._fill()
            if not self._in_flight:
                if drain_deadline is not None or (self._listed_all and not self._retry):
                    return
                continue  # everything came back; _fill sends the retries
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                return
            if not self._poll():
                time.sleep(POLL_S)


def dry_run(listing: Iterator[str], state: BackfillState, progress: Progress, batch: int = 256) -> None:
    """Count the listing and what is already done, sending nothing."""
    while chunk := list(itertools.islice(listing, batch)):
        progress.listed += len(chunk)
        progress.skipped_done(len(state.done_among(chunk)))
    progress.listing_done()


__all__ = ["Backfill", "Format", "Interrupt", "Plan", "SourceUnavailable", "dry_run"]
