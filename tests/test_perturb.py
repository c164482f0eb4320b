"""Perturbation specs and the degraded copies they make."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.errors import ScoringError
from tests.lifecycle_images import textured
from worker.lifecycle.perturb import Perturbation, degrade, parse


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_parse_spec() -> None:
    assert parse("jpeg:75, resize:0.5,blur:1.0") == [
        Perturbation("jpeg", 75),
        Perturbation("resize", 0.5),
        Perturbation("blur", 1.0),
    ]
    assert [p.name for p in parse("jpeg:75,resize:0.5,blur:1.0")] == [
        "jpeg:75",
        "resize:0.5",
        "blur:1",
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "jpeg",
        "jpeg:abc",
        "jpeg:101",
        "jpeg:7.5",
        "resize:0",
        "blur:-1",
        "noise:3",
        "blur:1,blur:1",
    ],
)
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse(spec)


def test_degraded_copies() -> None:
    original = textured(0, (80, 60))
    data = _png(original)
    jpeg = degrade(data, Perturbation("jpeg", 30), max_pixels=10**6)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.size == (80, 60)
        assert np.abs(np.asarray(image, float) - np.asarray(original, float)).mean() > 1
    with Image.open(
        io.BytesIO(degrade(data, Perturbation("resize", 0.5), max_pixels=10**6))
    ) as image:
        assert image.format == "PNG" and image.size == (40, 30)
    with Image.open(
        io.BytesIO(degrade(data, Perturbation("blur", 2.0), max_pixels=10**6))
    ) as image:
        assert np.asarray(image, float).std() < np.asarray(original, float).std()
    with pytest.raises(ScoringError) as caught:
        degrade(b"not an image", Perturbation("blur", 1.0), max_pixels=10**6)
    assert caught.value.code.value == "not_an_image"
