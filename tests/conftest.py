"""Shared fixtures: a tiny CLIP and seed-format weights, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_clip import make_seed_checkpoint, make_tiny_clip, noise_image


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests need CUDA: skipped (with the reason) where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def seed_checkpoint(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seed_checkpoint(tmp_path_factory.mktemp("weights") / "modelo_final.pth", tiny_clip_dir)


@pytest.fixture(scope="session")
def loaded_model(tiny_clip_dir: Path, seed_checkpoint: Path):
    from worker.model.loader import load_model

    return load_model(str(tiny_clip_dir), seed_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_env(tiny_clip_dir: Path, seed_checkpoint: Path) -> dict[str, str]:
    """The variables that point realscore at the tiny model (for a subprocess that a fixture
    wider than one test starts; a test itself uses ``realscore_env``)."""
    return {
        "REALSCORE_MODEL": str(tiny_clip_dir),
        "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint),
        "REALSCORE_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture()
def realscore_env(monkeypatch: pytest.MonkeyPatch, tiny_model_env: dict[str, str]) -> dict:
    """Environment that points realscore at the tiny model, for in-process and subprocess use."""
    env = dict(tiny_model_env)
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


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A dedicated Redis database for the tests, emptied before and after the session."""
    import redis

    from tests.processes import TEST_REDIS_URL

    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.ping()  # integration tests need the real Redis: fail loudly if it is not there
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def celery_app(redis_url: str):
    """``shared.celery_app.app`` pointed at the test database (the client uses the same app)."""
    from shared.celery_app import app, configure
    from shared.settings import load_settings

    configure(app, load_settings(broker_url=redis_url, result_backend=redis_url))
    return app


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the test worker may read (its REALSCORE_LOCAL_ROOTS)."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's standalone S3 server over HTTP on a free loopback port (not a patched boto3)."""
    import os

    from moto.server import ThreadedMotoServer

    from tests.processes import free_port

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def worker_env(
    tiny_clip_dir: Path, seed_checkpoint: Path, redis_url: str, served_dir: Path, s3_endpoint: str
) -> dict:
    import json

    from tests.processes import free_port

    return {
        "REALSCORE_MODEL": str(tiny_clip_dir),
        "REALSCORE_HEAD_WEIGHTS": str(seed_checkpoint),
        "REALSCORE_DEVICE": "cpu",
        "REALSCORE_BROKER_URL": redis_url,
        "REALSCORE_RESULT_BACKEND": redis_url,
        "REALSCORE_LOCAL_ROOTS": json.dumps([str(served_dir)]),
        "REALSCORE_MAX_BATCH_SIZE": "16",
        "REALSCORE_MAX_WAIT_MS": "50",
        "REALSCORE_METRICS_PORT": str(free_port()),
        "REALSCORE_S3_ENDPOINT_URL": s3_endpoint,
        # Empty refuses s3:// (fail closed); the S3 tests make buckets with random names.
        "REALSCORE_S3_BUCKETS": '["*"]',
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict, celery_app, tmp_path_factory: pytest.TempPathFactory):
    """One real ``realscore worker`` process for the session's integration tests."""
    from tests.processes import WorkerProcess

    process = WorkerProcess(worker_env, tmp_path_factory.mktemp("logs") / "worker.log").start()
    try:
        process.wait_ready(celery_app)
        yield process
    finally:
        process.stop()
