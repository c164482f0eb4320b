"""CLIP's resize, center crop and normalization as batched tensor ops on the model's device.

The tensor twin of :class:`worker.model.preprocess.Preprocessing`: bicubic with antialiasing
(PyTorch's antialiased bicubic uses Pillow's filter, a=-0.5, over the same support), rounded and
clamped to 8-bit values as Pillow's resize returns them, then the same crop and normalization.
Frames of one size are resized in one call.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from worker.model.preprocess import Preprocessing


def orient(frame: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) frame, as ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return frame.flip(-1)
    if orientation == 3:
        return frame.flip(-2, -1)
    if orientation == 4:
        return frame.flip(-2)
    if orientation == 5:
        return frame.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(frame, -1, (-2, -1))
    if orientation == 7:
        return frame.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(frame, 1, (-2, -1))
    return frame


class TensorPreprocessing:
    """uint8 (3, H, W) frames of any sizes -> one normalized (N, 3, crop_h, crop_w) batch."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype):
        self.preprocessing = preprocessing
        self.device = device
        self.dtype = dtype
        std = torch.tensor(preprocessing.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def resized_crops(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """Resized and cropped 8-bit values (as float32), (N, 3, crop_h, crop_w), input order."""
        crop_h, crop_w = self.preprocessing.crop_height, self.preprocessing.crop_width
        out = torch.empty((len(frames), 3, crop_h, crop_w), dtype=torch.float32, device=self.device)
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, frame in enumerate(frames):
            by_shape[(int(frame.shape[-2]), int(frame.shape[-1]))].append(index)
        for (height, width), indices in by_shape.items():
            new_w, new_h = self.preprocessing.resized_size(width, height)
            stacked = torch.stack([frames[i] for i in indices]).float()
            if (new_h, new_w) != (height, width):
                stacked = F.interpolate(
                    stacked, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
                )
                stacked = stacked.round_().clamp_(0.0, 255.0)
            cropped = self._center_crop(stacked)
            if indices == list(range(indices[0], indices[0] + len(indices))):
                out[indices[0] : indices[0] + len(indices)] = cropped
            else:  # integer indexing: a list index would be a blocking host->device copy
                for row, index in enumerate(indices):
                    out[index] = cropped[row]
        return out

    def __call__(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """Normalized pixels in the model's dtype."""
        crops = self.resized_crops(frames)
        return (crops * self._scale + self._shift).to(self.dtype)

    def _center_crop(self, batch: torch.Tensor) -> torch.Tensor:
        crop_h, crop_w = self.preprocessing.crop_height, self.preprocessing.crop_width
        height, width = batch.shape[-2:]
        if height < crop_h or width < crop_w:  # pad with zeros, as transformers does
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
            top, left = -(-pad_h // 2), -(-pad_w // 2)
            batch = F.pad(batch, (left, pad_w - left, top, pad_h - top))
            height, width = batch.shape[-2:]
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return batch[..., top : top + crop_h, left : left + crop_w]
