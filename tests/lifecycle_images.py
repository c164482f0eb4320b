"""Two synthetic, separable image families for evaluate/train tests: noise-textured vs smooth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def textured(seed: int, size: tuple[int, int] = (64, 56)) -> Image.Image:
    """A random base colour under per-pixel noise strong enough to saturate many pixels."""
    rng = np.random.default_rng(10_000 + seed)
    width, height = size
    base = rng.uniform(60, 200, 3)
    pixels = base + rng.normal(0, 160, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def smooth(seed: int, size: tuple[int, int] = (64, 56)) -> Image.Image:
    """A noiseless linear gradient between two random colours in a random direction."""
    rng = np.random.default_rng(20_000 + seed)
    width, height = size
    angle = rng.uniform(0, 2 * np.pi)
    x, y = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    t = ((np.cos(angle) * x + np.sin(angle) * y) + 1.5) / 3
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = start + t[..., None] * (end - start)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_families(root: Path, count: int) -> tuple[Path, Path]:
    """``root/real`` holds textured PNGs, ``root/ai`` smooth ones; ``count`` of each."""
    real, ai = root / "real", root / "ai"
    real.mkdir(parents=True, exist_ok=True)
    ai.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        textured(i).save(real / f"t{i:03d}.png")
        smooth(i).save(ai / f"s{i:03d}.png")
    return real, ai
