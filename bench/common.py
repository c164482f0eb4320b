"""Helpers shared by the bench scripts: random-weight CLIP towers of real shapes, saved like
hub checkpoints (no network: the weights do not change the cost), with a seed-format head.

Imports only torch, transformers and the test helpers, so a bench that uses it runs on a GPU
machine without the service's other dependencies (pydantic, Celery, boto3).
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tests.tiny_clip import TINY_CONFIG, make_seed_checkpoint

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
