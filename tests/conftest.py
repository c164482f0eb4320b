"""Shared fixtures: a tiny CLIP and seed-format weights, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def seed_checkpoint(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seed_checkpoint(tmp_path_factory.mktemp("weights") / "modelo_final.pth", tiny_clip_dir)


@pytest.fixture(scope="session")
def loaded_model(tiny_clip_dir: Path, seed_checkpoint: Path):
    from worker.loader import load_model

    return load_model(str(tiny_clip_dir), seed_checkpoint, device="cpu", dtype="float32")


@pytest.fixture()
def realscore_env(monkeypatch: pytest.MonkeyPatch, tiny_clip_dir: Path, seed_checkpoint: Path) -> dict:
    """Environment that points realscore at the tiny model, for in-process and subprocess use."""
    env = {
        "REALSCORE_MODEL": str(tiny_clip_dir),
        "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint),
        "REALSCORE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.settings import get_settings

    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few lossless PNGs of different sizes."""
    folder = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(300, 260), (224, 224), (640, 480), (200, 500)]):
        noise_image(i, size).save(folder / f"img{i}.png")
    return folder
