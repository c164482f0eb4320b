"""Degraded copies of an image for robustness checks: JPEG re-compression, resizing, blur.

A spec like ``jpeg:75,resize:0.5,blur:1.0`` names one perturbation per item; each is applied on
its own to the decoded image (the protocol robustness papers on this task report). A degraded copy
is returned as file bytes, JPEG for ``jpeg`` (that is the point) and lossless PNG otherwise, so it
is scored through exactly the same path as an original file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFilter

from worker.model import decode

KINDS = {
    "jpeg": "JPEG quality, 1-100",
    "resize": "scale factor for both sides, 0 < f <= 4",
    "blur": "Gaussian blur radius in pixels, 0-100",
}


@dataclass(frozen=True)
class Perturbation:
    kind: str
    value: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    @property
    def suffix(self) -> str:
        return ".jpg" if self.kind == "jpeg" else ".png"

    def encode(self, rgb: Image.Image) -> bytes:
        """The degraded copy of an RGB image as file bytes (see :attr:`suffix`)."""
        buffer = io.BytesIO()
        if self.kind == "jpeg":
            rgb.save(buffer, format="JPEG", quality=int(self.value))
            return buffer.getvalue()
        if self.kind == "resize":
            width, height = rgb.size
            size = (max(1, round(width * self.value)), max(1, round(height * self.value)))
            degraded = rgb.resize(size, Image.Resampling.BICUBIC)  # Pillow antialiases downscaling
        else:
            degraded = rgb.filter(ImageFilter.GaussianBlur(self.value))
        degraded.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()


def _validated(kind: str, value: float) -> Perturbation:
    if kind == "jpeg" and not (1 <= value <= 100 and value == int(value)):
        raise ValueError(f"jpeg quality must be an integer 1-100, got {value:g}")
    if kind == "resize" and not 0 < value <= 4:
        raise ValueError(f"resize factor must be in (0, 4], got {value:g}")
    if kind == "blur" and not 0 <= value <= 100:
        raise ValueError(f"blur radius must be in [0, 100], got {value:g}")
    return Perturbation(kind, float(value))


def parse(spec: str) -> list[Perturbation]:
    """Parse ``"jpeg:75,resize:0.5,blur:1.0"``; a :class:`ValueError` says what is wrong."""
    perturbations: list[Perturbation] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, raw = item.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            known = ", ".join(f"{name}:N ({meaning})" for name, meaning in KINDS.items())
            raise ValueError(f"unknown perturbation {item!r}; known: {known}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{item!r}: expected {kind}:NUMBER ({KINDS[kind]})") from None
        perturbation = _validated(kind, value)
        if perturbation in perturbations:
            raise ValueError(f"{perturbation.name} is given twice")
        perturbations.append(perturbation)
    if not perturbations:
        raise ValueError("empty perturbation list; e.g. jpeg:75,resize:0.5,blur:1.0")
    return perturbations


def degrade(data: bytes, perturbation: Perturbation, *, max_pixels: int) -> bytes:
    """Decode image file bytes (with the service's limits and error codes) and degrade them."""
    return perturbation.encode(decode.decode(data, max_pixels=max_pixels))
