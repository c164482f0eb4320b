"""Helpers shared by the bench scripts: random-weight CLIP towers of real shapes, saved like
hub checkpoints (no network: the weights do not change the cost), with a seed-format head;
photo-like JPEGs; a machine line; markdown tables written to a file row by row as measured.

Imports only torch, transformers and the test helpers, so a bench that uses it runs on a GPU
machine without the service's other dependencies (pydantic, Celery, boto3).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tests.images import photo_like
from tests.tiny_clip import TINY_CONFIG, make_seed_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOWERS = {
    "tiny": TINY_CONFIG,
    "base32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, image_size=224, patch_size=32),
    "large14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=224, patch_size=14),
}


def build(directory: Path, tower: str) -> tuple[Path, Path]:
    CLIPVisionModel(CLIPVisionConfig(**TOWERS[tower])).save_pretrained(directory / "clip")
    CLIPImageProcessorPil().save_pretrained(directory / "clip")
    return directory / "clip", make_seed_checkpoint(directory / "head.pth", directory / "clip")


def make_jpegs(
    directory: Path, count: int, size: tuple[int, int] = (1024, 768), quality: int = 90
) -> list[str]:
    """``count`` distinct photo-like JPEGs (tests/images.py ``photo_like``: smooth gradients and
    blobs plus sensor noise) in ``directory``, written on all cores."""
    directory.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> str:
        path = directory / f"photo{i:05d}.jpg"
        photo_like(i, size).save(path, quality=quality)
        return str(path)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(one, range(count)))


def machine_line(device: str) -> str:
    """``host · device name · N CPUs · torch version`` for a table's header."""
    import torch

    name = platform.processor() or "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    return f"{platform.node()} · {name} · {os.cpu_count()} CPUs · torch {torch.__version__}"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Table:
    """A markdown table printed and appended to ``out`` one row at a time, flushed each time, so
    a run cut short still leaves every row it measured."""

    def __init__(self, title: str, columns: Sequence[str], out: TextIO | None, notes: Sequence[str] = ()):
        self.columns = list(columns)
        self.out = out
        lines = [f"\n### {title}\n", *notes, ""] if notes else [f"\n### {title}\n"]
        lines += ["| " + " | ".join(self.columns) + " |",
                  "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + " |"]
        self._emit("\n".join(lines))

    def row(self, *cells: object) -> None:
        shown = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells]
        self._emit("| " + " | ".join(shown) + " |")

    def _emit(self, text: str) -> None:
        print(text, flush=True)
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()


def py_spy_frame(frame: str) -> str:
    """One frame of py-spy's raw (collapsed) stacks, as ``function (file.py)``: no line, no folders."""
    if " (" not in frame:
        return frame
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 2)[-1]})"
