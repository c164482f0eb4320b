"""Loading head weights: the seed's format, safetensors, unsafe pickles, mismatches, missing files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image, seed_state_dict
from worker.model.loader import ModelLoadError, load_model
from worker.model.weights import WeightsError, read_checkpoint


class NotATensor:
    """A custom class a malicious or careless checkpoint might pickle."""

    def __init__(self) -> None:
        self.payload = "anything"


def _pixels(loaded, seeds=(0, 1, 2)) -> torch.Tensor:
    return torch.stack([loaded.preprocessing(noise_image(s)) for s in seeds])


def test_seed_checkpoint_with_numpy_metrics_loads(seed_checkpoint: Path) -> None:
    checkpoint = read_checkpoint(seed_checkpoint)
    assert set(checkpoint.head) == {"linear.weight", "linear.bias"}
    assert checkpoint.hidden_size == 32
    assert "vision_model.post_layernorm.weight" in checkpoint.tower  # the seed's (transformers 4) keys


def test_seed_checkpoint_saved_on_another_device_and_with_position_ids(tiny_clip_dir: Path, tmp_path: Path) -> None:
    state = seed_state_dict(tiny_clip_dir)
    # Older transformers saved this buffer; it must be ignored, not fail the load.
    state["clip_encoder.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    path = tmp_path / "old.pth"
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"lr": 0.001}, "epoch": 3}, path)
    loaded = load_model(str(tiny_clip_dir), path, device="cpu", dtype="float32")
    assert "+tower:" not in loaded.model_id  # the tower equals the pretrained one


def test_safetensors_head_scores_like_the_seed_checkpoint(tiny_clip_dir: Path, seed_checkpoint: Path, tmp_path: Path) -> None:
    head = read_checkpoint(seed_checkpoint).head
    path = tmp_path / "head.safetensors"
    save_file(head, str(path))
    from_pth = load_model(str(tiny_clip_dir), seed_checkpoint, device="cpu", dtype="float32")
    from_safetensors = load_model(str(tiny_clip_dir), path, device="cpu", dtype="float32")
    assert from_pth.model_id == from_safetensors.model_id
    pixels = _pixels(from_pth)
    assert from_pth.score(pixels) == pytest.approx(from_safetensors.score(pixels), abs=1e-6)


def test_pickled_custom_class_is_refused_with_its_name(tiny_clip_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": seed_state_dict(tiny_clip_dir), "extra": NotATensor()}, path)
    with pytest.raises(WeightsError) as caught:
        read_checkpoint(path)
    assert "NotATensor" in str(caught.value)
    assert "weights_only" in str(caught.value)


def test_head_for_another_tower_size_names_both_shapes(tiny_clip_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "vit-b-head.safetensors"
    save_file({"linear.weight": torch.zeros(1, 768), "linear.bias": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tiny_clip_dir), path, device="cpu")
    message = str(caught.value)
    assert "[1, 768]" in message and "[1, 32]" in message


def test_missing_weights_file_says_where_to_put_it(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tiny_clip_dir), tmp_path / "modelo_final.pth", device="cpu")
    assert "REALSCORE_HEAD_WEIGHTS" in str(caught.value)
    assert "modelo_final.pth" in str(caught.value)


def test_checkpoint_without_head_is_refused(tiny_clip_dir: Path, tmp_path: Path) -> None:
    state = seed_state_dict(tiny_clip_dir)
    del state["linear.bias"]
    path = tmp_path / "headless.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(WeightsError, match="linear.bias"):
        read_checkpoint(path)


def test_fine_tuned_tower_in_checkpoint_overrides_pretrained(tiny_clip_dir: Path, tmp_path: Path) -> None:
    plain = make_seed_checkpoint(tmp_path / "plain.pth", tiny_clip_dir, seed=3)
    tuned = make_seed_checkpoint(tmp_path / "tuned.pth", tiny_clip_dir, seed=3, perturb_tower=True)
    base = load_model(str(tiny_clip_dir), plain, device="cpu", dtype="float32")
    fine = load_model(str(tiny_clip_dir), tuned, device="cpu", dtype="float32")
    assert "+tower:" in fine.model_id and "+tower:" not in base.model_id
    pixels = _pixels(base)
    assert max(abs(a - b) for a, b in zip(base.score(pixels), fine.score(pixels))) > 1e-4


def test_tower_weight_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    small = make_tiny_clip(tmp_path / "clip")
    state = seed_state_dict(small)
    state["clip_encoder.vision_model.post_layernorm.weight"] = torch.ones(48)
    path = tmp_path / "bad-tower.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(small), path, device="cpu")
    assert "[48]" in str(caught.value) and "[32]" in str(caught.value)


def test_cuda_requested_without_cuda_is_a_clear_error(tiny_clip_dir: Path, seed_checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(str(tiny_clip_dir), seed_checkpoint, device="cuda")


def test_auto_dtype_is_float32_on_cpu(loaded_model) -> None:
    assert loaded_model.dtype == torch.float32
    assert loaded_model.device.type == "cpu"
    assert not loaded_model.model.training
    assert not any(p.requires_grad for p in loaded_model.model.clip_encoder.parameters())


@pytest.mark.parametrize("threshold", ["abc", "1.5"])
def test_malformed_threshold_metadata_is_a_load_error(tiny_clip_dir: Path, seed_checkpoint: Path, tmp_path: Path, threshold: str) -> None:
    path = tmp_path / "head.safetensors"
    save_file(read_checkpoint(seed_checkpoint).head, str(path), metadata={"threshold": threshold})
    with pytest.raises(ModelLoadError, match="threshold|malformed"):
        load_model(str(tiny_clip_dir), path, device="cpu")
