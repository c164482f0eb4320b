"""Reduced precision and compiled towers against the seed's fp32 path (tests/test_parity.py).

Stated tolerances on the score (range [-1, 1]): fp16 5e-3 and bf16 2e-2 with exact
preprocessing (bf16 keeps 8 bits of mantissa); the production GPU default (fp16 + gpu decode)
2e-2, since its decode may differ from Pillow by one 8-bit level. A compiled tower padded to a
fixed batch size gives the eager scores to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.settings import load_settings
from tests.images import jpeg_bytes, photo_like
from tests.test_parity import seed_reference_scores
from worker.model.decode import decode
from worker.model.loader import load_model
from worker.serving.service import ScoringService, compile_sizes


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("precision")
    paths = []
    for seed in range(5):
        path = folder / f"photo{seed}.jpg"
        path.write_bytes(jpeg_bytes(photo_like(seed, (480, 360)), quality=95))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(tiny_clip_dir: Path, seed_checkpoint: Path, photos: list[Path]) -> list[float]:
    return seed_reference_scores(tiny_clip_dir, seed_checkpoint, photos)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 5e-3), ("bfloat16", 2e-2)])
def test_reduced_precision_on_cpu_stays_near_the_seed(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos, reference, dtype: str, tolerance: float
) -> None:
    loaded = load_model(str(tiny_clip_dir), seed_checkpoint, device="cpu", dtype=dtype)
    service = ScoringService(loaded, load_settings(decode="exact"), local_roots=None).start()
    try:
        results = service.score_uris([str(p) for p in photos])
    finally:
        service.stop()
    short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    assert all(r["ok"] and r["model"].endswith(f"+{short}+decode:exact") for r in results)
    assert max(abs(r["score"] - ref) for r, ref in zip(results, reference)) <= tolerance


@pytest.mark.gpu
def test_cuda_default_fp16_gpu_decode_stays_near_the_seed(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos, reference
) -> None:
    loaded = load_model(str(tiny_clip_dir), seed_checkpoint, device="cuda", dtype="auto")
    service = ScoringService(loaded, load_settings(decode="auto"), local_roots=None).start()
    try:
        results = service.score_uris([str(p) for p in photos])
    finally:
        service.stop()
    assert all(r["ok"] and r["model"].endswith("+fp16+decode:gpu") for r in results)
    assert max(abs(r["score"] - ref) for r, ref in zip(results, reference)) <= 2e-2


def _model_and_pixels(tiny_clip_dir: Path, seed_checkpoint: Path, photos, device: str, dtype: str):
    """The tiny model on ``device`` and the photos preprocessed as the seed does, on the CPU."""
    loaded = load_model(str(tiny_clip_dir), seed_checkpoint, device=device, dtype=dtype)
    pixels = torch.stack([loaded.preprocessing(decode(p.read_bytes(), max_pixels=10**9)) for p in photos])
    return loaded, pixels


@pytest.mark.gpu
def test_cuda_fp16_exact_decode_stays_near_the_seed(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos, reference
) -> None:
    loaded, pixels = _model_and_pixels(tiny_clip_dir, seed_checkpoint, photos, "cuda", "float16")
    scores = loaded.score(pixels)
    assert max(abs(s - ref) for s, ref in zip(scores, reference)) <= 5e-3


def test_a_compiled_tower_pads_to_its_fixed_sizes_and_scores_as_eager(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos
) -> None:
    loaded, pixels = _model_and_pixels(tiny_clip_dir, seed_checkpoint, photos, "cpu", "float32")
    eager = loaded.score(pixels[:3])
    calls: list[int] = []
    loaded.compile("default", [2, 4], backend="eager")  # eager backend: dynamo without a compiler
    compiled = loaded._features
    loaded._features = lambda batch: calls.append(batch.shape[0]) or compiled(batch)  # type: ignore[misc]
    assert loaded.score(pixels[:3]) == pytest.approx(eager, abs=1e-5)
    assert calls == [4]  # three images ran in the warmed-up batch of four
    assert compile_sizes(32) == [4, 8, 16, 32] and compile_sizes(1) == [1]


@pytest.mark.gpu
def test_cuda_graphs_pad_to_their_sizes_score_as_eager_and_never_sync_the_host(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos
) -> None:
    loaded, pixels = _model_and_pixels(tiny_clip_dir, seed_checkpoint, photos, "cuda", "float16")
    eager = loaded.score(pixels[:3])
    loaded.compile("cuda-graphs", [2, 4])
    assert loaded.compiled_sizes == (2, 4)
    device_pixels = pixels[:3].to("cuda", torch.float16)
    torch.cuda.set_sync_debug_mode("error")  # a replay only queues work
    try:
        launched = loaded.launch(device_pixels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loaded.collect(launched)[0] == pytest.approx(eager, abs=1e-3)  # 3 images, graph of 4
    first = loaded.launch(device_pixels[:2])  # two batches in flight, one graph: in stream order
    second = loaded.launch(device_pixels[1:3])
    assert loaded.collect(first)[0] == pytest.approx(eager[:2], abs=1e-3)
    assert loaded.collect(second)[0] == pytest.approx(eager[1:3], abs=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode_name", ["exact", "tensor"])
def test_staging_a_batch_never_waits_for_the_device(
    tiny_clip_dir: Path, seed_checkpoint: Path, photos, mode_name: str
) -> None:
    """The forward step's first half (upload, resize, forward, copies back) queues work and
    returns: CUDA's sync debug mode turns any host synchronisation in it into an error."""
    from contextlib import nullcontext

    from worker.model import decode as decoding
    from worker.model.modes import make_mode

    loaded = load_model(str(tiny_clip_dir), seed_checkpoint, device="cuda", dtype="float16")
    mode = make_mode(mode_name, loaded.preprocessing, loaded.device, loaded.dtype)
    payloads = []
    for path in photos:
        data = path.read_bytes()
        image = decoding.open_image(data, max_pixels=10**9)
        payloads.append(mode.stage(image, data, lambda n: nullcontext()).payload)
    loaded.collect(loaded.launch(mode.collate(payloads).pixels))  # warm-up: allocators, kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = loaded.launch(mode.collate(payloads).pixels, with_features=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scores, features = loaded.collect(launched)
    assert len(scores) == len(photos) and features is not None and features.shape[0] == len(photos)
