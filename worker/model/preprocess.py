"""CLIP's preprocessing, as the seed ran it, on an 8-bit RGB image.

The seed fed float pixels in [0, 1] to ``CLIPImageProcessor(do_rescale=False)`` with the Pillow
backend, which turns them back into 8-bit for a Pillow bicubic resize, center-crops, and normalizes.
We do the same steps on the decoded 8-bit image directly. Sizes, mean and std come from the
processor config saved with the CLIP model, read through the Pillow backend class
(``CLIPImageProcessorPil``) so a machine with torchvision installed preprocesses identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mean", np.asarray(self.mean, dtype=np.float32))
        object.__setattr__(self, "_std", np.asarray(self.std, dtype=np.float32))

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> Preprocessing:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil.from_pretrained(name_or_dir)
        size = processor.size
        shortest = size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge
        crop = processor.crop_size
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            mean=tuple(float(v) for v in processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in processor.image_std),  # type: ignore[arg-type]
            resample=int(processor.resample),
        )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, self.crop_height, self.crop_width)

    @property
    def output_bytes(self) -> int:
        return 4 * 3 * self.crop_height * self.crop_width

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the short side to ``shortest_edge``, as transformers."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, rgb: Image.Image) -> torch.Tensor:
        """8-bit RGB image -> float32 tensor (3, crop_height, crop_width), normalized."""
        resized = rgb.resize(self.resized_size(*rgb.size), resample=self.resample)
        pixels = self._center_crop(np.asarray(resized))
        scaled = pixels.astype(np.float32) * np.float32(1 / 255)
        normalized = (scaled - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))

    def _center_crop(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        if height < self.crop_height or width < self.crop_width:  # pad with zeros, as transformers
            padded = np.zeros(
                (max(height, self.crop_height), max(width, self.crop_width), 3), pixels.dtype
            )
            top = -(-(padded.shape[0] - height) // 2)
            left = -(-(padded.shape[1] - width) // 2)
            padded[top : top + height, left : left + width] = pixels
            pixels, (height, width) = padded, padded.shape[:2]
        top = (height - self.crop_height) // 2
        left = (width - self.crop_width) // 2
        return pixels[top : top + self.crop_height, left : left + self.crop_width]
