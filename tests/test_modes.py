"""Preprocessing modes (REALSCORE_DECODE) on the tiny CLIP, through the production path.

Tolerances, in normalized pixel units (one 8-bit level is 1/255/std ~ 0.015): ``tensor`` and
``gpu`` may differ from ``exact`` by at most 0.02 on average and 0.1 at any pixel (issue 11's
targets); scores by at most 0.02 on the tiny random tower.
"""

from __future__ import annotations

import io
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.errors import ErrorCode, ScoringError
from shared.settings import load_settings
from tests.images import broken_huffman_jpeg, jpeg_bytes, photo_like, write_variants
from worker.model import decode
from worker.model.modes import DecodeModeError, make_mode, resolve_mode
from worker.serving.service import ScoringService

MEAN_TOLERANCE, MAX_TOLERANCE, SCORE_TOLERANCE = 0.02, 0.1, 0.02
# nvJPEG is another JPEG decoder than libjpeg (its IDCT and chroma upsampling round differently),
# so on CUDA a few edge pixels differ by more; measured on an H100: mean 0.003, max 0.156.
CUDA_DECODER_MAX_TOLERANCE = 0.25
CPU = torch.device("cpu")


def pixels(mode_name: str, loaded, data: bytes) -> torch.Tensor:
    """One image through a mode's two halves, as the service runs them."""
    mode = make_mode(mode_name, loaded.preprocessing, CPU, torch.float32)
    staged = mode.stage(decode.open_image(data, max_pixels=10**9), data, lambda n: nullcontext())
    collated = mode.collate([staged.payload])
    assert collated.errors == [None]
    return collated.pixels[0]


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture()
def service_for(loaded_model):
    made: list[ScoringService] = []

    def make(mode: str, **overrides: object) -> ScoringService:
        settings = load_settings(**{"decode": mode, "max_batch_size": 8, "max_wait_ms": 50, **overrides})
        service = ScoringService(loaded_model, settings, local_roots=None).start()
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = write_variants(tmp_path_factory.mktemp("mode-variants"))
    files["broken.jpg"] = files["upright.jpg"].with_name("broken.jpg")
    files["broken.jpg"].write_bytes(broken_huffman_jpeg(photo_like(4, (320, 240))))
    return files


@pytest.mark.parametrize("mode", ["exact", "tensor", "gpu"])
def test_each_mode_scores_every_variant_and_says_so(service_for, variants, mode: str) -> None:
    service = service_for(mode)
    good = ["upright.png", "rgba.png", "palette.gif", "grey16.png", "cmyk.jpg", "photo.webp",
            "upright.jpg", "exif-rotated.jpg"]
    results = service.score_uris([str(variants[name]) for name in good + ["truncated.jpg", "broken.jpg"]])
    assert [r["ok"] for r in results] == [True] * len(good) + [False, False]
    assert {r["error"]["code"] for r in results[-2:]} == {"corrupt_image"}
    assert all(r["model"].endswith(f"+fp32+decode:{mode}") for r in results)
    assert service.budget.in_use == 0


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {
        "JPEG 1024x768": encoded(photo_like(7, (1024, 768)), "JPEG", quality=90),
        "JPEG 4000x3000": encoded(photo_like(8, (4000, 3000)), "JPEG", quality=90),
        "PNG 1024x768": encoded(photo_like(9, (1024, 768)), "PNG", compress_level=1),
    }


@pytest.mark.parametrize("photo", ["JPEG 1024x768", "JPEG 4000x3000", "PNG 1024x768"])
@pytest.mark.parametrize("mode", ["tensor", "gpu"])
def test_deviation_from_exact_is_within_tolerance(loaded_model, photos, mode: str, photo: str) -> None:
    data = photos[photo]
    exact, other = pixels("exact", loaded_model, data), pixels(mode, loaded_model, data)
    difference = (other - exact).abs()
    assert float(difference.mean()) <= MEAN_TOLERANCE
    assert float(difference.max()) <= MAX_TOLERANCE
    scores = loaded_model.score(torch.stack([exact, other]))
    assert abs(scores[0] - scores[1]) <= SCORE_TOLERANCE


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exact(loaded_model, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(photo_like(3, (320, 200)), quality=95, exif=exif.tobytes())
    exact = pixels("exact", loaded_model, data)
    for mode in ("tensor", "gpu"):
        assert float((pixels(mode, loaded_model, data) - exact).abs().max()) <= MAX_TOLERANCE, mode


def test_gpu_mode_sends_only_plain_jpegs_to_the_device_decoder(loaded_model, variants) -> None:
    mode = make_mode("gpu", loaded_model.preprocessing, CPU, torch.float32)

    def staged_kind(name: str) -> str:
        data = variants[name].read_bytes()
        payload = mode.stage(decode.open_image(data, max_pixels=10**9), data, lambda n: nullcontext()).payload
        return type(payload).__name__

    assert staged_kind("upright.jpg") == "_Jpeg"
    for fallback in ("upright.png", "cmyk.jpg", "photo.webp", "grey16.png"):
        assert staged_kind(fallback) == "ndarray", fallback  # decoded on the task thread


def test_a_corrupt_jpeg_fails_alone_in_its_gpu_batch(loaded_model, variants) -> None:
    mode = make_mode("gpu", loaded_model.preprocessing, CPU, torch.float32)
    names = ["upright.jpg", "broken.jpg", "upright.png", "exif-rotated.jpg"]
    payloads = []
    for name in names:
        data = variants[name].read_bytes()
        payloads.append(mode.stage(decode.open_image(data, max_pixels=10**9), data, lambda n: nullcontext()).payload)
    collated = mode.collate(payloads)
    assert [error is None for error in collated.errors] == [True, False, True, True]
    error = collated.errors[1]
    assert isinstance(error, ScoringError) and error.code == ErrorCode.CORRUPT_IMAGE
    assert collated.pixels.shape == (3, *loaded_model.preprocessing.output_shape)


def test_a_corrupt_jpeg_in_a_gpu_mode_service_batch_costs_only_itself(service_for, variants) -> None:
    service = service_for("gpu", concurrency=8)
    names = ["upright.jpg", "broken.jpg", "truncated.jpg", "upright.jpg", "exif-rotated.jpg"] * 2
    results = service.score_uris([str(variants[name]) for name in names])
    assert [r["ok"] for r in results] == [not name.startswith(("broken", "trunc")) for name in names]
    assert {r["error"]["code"] for r in results if not r["ok"]} == {"corrupt_image"}
    assert not service.batcher.broken and service.batcher._failed_in_a_row == 0


def test_auto_is_exact_on_cpu() -> None:
    assert resolve_mode("auto", CPU) == "exact"


def test_gpu_mode_without_torchvision_is_a_one_line_start_error(
    monkeypatch: pytest.MonkeyPatch, loaded_model
) -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    with pytest.raises(DecodeModeError, match=r"REALSCORE_DECODE=gpu needs torchvision") as caught:
        ScoringService(loaded_model, load_settings(decode="gpu"), local_roots=None)
    assert "\n" not in str(caught.value)
    assert resolve_mode("auto", torch.device("cuda")) == "exact"  # auto falls back, never fails


def test_features_cross_to_the_host_only_for_embed(service_for, variants) -> None:
    service = service_for("exact")
    prepared = service.prepare(str(variants["upright.png"]))
    score, features = service.infer(prepared)
    assert features is None
    again, features = service.infer(prepared, with_features=True)
    assert again == pytest.approx(score, abs=1e-6)
    assert features is not None and features.shape == (service.loaded.model.hidden_size,)
    row = service.embed_uri(str(variants["upright.png"]))
    assert row["ok"] and row["dim"] == service.loaded.model.hidden_size


def test_out_of_memory_splits_the_batch_and_loses_no_image(
    service_for, loaded_model, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_launch = loaded_model.launch
    sizes: list[int] = []

    def launch_that_fits_two(pixels: torch.Tensor, **kwargs: object):
        sizes.append(pixels.shape[0])
        if pixels.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_launch(pixels, **kwargs)

    monkeypatch.setattr(loaded_model, "launch", launch_that_fits_two)
    service = service_for("exact", max_wait_ms=1000)
    images = [str(path) for path in sorted(image_dir.glob("*.png"))] * 2
    results = service.score_uris(images)
    assert all(r["ok"] for r in results)
    assert max(sizes) > 2 and service.batcher.max_batch_size <= 2

    def never_fits(pixels: torch.Tensor, **kwargs: object):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loaded_model, "launch", never_fits)
    result = service.score_uri(images[0])
    assert not result["ok"] and result["error"]["code"] == "out_of_memory"
    assert service.budget.in_use == 0


@pytest.mark.gpu
def test_cuda_gpu_mode_matches_exact_and_isolates_a_corrupt_jpeg(loaded_model, photos, variants) -> None:
    cuda = torch.device("cuda")
    mode = make_mode("gpu", loaded_model.preprocessing, cuda, torch.float32)
    names = ["upright.jpg", "broken.jpg", "upright.png", "cmyk.jpg", "exif-rotated.jpg"]
    blobs = [variants[name].read_bytes() for name in names] + list(photos.values())
    payloads = [
        mode.stage(decode.open_image(b, max_pixels=10**9), b, lambda n: nullcontext()).payload
        for b in blobs
    ]
    collated = mode.collate(payloads)
    assert [e is None for e in collated.errors] == [True, False] + [True] * (len(blobs) - 2)
    assert collated.pixels.device.type == "cuda"
    exact = torch.stack([pixels("exact", loaded_model, b) for i, b in enumerate(blobs) if i != 1])
    difference = (collated.pixels.cpu() - exact).abs()
    assert float(difference.mean()) <= MEAN_TOLERANCE
    assert float(difference.flatten().quantile(0.99)) <= MAX_TOLERANCE
    assert float(difference.max()) <= CUDA_DECODER_MAX_TOLERANCE


@pytest.mark.parametrize("mode", ["exact", "gpu"])
def test_a_pipelined_service_scores_as_an_unpipelined_one(loaded_model, variants, mode: str) -> None:
    """Depth 2 (what a CUDA worker runs): batch N+1 is staged before batch N is finished."""
    names = ["upright.jpg", "broken.jpg", "upright.png", "exif-rotated.jpg", "rgba.png"] * 3
    uris = [str(variants[name]) for name in names]
    scores = {}
    for depth in (1, 2):
        settings = load_settings(decode=mode, max_batch_size=2, max_wait_ms=1, concurrency=6)
        service = ScoringService(loaded_model, settings, local_roots=None)
        service.batcher.pipeline_depth = depth
        service.start()
        try:
            results = service.score_uris(uris)
        finally:
            service.stop()
        assert [r["ok"] for r in results] == [name != "broken.jpg" for name in names]
        scores[depth] = [r["score"] for r in results]
        assert service.budget.in_use == 0
    for pipelined, plain in zip(scores[2], scores[1]):
        assert (pipelined is None and plain is None) or pipelined == pytest.approx(plain, abs=1e-6)
