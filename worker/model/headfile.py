"""Writing self-describing head files (safetensors) for ``convert`` and ``train``.

The metadata (all values strings, as safetensors requires) names the tower the head was made for,
a fingerprint of that tower's config, a hash of some of its weights (which tells apart two towers
of the same shape), its hidden size, the preprocessing, the decision rule and
where the weights came from; :func:`worker.model.loader.check_metadata` and
:func:`worker.serving.service.verdict_rule` read it back.
The header is rewritten with sorted keys because safetensors serialises metadata in hash order:
the same weights and metadata then always give the same bytes (and the same printed sha256).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save

from worker.model.preprocess import Preprocessing
from worker.model.weights import TOWER_PREFIX, tensors_sha256

_ALIGN = 8
# What in a tower's config a head depends on: the feature width, and what makes two towers of
# the same width different models (the family, input size, patch size and depth).
TOWER_CONFIG_KEYS = ("model_type", "hidden_size", "image_size", "patch_size", "num_hidden_layers")


# Weights that any two differently trained (or fine-tuned) towers do not share; a few MB even for
# ViT-L/14, so hashing them at every load costs milliseconds.
TOWER_IDENTITY_KEYS = (
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",
    "pre_layrnorm.weight",  # sic: transformers' spelling
    "post_layernorm.weight",
    "post_layernorm.bias",
)


def tower_fingerprint(config: object) -> dict[str, object]:
    """The :data:`TOWER_CONFIG_KEYS` of a transformers config (``None`` for a missing key)."""
    return {key: getattr(config, key, None) for key in TOWER_CONFIG_KEYS}


def tower_weights_sha256(tower: torch.nn.Module) -> str:
    """A content hash of the tower's :data:`TOWER_IDENTITY_KEYS` (prefix-free key names)."""
    picked = {}
    for key, tensor in tower.state_dict().items():
        bare = key.removeprefix("vision_model.")
        if bare in TOWER_IDENTITY_KEYS:
            picked[bare] = tensor
    return tensors_sha256(picked)


def head_metadata(
    *,
    tower: str,
    tower_config: object,
    hidden_size: int,
    preprocessing: Preprocessing,
    threshold: float,
    high_score_means: str,
    training_data: Mapping[str, object],
    tower_weights: str | None = None,
) -> dict[str, str]:
    """The metadata block every head we write carries.

    ``tower_weights`` (:func:`tower_weights_sha256` of the tower the head was trained on) is
    recorded when the writer had that tower loaded; the loader then refuses any other tower.

    ``tower`` is recorded as given when it is a hub id and as an absolute path when it is a local
    directory (a relative one would mean nothing on the machine that loads the head), so the
    loader can tell the two apart. ``tower_config`` is the tower's transformers config.
    """
    if os.path.isdir(tower):  # transformers' own rule: an existing directory is loaded locally
        tower = os.path.abspath(tower)
    metadata = {
        "format": "realscore-head/1",
        "tower": tower,
        "tower_config": json.dumps(tower_fingerprint(tower_config), sort_keys=True),
        "hidden_size": str(int(hidden_size)),
        "preprocessing": json.dumps(dataclasses.asdict(preprocessing), sort_keys=True),
        "threshold": repr(float(threshold)),
        "high_score_means": high_score_means,
        "training_data": json.dumps(training_data, sort_keys=True),
    }
    if tower_weights:
        metadata["tower_weights"] = tower_weights
    return metadata


def utc_now() -> str:
    """ISO date of now, or of ``SOURCE_DATE_EPOCH`` when set (reproducible files)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    stamp = float(epoch) if epoch else time.time()
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_weights(
    path: str | Path,
    head: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    tower: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``linear.*`` (and ``clip_encoder.*`` when a tower is given) with sorted metadata."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in head.items()}
    for key, value in (tower or {}).items():
        tensors[TOWER_PREFIX + key] = value.detach().cpu().contiguous()
    blob = save(tensors, metadata=dict(metadata))
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    canonical += b" " * (-len(canonical) % _ALIGN)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(struct.pack("<Q", len(canonical)) + canonical + blob[8 + length :])
    os.replace(partial, path)  # readers never see a half-written head
    return path
