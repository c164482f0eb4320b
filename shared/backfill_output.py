"""A backfill's output file: one row per image, the result dict as the workers publish it.

JSON lines by default; CSV flattens ``error`` into ``error_code`` and ``error_message``, and
:func:`read_rows` parses either back into the same dicts. Rows are appended a chunk at a time,
in one write, and flushed before the resume state is committed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

Format = Literal["jsonl", "csv"]
CSV_COLUMNS = (
    "uri", "ok", "score", "label", "threshold", "model", "error_code", "error_message", "sha256",
    "elapsed_ms", "cached",
)


def _csv_cells(row: dict[str, Any]) -> list[str]:
    error = row.get("error") or {}
    flat = {**row, "error_code": error.get("code"), "error_message": error.get("message")}
    cells = []
    for column in CSV_COLUMNS:
        value = flat.get(column)
        if value is None:
            cells.append("")
        elif isinstance(value, bool):
            cells.append("true" if value else "false")
        else:
            cells.append(str(value) if not isinstance(value, float) else repr(value))
    return cells


def _from_csv(cells: dict[str, str]) -> dict[str, Any]:
    def number(text: str) -> float | None:
        return float(text) if text else None

    return {
        "uri": cells["uri"],
        "ok": cells["ok"] == "true",
        "score": number(cells["score"]),
        "label": cells["label"] or None,
        "threshold": float(cells["threshold"]),
        "model": cells["model"],
        "error": (
            {"code": cells["error_code"], "message": cells["error_message"]} if cells["error_code"] else None
        ),
        "sha256": cells["sha256"] or None,
        "elapsed_ms": float(cells["elapsed_ms"]),
        "cached": cells["cached"] == "true",
    }


def _json_line(row: dict[str, Any]) -> str:
    """One JSON line, UTF-8 as written; a URI from a file name that is not valid UTF-8 (lone
    surrogates, as os.fsdecode gives it) is written with JSON escapes, which read back the same."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def encode_rows(rows: Sequence[dict[str, Any]], fmt: Format) -> str:
    if fmt == "jsonl":
        return "".join(_json_line(row) for row in rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(_csv_cells(row) for row in rows)
    return buffer.getvalue()


class OutputFile:
    """The output, opened for appending at the state's committed length."""

    def __init__(self, path: str, fmt: Format, committed_bytes: int) -> None:
        self.fmt = fmt
        exists = os.path.exists(path)
        self._file = open(path, "r+b" if exists else "w+b")  # noqa: SIM115 - closed by close()
        self._file.truncate(committed_bytes)  # rows written after the last commit are scored again
        self._file.seek(committed_bytes)
        if committed_bytes == 0 and fmt == "csv":
            self._file.write((",".join(CSV_COLUMNS) + "\n").encode())
            self._file.flush()

    def append(self, rows: Sequence[dict[str, Any]]) -> int:
        """Append and flush ``rows``; returns the file's new length."""
        if rows:
            # surrogateescape: a CSV cell keeps a non-UTF-8 file name's own bytes (JSON lines
            # are escaped already).
            self._file.write(encode_rows(rows, self.fmt).encode("utf-8", "surrogateescape"))
            self._file.flush()
            # On disk before the state commits: after a power loss the state must not be ahead.
            os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def read_rows(path: str, fmt: Format) -> Iterator[dict[str, Any]]:
    """The rows of an output file, as dicts equal to the result dicts that were written."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        if fmt == "jsonl":
            for line in handle:
                if line.strip():
                    yield json.loads(line)
        else:
            for cells in csv.DictReader(handle):
                yield _from_csv(cells)
