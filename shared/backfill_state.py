"""A backfill's resume state: an SQLite file beside the output, never the listing in memory.

It holds the URIs whose row is in the output (done: skipped by a rerun) and the output's length
when they were committed. Rows are appended to the output first and the state committed after;
a crash between the two leaves rows past the committed length, which the next run cuts off and
scores again, so a URI never appears twice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence


# A file name that is not valid UTF-8 reaches Python as a str with lone surrogates
# (os.fsdecode), which SQLite cannot store: such a URI is keyed by its bytes, in hex, behind a
# prefix no listed URI starts with (they are absolute paths or s3:// URIs).
_UNDECODABLE = "\ufffeundecodable:"


def _key(uri: str) -> str:
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return _UNDECODABLE + uri.encode("utf-8", "surrogateescape").hex()
    return uri


class StateMismatch(Exception):
    """The state file belongs to another backfill (other source or format), or is missing."""


def state_path(out: str) -> str:
    return out + ".state.sqlite"


class BackfillState:
    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        if not create and not os.path.exists(path):
            self._db = sqlite3.connect(":memory:")
        else:
            self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS done (uri TEXT PRIMARY KEY, code TEXT) WITHOUT ROWID")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def bind(self, **identity: str) -> None:
        """Record what this state is for; refuse one recorded for something else."""
        for key, value in identity.items():
            known = self.get(key)
            if known is None:
                self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
            elif known != value:
                raise StateMismatch(f"{self.path} was made with {key} {known!r}, not {value!r}")
        self._db.commit()

    @property
    def committed_bytes(self) -> int:
        return int(self.get("output_bytes") or 0)

    def done_among(self, uris: Sequence[str]) -> set[str]:
        """Which of ``uris`` (at most a few hundred) already have their row."""
        if not uris:
            return set()
        keys = {_key(uri): uri for uri in uris}
        marks = ",".join("?" * len(keys))
        found = self._db.execute(f"SELECT uri FROM done WHERE uri IN ({marks})", list(keys))
        return {keys[row[0]] for row in found}

    def done_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM done").fetchone()[0])

    def begin_rows(self, rows: Iterable[tuple[str, str]]) -> list[str]:
        """Mark ``(uri, code)`` done, uncommitted; return the URIs that were not done already."""
        fresh = []
        for uri, code in rows:
            cursor = self._db.execute("INSERT OR IGNORE INTO done VALUES (?, ?)", (_key(uri), code))
            if cursor.rowcount:
                fresh.append(uri)
        return fresh

    def commit(self, output_bytes: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('output_bytes', ?)", (str(output_bytes),))
        self._db.commit()

    def rollback(self) -> None:
        self._db.rollback()
