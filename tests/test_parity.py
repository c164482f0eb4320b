"""``realscore score`` equals the seed's tensor path, computed independently in the test.

The reference: pixels in [0, 1] -> CLIPImageProcessor (Pillow backend, ``do_rescale=False``) ->
CLIPVisionModel (eager attention) -> pooler_output -> linear -> 2*sigmoid - 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tests.images import write_variants


def seed_reference_scores(tower_dir: Path, checkpoint: Path, images: list[Path]) -> list[float]:
    numpy_globals = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]
    with torch.serialization.safe_globals(numpy_globals):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model_state_dict"]
    tower = CLIPVisionModel.from_pretrained(tower_dir, attn_implementation="eager").eval()
    prefix = "clip_encoder.vision_model."
    tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
    scores = []
    with torch.no_grad():
        for path in images:
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(rgb).permute(2, 0, 1)
            pixel_values = processor(images=x, do_rescale=False, return_tensors="pt")["pixel_values"]
            pooled = tower(pixel_values=pixel_values).pooler_output
            logit = pooled @ state["linear.weight"].T + state["linear.bias"]
            scores.append(float(2 * torch.sigmoid(logit) - 1))
    return scores


def run_score_cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "score", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def cli_runs(
    tiny_model_env: dict[str, str], image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[list[str], Future[subprocess.CompletedProcess]]]]:
    """This module's two ``realscore score`` runs (seconds each: they load the model) start
    together, each in a thread, when the first of their tests asks. Yields, by name, what each
    scored and its run: ``png``, the PNGs of ``image_dir`` by absolute path; ``variants``, every
    variant and bad file by relative path (run in their folder, so echoed as given)."""
    pngs = [str(path) for path in sorted(image_dir.glob("*.png"))]
    folder = tmp_path_factory.mktemp("variants")
    names = list(write_variants(folder))
    with ThreadPoolExecutor(2) as pool:
        yield {
            "png": (pngs, pool.submit(run_score_cli, tiny_model_env, "--batch-size", "3", *pngs)),
            "variants": (names, pool.submit(run_score_cli, tiny_model_env, *names, cwd=folder)),
        }


def test_cli_matches_seed_tensor_path_on_png(cli_runs: dict, tiny_clip_dir: Path, seed_checkpoint: Path) -> None:
    uris, run = cli_runs["png"]
    images = [Path(uri) for uri in uris]
    done = run.result()
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["uri"] for r in results] == [str(p) for p in images]
    ours = [r["score"] for r in results]
    reference = seed_reference_scores(tiny_clip_dir, seed_checkpoint, images)
    assert ours == pytest.approx(reference, abs=1e-4)
    assert max(ours) - min(ours) > 1e-3  # the images really score differently: the check has teeth
    assert all(r["ok"] and r["label"] == ("real" if r["score"] > 0 else "ai") for r in results)


def test_cli_scores_every_variant_and_codes_every_bad_file(cli_runs: dict) -> None:
    names, run = cli_runs["variants"]
    done = run.result()  # relative paths, echoed as given
    assert done.returncode == 0, done.stderr
    results = {r["uri"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert list(results) == names
    bad = {"empty.png": "not_an_image", "notes.txt": "not_an_image",
           "truncated.jpg": "corrupt_image", "bomb.png": "too_many_pixels"}
    for name, result in results.items():
        if name in bad:
            assert not result["ok"] and result["error"]["code"] == bad[name], result
            assert result["score"] is None
        else:
            assert result["ok"], result
            assert -1.0 <= result["score"] <= 1.0
            assert len(result["sha256"]) == 64
    assert results["grey16.png"]["score"] == pytest.approx(results["grey8.png"]["score"], abs=1e-3)
    assert results["exif-rotated.jpg"]["score"] == pytest.approx(results["upright.jpg"]["score"], abs=2e-3)
    assert results["rgba.png"]["score"] != pytest.approx(results["upright.png"]["score"], abs=1e-6)


def test_cli_config_errors_exit_2_with_one_line(
    realscore_env: dict, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from shared.cli import main
    from shared.settings import get_settings

    image = str(image_dir / "img0.png")
    monkeypatch.setenv("REALSCORE_HEAD_WEIGHTS", str(tmp_path / "nope.pth"))
    get_settings.cache_clear()
    assert main(["score", image]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "REALSCORE_HEAD_WEIGHTS" in err and err.count("\n") == 1

    monkeypatch.setenv("REALSCORE_MAX_BATCH_SIZE", "lots")
    get_settings.cache_clear()
    assert main(["score", image]) == 2
    assert "REALSCORE_MAX_BATCH_SIZE" in capsys.readouterr().err
    get_settings.cache_clear()

    with pytest.raises(SystemExit) as usage:
        main(["score"])
    assert usage.value.code == 2
