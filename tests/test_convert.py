"""``realscore convert``: safe round trip, fine-tuned towers detected, self-describing metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shared.cli import main
from shared.settings import get_settings, load_settings
from tests.tiny_clip import make_seed_checkpoint, noise_image
from worker.model.loader import ModelLoadError, check_metadata, load_model, load_tower
from worker.serving.service import verdict_rule
from worker.model.weights import file_sha256


def _pixels(loaded) -> torch.Tensor:
    return torch.stack([loaded.preprocessing(noise_image(seed)) for seed in range(4)])


def _convert(capsys, checkpoint: Path, out: Path, model: Path, *extra: str) -> dict[str, str]:
    code = main(["convert", str(checkpoint), "--out", str(out), "--model", str(model), *extra])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = dict(
        line.split(" ", 1) for line in printed.splitlines() if line.startswith(("sha256", "model"))
    )
    lines["text"] = printed
    return lines


def test_round_trip_gives_identical_scores(
    capsys, realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path
):
    out = tmp_path / "head.safetensors"
    printed = _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    assert "head only" in printed["text"]
    assert printed["sha256"] == file_sha256(out)
    with safe_open(str(out), framework="pt") as handle:
        assert sorted(handle.keys()) == ["linear.bias", "linear.weight"]
        metadata = handle.metadata()
    assert out.stat().st_size < 4096

    original = load_model(str(tiny_clip_dir), seed_checkpoint, device="cpu", dtype="float32")
    converted = load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")
    assert converted.model_id == original.model_id == printed["model"]
    pixels = _pixels(original)
    assert converted.score(pixels) == original.score(pixels)

    assert metadata["tower"] == str(tiny_clip_dir)
    assert metadata["hidden_size"] == "32"
    assert json.loads(metadata["preprocessing"])["shortest_edge"] == 224
    assert (metadata["threshold"], metadata["high_score_means"]) == ("0.0", "real")
    training = json.loads(metadata["training_data"])
    assert training["checkpoint_sha256"] == file_sha256(seed_checkpoint)
    assert training["fine_tuned_tower"] is False

    again = tmp_path / "again.safetensors"
    _convert(capsys, seed_checkpoint, again, tiny_clip_dir)
    training_again = json.loads(safe_open(str(again), framework="pt").metadata()["training_data"])
    if training_again["date"] == training["date"]:  # same second: the bytes must match too
        assert file_sha256(again) == file_sha256(out)


def test_fine_tuned_tower_is_detected_and_kept(capsys, realscore_env, tiny_clip_dir, tmp_path):
    checkpoint = make_seed_checkpoint(tmp_path / "tuned.pth", tiny_clip_dir, perturb_tower=True)
    out = tmp_path / "tuned.safetensors"
    printed = _convert(capsys, checkpoint, out, tiny_clip_dir)
    assert "fine-tuned" in printed["text"]
    with safe_open(str(out), framework="pt") as handle:
        assert any(key.startswith("clip_encoder.") for key in handle.keys())

    original = load_model(str(tiny_clip_dir), checkpoint, device="cpu", dtype="float32")
    converted = load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")
    assert "+tower:" in original.model_id
    assert converted.model_id == original.model_id == printed["model"]
    pixels = _pixels(original)
    assert converted.score(pixels) == original.score(pixels)

    half = tmp_path / "tuned16.safetensors"
    printed16 = _convert(capsys, checkpoint, half, tiny_clip_dir, "--fp16")
    assert half.stat().st_size < out.stat().st_size
    loaded16 = load_model(str(tiny_clip_dir), half, device="cpu", dtype="float32")
    assert loaded16.model_id == printed16["model"] != original.model_id
    assert loaded16.score(pixels) == pytest.approx(original.score(pixels), abs=1e-2)


def test_decision_rule_travels_in_the_metadata(
    capsys, monkeypatch, realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path
):
    monkeypatch.setenv("REALSCORE_THRESHOLD", "0.25")
    monkeypatch.setenv("REALSCORE_HIGH_SCORE_MEANS", "ai")
    get_settings.cache_clear()
    out = tmp_path / "head.safetensors"
    _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    monkeypatch.delenv("REALSCORE_THRESHOLD")
    monkeypatch.delenv("REALSCORE_HIGH_SCORE_MEANS")

    loaded = load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")
    assert verdict_rule(load_settings(), loaded.head_metadata) == (0.25, "ai")
    # The environment still wins over the head's defaults.
    explicit = load_settings(threshold=-0.5, high_score_means="real")
    assert verdict_rule(explicit, loaded.head_metadata) == (-0.5, "real")


def test_contradicting_metadata_is_refused(tiny_clip_dir):
    tower = load_tower(str(tiny_clip_dir))
    check_metadata({"tower": "org/tower", "hidden_size": "32"}, tower, "org/tower")
    with pytest.raises(Exception, match="hidden size 64"):
        check_metadata({"hidden_size": "64"}, tower, "org/tower")
    with pytest.raises(Exception, match="made for tower org/other"):
        check_metadata({"tower": "org/other"}, tower, "org/tower")


def test_wrong_hidden_size_metadata_stops_the_loader(
    realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path, capsys
):
    out = tmp_path / "head.safetensors"
    _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    from worker.model.headfile import write_weights
    from worker.model.weights import read_checkpoint

    checkpoint = read_checkpoint(out)
    lying = tmp_path / "lying.safetensors"
    write_weights(lying, checkpoint.head, {**checkpoint.metadata, "hidden_size": "1024"})
    with pytest.raises(ModelLoadError, match="hidden size 1024"):
        load_model(str(tiny_clip_dir), lying, device="cpu", dtype="float32")


def test_usage_errors_exit_2(capsys, realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path):
    assert main(["convert", str(seed_checkpoint), "--out", str(tmp_path / "head.pth")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert (
        main(["convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "h.safetensors")])
        == 2
    )
    assert "not found" in capsys.readouterr().err


def _other_tiny_clip(directory: Path, **changes: object) -> Path:
    """A tiny tower like ``tiny_clip_dir`` (same hidden size) with some config values changed."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tests.tiny_clip import TINY_CONFIG

    CLIPVisionModel(CLIPVisionConfig(**{**TINY_CONFIG, **changes})).save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)
    return directory


def test_converted_head_records_the_towers_config(
    capsys, realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path
):
    out = tmp_path / "head.safetensors"
    _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    metadata = safe_open(str(out), framework="pt").metadata()
    assert json.loads(metadata["tower_config"]) == {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "image_size": 224,
        "patch_size": 14,
        "num_hidden_layers": 2,
    }


def test_head_for_a_tower_of_the_same_width_but_another_config_is_refused(
    capsys, realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path
):
    out = tmp_path / "head.safetensors"
    _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    deeper = _other_tiny_clip(tmp_path / "deeper-tower", num_hidden_layers=3)
    # Both names are local directories and the hidden sizes match: only the fingerprint differs.
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(deeper), out, device="cpu", dtype="float32")
    message = str(caught.value)
    assert "num_hidden_layers=2" in message and "num_hidden_layers=3" in message
    assert str(tiny_clip_dir) in message and str(deeper) in message
    load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")  # its own tower loads


def test_hub_ids_are_compared_even_when_a_same_named_folder_is_in_the_cwd(
    tiny_clip_dir, tmp_path, monkeypatch
):
    tower = load_tower(str(tiny_clip_dir))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "other").mkdir(parents=True)  # must not switch the comparison off
    with pytest.raises(Exception, match="made for tower org/other"):
        check_metadata({"tower": "org/other"}, tower, "org/tower")
    # A local directory on either side is not a hub id: the config fingerprint decides instead.
    check_metadata({"tower": str(tmp_path / "org" / "other")}, tower, "org/tower")
    check_metadata({"tower": "org/other"}, tower, str(tiny_clip_dir))


@pytest.mark.parametrize(
    ("metadata", "detail"),
    [
        ({"hidden_size": "thirty-two"}, "thirty-two"),
        ({"hidden_size": ""}, "malformed"),
        ({"tower_config": 32}, "malformed"),  # not a string: a TypeError inside
        ({"tower_config": "{not json"}, "malformed"),
        ({"tower_config": "[32]"}, "not a JSON object"),
    ],
)
def test_malformed_metadata_is_a_weights_error(tiny_clip_dir, metadata, detail):
    from worker.model.weights import WeightsError

    tower = load_tower(str(tiny_clip_dir))
    with pytest.raises(WeightsError, match=detail):
        check_metadata(metadata, tower, str(tiny_clip_dir))


def test_malformed_metadata_stops_the_loader_with_its_error(
    realscore_env, tiny_clip_dir, seed_checkpoint, tmp_path, capsys
):
    from worker.model.headfile import write_weights
    from worker.model.weights import read_checkpoint

    out = tmp_path / "head.safetensors"
    _convert(capsys, seed_checkpoint, out, tiny_clip_dir)
    checkpoint = read_checkpoint(out)
    broken = tmp_path / "broken.safetensors"
    write_weights(broken, checkpoint.head, {**checkpoint.metadata, "hidden_size": "32.5"})
    with pytest.raises(ModelLoadError, match="malformed"):
        load_model(str(tiny_clip_dir), broken, device="cpu", dtype="float32")


def test_tower_without_preprocessor_config_is_a_model_load_error(
    tiny_clip_dir, seed_checkpoint, tmp_path
):
    import shutil

    bare = tmp_path / "no-preprocessor"
    shutil.copytree(tiny_clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="preprocessing"):
        load_model(str(bare), seed_checkpoint, device="cpu", dtype="float32")
