"""Preprocessing modes (``REALSCORE_DECODE``): where an image is decoded and resized.

Every mode has two halves behind one interface:

- :meth:`Mode.stage` runs on the task thread, after the header check (pixel limit, format): it
  does the mode's CPU work and returns what waits in the batcher queue (:meth:`Mode.stage_bytes`
  is the header check and ``stage`` together; ``gpu`` reads a plain JPEG's header without
  Pillow there);
- :meth:`Mode.collate` runs in the forward step on the batcher thread: it turns a batch of
  staged items into normalized pixels on the model's device, and reports the items that failed
  on their own (a corrupt JPEG in ``gpu`` mode) so the rest of the batch is still scored.

``exact``  Pillow decode + the seed's Pillow preprocessing on the task thread; float32 pixels go
           to the device (pinned, non-blocking). Scores within 1e-4 of the seed's.
``tensor`` Pillow decode to uint8 on the task thread (JPEG ``draft`` down-scaling to no less
           than twice the target); resize, crop and normalize as batched tensor ops on the device.
``gpu``    JPEG bytes are decoded in batches by ``torchvision.io.decode_jpeg`` on the device;
           everything else (PNG, WebP, CMYK, a JPEG the decoder refuses) takes ``tensor``'s CPU
           decode for that image only.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from shared.errors import ErrorCode, ScoringError
from worker.model import decode, jpeghead
from worker.model.preprocess import Preprocessing
from worker.model.tensorprep import TensorPreprocessing, orient

log = logging.getLogger(__name__)
MODES = ("exact", "tensor", "gpu")
Hold = Callable[[int], AbstractContextManager]
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class DecodeModeError(RuntimeError):
    """The configured mode cannot run here; the message says why, in one line."""


@dataclass(frozen=True)
class Staged:
    """What one image keeps in the batcher queue, and how many bytes of it the budget counts."""

    payload: object
    nbytes: int


@dataclass
class Collated:
    """A batch ready for the model: ``pixels`` holds the rows of the items whose error is None."""

    pixels: torch.Tensor
    errors: list[BaseException | None] = field(default_factory=list)


def _pinned_stack(arrays: Sequence[torch.Tensor], pin: bool) -> torch.Tensor:
    """``torch.stack`` into page-locked memory when the copy goes to a GPU."""
    first = arrays[0]
    out = torch.empty((len(arrays), *first.shape), dtype=first.dtype, pin_memory=pin)
    return torch.stack(list(arrays), out=out)


class Mode(ABC):
    name: str

    def __init__(self, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype):
        self.preprocessing = preprocessing
        self.device = device
        self.dtype = dtype
        self.pin = device.type == "cuda"

    @abstractmethod
    def stage(self, image: Image.Image, data: bytes, hold: Hold) -> Staged:
        """Task-thread work on a header-checked image; decoding happens inside ``hold(bytes)``.
        What ``hold`` took stays held (shrunk to ``Staged.nbytes``, which it must cover) until the
        image's batch has ended: the staged payload is counted while it waits in the queue."""

    def stage_bytes(self, data: bytes, max_pixels: int, hold: Hold) -> Staged:
        """The header check (:func:`decode.open_image`), then :meth:`stage`."""
        return self.stage(decode.open_image(data, max_pixels=max_pixels), data, hold)

    @abstractmethod
    def collate(self, payloads: list[object]) -> Collated:
        """Forward-step work: staged payloads -> normalized pixels on the device."""


class ExactMode(Mode):
    name = "exact"

    def stage(self, image: Image.Image, data: bytes, hold: Hold) -> Staged:
        with hold(decode.decoded_bytes_estimate(image)):
            pixels = self.preprocessing(decode.to_rgb(image))
        return Staged(pixels, pixels.numel() * pixels.element_size())

    def collate(self, payloads: list[object]) -> Collated:
        host = _pinned_stack(payloads, self.pin)  # type: ignore[arg-type]
        pixels = host.to(self.device, non_blocking=True).to(self.dtype)
        return Collated(pixels, [None] * len(payloads))


class TensorMode(Mode):
    name = "tensor"

    def __init__(self, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype):
        super().__init__(preprocessing, device, dtype)
        self.tensor_prep = TensorPreprocessing(preprocessing, device, dtype)

    def draft(self, image: Image.Image) -> None:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below twice the resized size."""
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return
        width, height = self.preprocessing.resized_size(*image.size)
        image.draft(image.mode, (2 * width, 2 * height))

    def decode_frame(self, image: Image.Image, hold: Hold) -> np.ndarray:
        """8-bit RGB (H, W, 3) array, as the exact path decodes it (after any ``draft``)."""
        self.draft(image)
        with hold(decode.decoded_bytes_estimate(image, rgb_array=True)):
            rgb = decode.to_rgb(image)
            try:
                return np.asarray(rgb)
            except MemoryError:
                raise ScoringError(ErrorCode.OUT_OF_MEMORY, "out of memory copying pixels") from None

    def stage(self, image: Image.Image, data: bytes, hold: Hold) -> Staged:
        frame = self.decode_frame(image, hold)
        return Staged(frame, frame.nbytes)

    def upload(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """HWC uint8 arrays -> (3, H, W) uint8 tensors on the device, in one pinned copy."""
        if not frames:
            return []
        sizes = [frame.size for frame in frames]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self.pin)
        host, offset = flat.numpy(), 0
        for frame, size in zip(frames, sizes):
            host[offset : offset + size] = frame.reshape(-1)
            offset += size
        on_device = flat.to(self.device, non_blocking=True)
        views, offset = [], 0
        for frame, size in zip(frames, sizes):
            views.append(on_device[offset : offset + size].view(frame.shape).permute(2, 0, 1))
            offset += size
        return views

    def collate(self, payloads: list[object]) -> Collated:
        frames = self.upload(payloads)  # type: ignore[arg-type]
        return Collated(self.tensor_prep(frames), [None] * len(payloads))


@dataclass(frozen=True)
class _Jpeg:
    # uint8 view of a private copy, made on the task thread: the batcher thread is the measured
    # limit of gpu mode, so it must not copy every JPEG itself.
    encoded: torch.Tensor
    orientation: int


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # writable: no torch warning


class GpuMode(TensorMode):
    name = "gpu"

    def __init__(self, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype):
        super().__init__(preprocessing, device, dtype)
        # torchvision 0.29 warns on every call that TorchCodec supersedes it; decode_jpeg works.
        warnings.filterwarnings("ignore", _TORCHVISION_DEPRECATION, DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB

    def stage_bytes(self, data: bytes, max_pixels: int, hold: Hold) -> Staged:
        """A plain JPEG's header is read without Pillow (jpeghead): all this mode needs of it is
        its size and orientation; every other file takes :meth:`stage`'s way, through Pillow."""
        header = jpeghead.read_header(data)
        if header is None or not _has_end_marker(data):
            return super().stage_bytes(data, max_pixels, hold)
        decode.check_header_size(header.width, header.height, max_pixels=max_pixels)
        return self._stage_jpeg(data, header.orientation, hold)

    def stage(self, image: Image.Image, data: bytes, hold: Hold) -> Staged:
        if image.format == "JPEG" and image.mode in ("RGB", "L") and _has_end_marker(data):
            return self._stage_jpeg(data, decode.orientation(image), hold)
        return super().stage(image, data, hold)

    def _stage_jpeg(self, data: bytes, orientation: int, hold: Hold) -> Staged:
        with hold(0):  # the compressed bytes only: they wait in the queue
            return Staged(_Jpeg(_encoded(data), orientation), len(data))

    def collate(self, payloads: list[object]) -> Collated:
        jpegs = [i for i, p in enumerate(payloads) if isinstance(p, _Jpeg)]
        frames: list[torch.Tensor | None] = [None] * len(payloads)
        errors: list[BaseException | None] = [None] * len(payloads)
        decoded = self._decode_jpegs([payloads[i] for i in jpegs])  # type: ignore[misc]
        for index, result in zip(jpegs, decoded):
            if isinstance(result, BaseException):
                errors[index] = result
            else:
                frames[index] = result
        arrays = [i for i, p in enumerate(payloads) if isinstance(p, np.ndarray)]
        for index, frame in zip(arrays, self.upload([payloads[i] for i in arrays])):  # type: ignore[misc]
            frames[index] = frame
        ok = [frame for frame in frames if frame is not None]
        pixels = self.tensor_prep(ok) if ok else torch.empty((0, *self.preprocessing.output_shape))
        return Collated(pixels, errors)

    def _decode_jpegs(self, jpegs: list[_Jpeg]) -> list[torch.Tensor | BaseException]:
        """Oriented frames on the device, in one batched decode; when that call fails, each image
        alone, and Pillow for an image the device decoder refuses (it tells corrupt from odd)."""
        if not jpegs:
            return []
        tensors = [j.encoded for j in jpegs]
        try:
            frames = self._decode_jpeg(tensors, mode=self._rgb, device=self.device)
        except RuntimeError:
            return [self._decode_one(t, j) for t, j in zip(tensors, jpegs)]
        return [orient(f, j.orientation) for f, j in zip(frames, jpegs)]

    def _decode_one(self, tensor: torch.Tensor, jpeg: _Jpeg) -> torch.Tensor | BaseException:
        try:
            return orient(self._decode_jpeg(tensor, mode=self._rgb, device=self.device), jpeg.orientation)
        except RuntimeError as error:
            log.info("device JPEG decode refused an image (%s); decoding it with Pillow", error)
        # This frame is decoded on the batcher thread under only the compressed bytes' budget.
        # It is bounded all the same: the batcher thread decodes one such image at a time, its
        # pixels were checked against REALSCORE_MAX_IMAGE_PIXELS on the task thread, and the host
        # frame is dropped once uploaded; and only JPEGs the device decoder refused come here.
        try:  # Pillow applies the orientation itself
            image = decode.open_image(jpeg.encoded.numpy().tobytes(), max_pixels=1 << 62)  # checked on the task thread
            frame = self.decode_frame(image, _no_hold)
        except ScoringError as error:
            return error
        return self.upload([frame])[0]


def _has_end_marker(data: bytes) -> bool:
    """Whether a JPEG ends (give or take trailing bytes) with its EOI marker. A truncated file
    does not, and a device decoder may fill the missing rows with grey instead of refusing:
    Pillow decodes it, so it fails as ``corrupt_image`` as in ``exact`` mode."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) != -1


class _NoHold(AbstractContextManager):
    def __exit__(self, *exc: object) -> None:
        return None


def _no_hold(nbytes: int) -> AbstractContextManager:
    return _NoHold()  # see GpuMode._decode_one: one frame at a time on the batcher thread


def resolve_mode(name: str, device: torch.device) -> str:
    """``auto`` -> ``gpu`` on a CUDA device when torchvision imports, else ``exact``."""
    if name == "auto":
        if device.type == "cuda" and _has_torchvision():
            return "gpu"
        return "exact"
    if name not in MODES:
        raise DecodeModeError(f"REALSCORE_DECODE={name}: must be auto, exact, tensor or gpu")
    if name == "gpu" and not _has_torchvision():
        raise DecodeModeError(
            "REALSCORE_DECODE=gpu needs torchvision: pip install 'realscore[gpu]' (or choose tensor)"
        )
    return name


def make_mode(name: str, preprocessing: Preprocessing, device: torch.device, dtype: torch.dtype) -> Mode:
    """The mode object for ``REALSCORE_DECODE=name`` (``auto`` resolved here)."""
    chosen = resolve_mode(name, device)
    kind = {"exact": ExactMode, "tensor": TensorMode, "gpu": GpuMode}[chosen]
    return kind(preprocessing, device, dtype)


def _has_torchvision() -> bool:
    warnings.filterwarnings("ignore", _TORCHVISION_DEPRECATION, DeprecationWarning)
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True
