"""``realscore train``: separable families learned, the worker loads the head, seeds reproduce,
features are cached and travel compactly."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shared.cli import main
from shared.settings import load_settings
from tests.lifecycle_images import smooth, textured, write_families
from worker.lifecycle.evaluation import compute_metrics
from worker.lifecycle.features import FeatureCache, decode_features, encode_features
from worker.model.loader import load_model
from worker.model.model_string import model_string, tower_key
from worker.serving.service import ScoringService
from worker.model.weights import file_sha256

COUNT = 40  # per class


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_families(tmp_path_factory.mktemp("train-families"), COUNT)


@pytest.fixture()
def reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def _train(capsys, families, out: Path, cache: Path, *extra: str) -> str:
    real, ai = families
    code = main(
        [
            "train",
            "--real",
            str(real),
            "--ai",
            str(ai),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            *extra,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    return printed


def test_features_wire_format_round_trip() -> None:
    vector = np.random.default_rng(0).normal(size=1024).astype(np.float32)
    text = encode_features(vector)
    assert len(base64.b64decode(text)) == 2 * 1024  # float16: 2 bytes per value
    assert np.allclose(decode_features(text, 1024), vector, atol=2e-3)
    assert decode_features(encode_features(torch.ones(8).numpy()), 8).dtype == np.float32
    with pytest.raises(ValueError):
        decode_features(text, 1000)
    assert tower_key("openai/clip+head:0123abcd") == "openai/clip"
    assert tower_key("local/dir+head:0123abcd+tower:ff00aa") == "local/dir+tower:ff00aa"


def test_feature_cache_is_per_tower(tmp_path: Path) -> None:
    with FeatureCache(tmp_path, "tower-a") as cache:
        cache.put_many({"sha1": np.arange(4, dtype=np.float32)})
        assert list(cache.get_many(["sha1", "sha2"])) == ["sha1"]
    with FeatureCache(tmp_path, "tower-b") as other:
        assert other.get_many(["sha1"]) == {}
    with FeatureCache(tmp_path, "tower-a") as again:
        assert np.array_equal(again.get_many(["sha1"])["sha1"], np.arange(4, dtype=np.float32))


def test_train_learns_separable_families(
    capsys, realscore_env, reproducible, tiny_clip_dir, families, tmp_path
):
    out = tmp_path / "head.safetensors"
    printed = _train(capsys, families, out, tmp_path / "cache", "--test-split", "0.3")
    assert f"extracting features of {2 * COUNT} files (0 already cached)" in printed
    held_out = float(re.search(r"AUC-ROC\s+([0-9.]+)", printed).group(1))
    assert held_out > 0.95, printed
    assert "held out 24" in printed

    # The worker loads it, and it separates images it has never seen.
    loaded = load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")
    assert loaded.model_id in printed
    fresh = [textured(seed) for seed in range(500, 515)] + [
        smooth(seed) for seed in range(500, 515)
    ]
    scores = loaded.score(torch.stack([loaded.preprocessing(image) for image in fresh]))
    metrics = compute_metrics(scores, ["real"] * 15 + ["ai"] * 15, high_score_means="real")
    assert metrics.auc_roc > 0.9  # 15 + 15 unseen images: a looser bound than the split's

    with safe_open(str(out), framework="pt") as handle:
        assert sorted(handle.keys()) == ["linear.bias", "linear.weight"]
        metadata = handle.metadata()
    assert metadata["tower"] == str(tiny_clip_dir) and metadata["hidden_size"] == "32"
    assert (metadata["threshold"], metadata["high_score_means"]) == ("0.0", "real")
    assert json.loads(metadata["preprocessing"])["crop_height"] == 224
    assert json.loads(metadata["tower_config"])["num_hidden_layers"] == 2  # the loader checks it
    training = json.loads(metadata["training_data"])
    assert training["real"]["images"] == training["ai"]["images"] == COUNT
    assert training["seed"] == 0 and training["date"] == "2023-11-14T22:13:20Z"
    assert sum(training["split"].values()) == 2 * COUNT


def test_same_seed_same_bytes_and_cache_reused(
    capsys, realscore_env, reproducible, families, tmp_path
):
    first, second, fresh_cache, other_seed = (
        tmp_path / f"{name}.safetensors" for name in ("a", "b", "c", "d")
    )
    _train(capsys, families, first, tmp_path / "cache", "--seed", "5")
    printed = _train(capsys, families, second, tmp_path / "cache", "--seed", "5")
    assert f"all {2 * COUNT} files' features are cached" in printed
    assert file_sha256(first) == file_sha256(second)
    _train(capsys, families, fresh_cache, tmp_path / "cache2", "--seed", "5")
    assert file_sha256(fresh_cache) == file_sha256(first)
    _train(capsys, families, other_seed, tmp_path / "cache", "--seed", "6")
    assert file_sha256(other_seed) != file_sha256(first)


def test_head_metadata_sets_the_workers_verdicts(
    capsys, realscore_env, tiny_clip_dir, families, tmp_path
):
    out = tmp_path / "ai-high.safetensors"
    _train(capsys, families, out, tmp_path / "cache", "--high-score-means", "ai")
    loaded = load_model(str(tiny_clip_dir), out, device="cpu", dtype="float32")
    service = ScoringService(loaded, load_settings(), local_roots=None).start()
    try:
        real, ai = families
        results = service.score_uris([str(real / "t000.png"), str(ai / "s000.png")])
    finally:
        service.stop()
    assert [result["label"] for result in results] == ["real", "ai"]
    assert results[1]["score"] > 0  # a high score now means AI


def test_via_queue_uses_the_embed_task(
    capsys, monkeypatch, realscore_env, loaded_model, families, tmp_path
):
    """``--via-queue``: features from a real ScoringService's embed rows, as the task sends them."""
    from shared import client

    service = ScoringService(loaded_model, load_settings(), local_roots=None).start()
    calls: list[int] = []

    def embed_many(uris, timeout):
        calls.append(len(uris))
        return service.map(service.embed_uri, list(uris))

    monkeypatch.setattr(client, "embed_many", embed_many)
    try:
        printed = _train(
            capsys, families, tmp_path / "q.safetensors", tmp_path / "cache", "--via-queue"
        )
        assert calls == [2 * COUNT] and "held out" in printed
        # A fine-tuned tower's features must not train a head that will run on the pretrained one.
        monkeypatch.setattr(
            client,
            "embed_many",
            lambda uris, timeout: [
                {**row, "model": row["model"] + "+tower:abcdef"}
                for row in embed_many(uris, timeout)
            ],
        )
        real, ai = families
        code = main(
            [
                "train",
                "--real",
                str(real),
                "--ai",
                str(ai),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--cache-dir",
                str(tmp_path / "other-cache"),
                "--via-queue",
            ]
        )
    finally:
        service.stop()
    assert code == 2
    assert "+tower:abcdef" in capsys.readouterr().err


def test_a_model_that_breaks_mid_extraction_ends_with_one_line(
    capsys, realscore_env, tiny_clip_dir, families, tmp_path, monkeypatch
):
    import itertools

    from worker.model import loader
    from shared.cli import EXIT_FAILURE

    real_build = loader.build_model

    def build_model(*args, **kwargs):  # serves two forward passes, then a sticky CUDA-style error
        loaded = real_build(*args, **kwargs)
        real_launch, calls = loaded.launch, itertools.count()

        def launch(pixels, **options):
            if next(calls) >= 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_launch(pixels, **options)

        loaded.launch = launch
        return loaded

    monkeypatch.setattr(loader, "build_model", build_model)
    real, ai = families
    out = tmp_path / "head.safetensors"
    code = main(["train", "--real", str(real), "--ai", str(ai), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert "Traceback" not in err and not out.exists()
    assert err.strip().splitlines()[-1].startswith("realscore train: the model stopped working (")


def test_too_few_images_is_a_usage_error(capsys, realscore_env, tmp_path):
    real, ai = write_families(tmp_path / "few", 2)
    code = main(
        [
            "train",
            "--real",
            str(real),
            "--ai",
            str(ai),
            "--out",
            str(tmp_path / "h.safetensors"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2
    assert "at least 3" in capsys.readouterr().err


def test_tower_key_ignores_how_the_worker_ran_the_tower():
    assert tower_key("openai/clip+head:0123abcd+fp16+decode:gpu") == "openai/clip"
    assert tower_key("d+head:01+tower:ff00+bf16+decode:exact") == "d+tower:ff00"


@pytest.mark.parametrize("tower", ["openai/clip-vit-large-patch14", "/models/x+fp16/clip", "/m/a+head:zz"])
@pytest.mark.parametrize("tower_sha", [None, "ab" * 32])
def test_tower_key_reads_what_model_string_writes(tower: str, tower_sha: str | None) -> None:
    """The one writer of the format and its reader agree, even for a directory with a "+" in it."""
    weights = model_string(tower, tower_sha=tower_sha)
    for dtype, decode in (("fp32", "exact"), ("bf16", "gpu"), (None, None)):
        assert tower_key(model_string(tower, "cd" * 32, tower_sha, dtype, decode)) == weights
    assert tower_key(tower) == tower
