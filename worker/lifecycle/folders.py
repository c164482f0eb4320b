"""The labelled folders ``evaluate`` and ``train`` read: the image files under ``--real``, ``--ai``.

Files are found recursively by suffix and sorted, so the same folders always give the same order
(and ``train --seed`` the same split). Unreadable or non-image content is left to the scoring path,
which reports it per file with its error code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.cli import UsageError
from shared.listing import IMAGE_EXTENSIONS

IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)  # one list for every command (shared/listing.py)


@dataclass(frozen=True)
class LabelledFile:
    path: Path  # absolute
    label: str  # "real" or "ai"


def list_images(folder: str | Path, option: str) -> list[Path]:
    """Image files under ``folder``, absolute and sorted; a usage error if there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"{option} {folder}: not a directory")
    files = sorted(
        path.absolute()
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not files:
        raise UsageError(f"{option} {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def labelled_files(real: str | Path, ai: str | Path) -> list[LabelledFile]:
    """Real files first, then AI files, each group sorted."""
    return [LabelledFile(path, "real") for path in list_images(real, "--real")] + [
        LabelledFile(path, "ai") for path in list_images(ai, "--ai")
    ]
