"""A head is refused on a tower it was not made for, even one of the same shape (README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli import main
from tests.tiny_clip import make_tiny_clip, noise_image


@pytest.fixture(scope="module")
def twin_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP's config with other random weights: same shape, another model."""
    return make_tiny_clip(tmp_path_factory.mktemp("twin-clip"), seed=99)


def test_a_converted_head_is_refused_on_a_same_shape_local_tower(
    realscore_env: dict, tiny_clip_dir: Path, seed_checkpoint: Path, twin_tower: Path, tmp_path: Path
) -> None:
    from worker.model.loader import ModelLoadError, load_model

    head = tmp_path / "head.safetensors"
    assert main(["convert", str(seed_checkpoint), "--out", str(head)]) == 0
    load_model(str(tiny_clip_dir), head, device="cpu", dtype="float32")  # its own tower: fine
    with pytest.raises(ModelLoadError, match="same shape"):
        load_model(str(twin_tower), head, device="cpu", dtype="float32")


def test_a_fine_tuned_head_carries_the_weights_it_runs_on(
    realscore_env: dict, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    from tests.tiny_clip import make_seed_checkpoint
    from worker.model.loader import load_model

    checkpoint = make_seed_checkpoint(tmp_path / "ft.pth", tiny_clip_dir, perturb_tower=True)
    head = tmp_path / "ft.safetensors"
    assert main(["convert", str(checkpoint), "--out", str(head), "--fp16"]) == 0
    loaded = load_model(str(tiny_clip_dir), head, device="cpu", dtype="float32")
    assert "+tower:" in loaded.model_id


def test_a_trained_head_is_refused_on_a_same_shape_local_tower(
    realscore_env: dict, tiny_clip_dir: Path, twin_tower: Path, tmp_path: Path
) -> None:
    from worker.model.loader import ModelLoadError, load_model

    for label in ("real", "ai"):
        (tmp_path / label).mkdir()
        for i in range(4):
            noise_image(i + (10 if label == "ai" else 0), (64, 64)).save(tmp_path / label / f"{i}.png")
    head = tmp_path / "trained.safetensors"
    args = ["train", "--real", str(tmp_path / "real"), "--ai", str(tmp_path / "ai"), "--out", str(head)]
    assert main([*args, "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    with pytest.raises(ModelLoadError, match="same shape"):
        load_model(str(twin_tower), head, device="cpu", dtype="float32")
