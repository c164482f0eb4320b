"""Pooled tower features for training: a compact wire form and an on-disk cache.

Features travel from the workers (``realscore.embed``) as base64 of little-endian float16: 2 KB
per ViT-L/14 image instead of ~20 KB of JSON floats. The cache is one SQLite file per tower,
keyed by the image's content sha256, so renamed or copied files are not extracted twice and
re-training is seconds. The tower key (:func:`worker.model.model_string.tower_key`) is the worker's
``model`` string without its head and how the worker ran the tower: features depend on the tower
(and its weights), not on whichever head is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

_WIRE_DTYPE = np.dtype("<f2")


def encode_features(features: np.ndarray) -> str:
    """One image's features (any float dtype, shape (dim,)) -> base64 of little-endian float16."""
    vector = np.asarray(features).reshape(-1)
    return base64.b64encode(vector.astype(_WIRE_DTYPE).tobytes()).decode("ascii")


def decode_features(text: str, dim: int) -> np.ndarray:
    """The inverse of :func:`encode_features`, as float32 of shape (dim,)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != dim * _WIRE_DTYPE.itemsize:
        raise ValueError(f"features hold {len(raw)} bytes, expected {dim} float16 values")
    return np.frombuffer(raw, dtype=_WIRE_DTYPE).astype(np.float32)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "realscore" / "features"


class FeatureCache:
    """sha256 -> float16 features of one tower, in ``<directory>/<hash of tower>.sqlite``."""

    def __init__(self, directory: str | Path, tower: str) -> None:
        self.tower = tower
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{hashlib.sha256(tower.encode()).hexdigest()[:16]}.sqlite"
        self._db = sqlite3.connect(self.path)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS features (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);"
        )
        stored = self._db.execute("SELECT value FROM meta WHERE key = 'tower'").fetchone()
        if stored is None:
            with self._db:
                self._db.execute("INSERT INTO meta VALUES ('tower', ?)", (tower,))
        elif stored[0] != tower:  # a 64-bit prefix collision: never mix two towers' features
            raise RuntimeError(f"{self.path} holds features of {stored[0]!r}, not {tower!r}")

    def get_many(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached features among ``hashes`` (float32)."""
        found: dict[str, np.ndarray] = {}
        wanted = list(dict.fromkeys(hashes))
        for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT sha256, data FROM features WHERE sha256 IN ({marks})"
            for sha, data in self._db.execute(query, chunk):
                found[sha] = np.frombuffer(data, dtype=_WIRE_DTYPE).astype(np.float32)
        return found

    def put_many(self, features: Mapping[str, np.ndarray]) -> None:
        rows = [
            (sha, np.asarray(v).reshape(-1).astype(_WIRE_DTYPE).tobytes())
            for sha, v in features.items()
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?)", rows)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
