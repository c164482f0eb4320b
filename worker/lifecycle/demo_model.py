"""``realscore demo-model --out DIR``: a tiny random-weight CLIP tower and head, to try realscore.

Without the seed's weights (or a GPU, or a network) a newcomer can still run every command and
the whole worker path on this model. Its scores mean nothing, and it says so: the tower's folder
and so every result's ``model`` string contain ``demo-random``, the head's metadata carries
``demo``, and loading it logs a warning. The files are the same every time (fixed seed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from shared.usage import EXIT_OK
from worker.model.headfile import head_metadata, tower_weights_sha256, write_weights
from worker.model.model_string import model_string
from worker.model.preprocess import Preprocessing
from worker.model.weights import tensors_sha256

TOWER_DIR = "demo-random-tower"
HEAD_FILE = "demo-random-head.safetensors"
DEMO_NOTE = "random weights: scores are meaningless"
# CLIP's input size and preprocessing, a tiny body: a forward pass takes milliseconds on a CPU.
DEMO_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=224, patch_size=32,
)


def write_demo_model(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tower folder and the head file under ``out``; return their paths."""
    torch.manual_seed(seed)
    tower_dir = out / TOWER_DIR
    tower = CLIPVisionModel(CLIPVisionConfig(**DEMO_CONFIG))
    tower.save_pretrained(tower_dir)
    CLIPImageProcessorPil().save_pretrained(tower_dir)
    hidden = tower.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    head = {
        "linear.weight": torch.randn((1, hidden), generator=generator) / hidden**0.5,
        "linear.bias": torch.zeros(1),
    }
    metadata = head_metadata(
        tower=str(tower_dir),
        tower_config=tower.config,
        hidden_size=hidden,
        preprocessing=Preprocessing.from_pretrained(str(tower_dir)),
        threshold=0.0,
        high_score_means="real",
        training_data={"source": "demo-random", "seed": seed, "note": DEMO_NOTE},
        tower_weights=tower_weights_sha256(tower),
    )
    metadata["demo"] = DEMO_NOTE
    head_path = write_weights(out / HEAD_FILE, head, metadata)
    return tower_dir, head_path


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    tower_dir, head_path = write_demo_model(out)
    head = load_file(str(head_path))
    print(
        f"wrote a demo model to {out}: {DEMO_NOTE}, for trying realscore only; its results' "
        f"model string starts {model_string(str(tower_dir), tensors_sha256(head))}.\n"
        "Set these variables (or run: eval \"$(realscore demo-model --out "
        f"{shlex.quote(args.out)})\"):",
        file=sys.stderr,
        flush=True,
    )
    print(f"export REALSCORE_MODEL={shlex.quote(str(tower_dir))}")
    print(f"export REALSCORE_HEAD_WEIGHTS={shlex.quote(str(head_path))}")
    return EXIT_OK
