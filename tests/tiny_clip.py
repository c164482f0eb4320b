"""Test and benchmark helpers: a tiny CLIP tower saved like a hub checkpoint, seed-format
checkpoints, and image files. No network: everything is built from a ``CLIPVisionConfig``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

TINY_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
)


def make_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """``save_pretrained`` a random tiny CLIP vision tower and its image processor config."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CONFIG))
    model.save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)
    return directory


def seed_state_dict(tower_dir: Path, seed: int = 1, perturb_tower: bool = False) -> dict:
    """The seed's ``model_state_dict``: ``clip_encoder.*`` plus a random head."""
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    generator = torch.Generator().manual_seed(seed)
    hidden = tower.config.hidden_size
    # The seed saved with transformers 4, whose CLIPVisionModel keys start with "vision_model.";
    # transformers 5 drops that prefix. Write the seed's form, as in the real modelo_final.pth.
    state = {
        "clip_encoder." + (k if k.startswith("vision_model.") else f"vision_model.{k}"): v.clone()
        for k, v in tower.state_dict().items()
    }
    if perturb_tower:
        key = "clip_encoder.vision_model.post_layernorm.weight"
        state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=generator)
    state["linear.weight"] = torch.randn((1, hidden), generator=generator) * (2.0 / hidden**0.5)
    state["linear.bias"] = torch.randn((1,), generator=generator) * 0.1
    return state


def make_seed_checkpoint(path: Path, tower_dir: Path, seed: int = 1, **extra: object) -> Path:
    """A ``modelo_final.pth`` in the seed's exact format, with numpy metrics beside the weights."""
    payload = {
        "model_state_dict": seed_state_dict(tower_dir, seed, bool(extra.pop("perturb_tower", False))),
        "epoch": 7,
        "val_f1": np.float64(0.9792),
        "val_auc": np.float32(1.0),
    }
    payload.update(extra)
    torch.save(payload, path)
    return path


def noise_image(seed: int, size: tuple[int, int] = (300, 260)) -> Image.Image:
    """A reproducible RGB image with structure and noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x + y) / 2], axis=2)
    pixels = 255 * np.clip(base * rng.uniform(0.3, 1.0) + rng.normal(0, 0.15, (height, width, 3)), 0, 1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")
