"""Reading head (and optional tower) weights safely: the seed's ``.pth`` or our safetensors.

The seed's checkpoint is a pickle, so it is read with ``torch.load(weights_only=True)``; the only
globals allowed beyond tensors are numpy scalars and dtypes (metrics the seed saved beside the
weights). Anything else fails with a message naming the type: never a fallback to full unpickling.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.model_files import ModelFilesError, first_head_weights

HEAD_KEYS = ("linear.weight", "linear.bias")
TOWER_PREFIX = "clip_encoder."
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class WeightsError(RuntimeError):
    """The weights file is missing, unsafe, malformed or does not fit the tower."""


@dataclass(frozen=True)
class Checkpoint:
    """What a weights file holds: the head, maybe a tower, maybe self-describing metadata."""

    path: Path
    head: dict[str, torch.Tensor]
    tower: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.head["linear.weight"].shape[-1])

    @property
    def head_sha(self) -> str:
        return tensors_sha256(self.head)


def _numpy_safe_globals() -> list[object]:
    """numpy scalars and dtypes, under their numpy 2 and numpy 1 pickle names."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list[object] = [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    for name in dir(np.dtypes):
        dtype_class = getattr(np.dtypes, name)
        if isinstance(dtype_class, type) and name.endswith("DType"):
            allowed.append(dtype_class)
    return allowed


def _load_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = _UNSUPPORTED_GLOBAL.search(str(error))
        offender = match.group(1) if match else str(error).splitlines()[0]
        raise WeightsError(
            f"{path}: refusing to unpickle {offender}; only tensors and numpy scalars are "
            "allowed (torch.load weights_only=True). Re-save the checkpoint with plain tensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({error})") from None


def _split(state: Mapping[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    missing = [key for key in HEAD_KEYS if key not in state]
    if missing:
        raise WeightsError(f"{path}: no {', '.join(missing)} in the weights file")
    head = {key: state[key].detach().float().contiguous() for key in HEAD_KEYS}
    if head["linear.weight"].ndim != 2 or head["linear.weight"].shape[0] != 1:
        raise WeightsError(
            f"{path}: linear.weight has shape {list(head['linear.weight'].shape)}, "
            "expected [1, hidden_size]"
        )
    tower = {
        key.removeprefix(TOWER_PREFIX): tensor
        for key, tensor in state.items()
        if key.startswith(TOWER_PREFIX) and not key.endswith("position_ids")
    }
    return head, tower


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a seed ``.pth`` (dict with ``model_state_dict``) or a safetensors head; a missing file
    is refused as :func:`shared.model_files.first_head_weights` words it."""
    try:
        path = first_head_weights([path])
    except ModelFilesError as error:
        raise WeightsError(str(error)) from None
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except Exception as error:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
        head, tower = _split(state, path)
        return Checkpoint(path=path, head=head, tower=tower, metadata=metadata)

    loaded = _load_pickle(path)
    if isinstance(loaded, Mapping) and "model_state_dict" in loaded:
        state = loaded["model_state_dict"]
    elif isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded  # a bare state dict
    else:
        raise WeightsError(f"{path}: expected a dict with 'model_state_dict' (the seed's format)")
    head, tower = _split(state, path)
    return Checkpoint(path=path, head=head, tower=tower)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A content hash of named tensors, independent of the file format they came from."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
