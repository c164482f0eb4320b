"""The JPEG header reader of gpu mode (worker/model/jpeghead.py) against Pillow's ``open_image``.

Whenever the reader answers, its (format, mode, size, orientation), or the error code of its size
check, must be what the Pillow path gives for the same bytes; where it declines (None), Pillow
decides. Checked over varied files (EXIF orientations 1-8 in both byte orders, greyscale, CMYK,
progressive, ICC, XMP, MPO, Adobe, 12-bit, arithmetic, truncated, garbage, huge) and over
random mutations of their headers. A reader that declined everything would pass the comparison,
so the plain files must also be read without Pillow.
"""

from __future__ import annotations

import io
import struct
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, TiffImagePlugin

from shared.errors import ErrorCode, ScoringError
from tests.tiny_clip import noise_image
from worker.model import decode, jpeghead
from worker.model.jpeghead import read_header

MAX_PIXELS = 50_000_000
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


def pillow_view(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple:
    """What gpu mode learnt of a file before: through Pillow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the broken EXIF blocks made here
        try:
            image = decode.open_image(data, max_pixels=max_pixels)
        except ScoringError as error:
            return ("error", error.code)
        return (image.format, image.mode, image.size, decode.orientation(image))


def fast_view(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple | None:
    """What it learns now, None where the reader hands the file to Pillow."""
    header = read_header(data)
    if header is None:
        return None
    try:
        decode.check_header_size(header.width, header.height, max_pixels=max_pixels)
    except ScoringError as error:
        return ("error", error.code)
    return ("JPEG", header.mode, (header.width, header.height), header.orientation)


def jpeg(image: Image.Image | None = None, **options: object) -> bytes:
    buffer = io.BytesIO()
    (image or noise_image(3, (48, 32))).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def after_soi(data: bytes, *segments: bytes) -> bytes:
    return data[:2] + b"".join(segments) + data[2:]


def before_sos(data: bytes, *segments: bytes) -> bytes:
    at = next(start for marker, start, _ in segments_of(data) if marker == 0xDA)
    return data[:at] + b"".join(segments) + data[at:]


def segments_of(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of its FF, offset past its end) of each segment up to SOS."""
    found, pos = [], 2
    while pos + 4 <= len(data):
        marker, length = data[pos + 1], struct.unpack_from(">H", data, pos + 2)[0]
        found.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return found


def patch_frame(data: bytes, **fields: int) -> bytes:
    """Rewrite the frame header: ``marker``, ``precision``, ``height``, ``width``."""
    out = bytearray(data)
    marker, at, _ = next(s for s in segments_of(data) if s[0] in (0xC0, 0xC1, 0xC2))
    out[at + 1] = fields.get("marker", marker)
    out[at + 4] = fields.get("precision", out[at + 4])
    if "height" in fields:
        struct.pack_into(">H", out, at + 5, fields["height"])
    if "width" in fields:
        struct.pack_into(">H", out, at + 7, fields["width"])
    return bytes(out)


def exif(order: str = "II", entries: list[tuple[int, int, int, bytes]] = (), tail: bytes = b"",
         ifd_offset: int = 8) -> bytes:
    """An APP1 Exif segment: IFD0 at ``ifd_offset`` with ``entries`` (tag, type, count, 4-byte
    value or offset), then ``tail`` (out-of-line values start at 8 + 2 + 12 * n + 4)."""
    e = "<" if order == "II" else ">"
    head = (b"II*\x00" if order == "II" else b"MM\x00*") + struct.pack(e + "I", ifd_offset)
    body = struct.pack(e + "H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(e + "HHI", tag, kind, count) + value
    return segment(0xE1, b"Exif\x00\x00" + head + body + b"\x00\x00\x00\x00" + tail)


def orientation_entry(value: int, order: str = "II", kind: int = 3, count: int = 1) -> tuple:
    e = "<" if order == "II" else ">"
    packed = struct.pack(e + "HH", value, 0) if kind == 3 else struct.pack(e + "I", value)
    return (0x0112, kind, count, packed)


def _mpo() -> bytes:
    buffer = io.BytesIO()
    noise_image(1, (40, 30)).save(buffer, "MPO", save_all=True, append_images=[noise_image(2, (40, 30))])
    return buffer.getvalue()


def _pillow_exif(orientation: int) -> Image.Exif:
    made = Image.Exif()
    made[0x0112] = orientation
    made[0x010F] = "Camera maker"
    return made


def _icc() -> bytes:
    chunk = b"ICC_PROFILE\x00\x01\x01" + b"\x00" * 128
    return segment(0xE2, chunk)


BASE = jpeg()
# Files the reader must read itself (no Pillow), each compared with Pillow below.
PLAIN: dict[str, bytes] = {
    "baseline": BASE,
    "444": jpeg(subsampling=0, quality=95),
    "grey": jpeg(noise_image(4, (33, 17)).convert("L")),
    "progressive": jpeg(progressive=True),
    "optimized": jpeg(optimize=True),
    "odd-size": jpeg(noise_image(5, (1, 700))),
    "comment": jpeg(comment=b"hello"),
    "icc": after_soi(BASE, _icc()),
    "exif-no-orientation": after_soi(BASE, exif("II", [(0x010F, 2, 4, b"Cam\x00")])),
    "exif-orientation-out-of-range": after_soi(BASE, exif("II", [orientation_entry(9)])),
    "exif-orientation-0": after_soi(BASE, exif("MM", [orientation_entry(0, "MM")])),
    "exif-and-xmp": after_soi(
        BASE, exif("II", [orientation_entry(6)]), segment(0xE1, _XMP + b'tiff:Orientation="3"')
    ),
    "exif-with-values-out-of-line": after_soi(
        BASE,
        exif("MM", [(0x011A, 5, 1, struct.pack(">I", 8 + 2 + 24 + 4)), orientation_entry(8, "MM")],
             tail=struct.pack(">II", 72, 1)),
    ),
    "exif-unknown-type-entry": after_soi(BASE, exif("II", [(0x9999, 99, 1000, b"\xff" * 4), orientation_entry(5)])),
    **{f"orientation-{v}-{o}": after_soi(BASE, exif(o, [orientation_entry(v, o)]))
       for v in range(1, 9) for o in ("II", "MM")},
    "pillow-exif": jpeg(exif=_pillow_exif(6)),
    "truncated-scan": BASE[: len(BASE) // 2 + 20],  # header whole: Pillow opens it too
    "huge": patch_frame(BASE, width=60000, height=60000),
    "over-the-limit": patch_frame(BASE, width=8000, height=8000),
}
# Files the reader must hand to Pillow.
DECLINED: dict[str, bytes] = {
    "empty": b"",
    "cmyk": jpeg(noise_image(6, (20, 20)).convert("CMYK")),
    "12-bit": patch_frame(BASE, precision=12),
    "arithmetic": patch_frame(BASE, marker=0xC9),
    "lossless": patch_frame(BASE, marker=0xC3),
    # Pillow takes the last frame header, whatever its coding: 10x10 here.
    "then-an-arithmetic-frame": before_sos(BASE, segment(0xC9, b"\x08\x00\x0a\x00\x0a\x01\x01\x11\x00")),
    "restart-marker-in-header": after_soi(BASE, b"\xff\xd0"),
    "adobe": after_soi(BASE, segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")),
    "photoshop": after_soi(BASE, segment(0xED, b"Photoshop 3.0\x00")),
    "mpo": _mpo(),
    "xmp-only": after_soi(BASE, segment(0xE1, _XMP + b'<x tiff:Orientation="6"/>')),
    "two-exif": after_soi(BASE, exif("II", [orientation_entry(6)]), exif("II", [orientation_entry(3)])),
    "orientation-as-long": after_soi(BASE, exif("II", [orientation_entry(6, kind=4)])),
    "orientation-twice": after_soi(BASE, exif("II", [orientation_entry(6), orientation_entry(3)])),
    "ifd-past-the-end": after_soi(BASE, exif("II", [orientation_entry(6)], ifd_offset=5000)),
    "value-past-the-end": after_soi(
        BASE, exif("II", [(0x010F, 2, 400, struct.pack("<I", 9000)), orientation_entry(6)])
    ),
    "bad-tiff-header": after_soi(BASE, segment(0xE1, b"Exif\x00\x00XX*\x00\x08\x00\x00\x00")),
    "short-jfif": after_soi(BASE[:2] + BASE[20:], segment(0xE0, b"JFIF\x00")),
    "short-icc": after_soi(BASE, segment(0xE2, b"ICC_PROFILE\x00")),
    "short-dqt": after_soi(BASE, segment(0xDB, b"\x00" + b"\x01" * 10)),
    "zero-height": patch_frame(BASE, height=0),
    "header-only": BASE[:40],
    "garbage-after-soi": b"\xff\xd8\xff" + bytes(range(7, 200)),
    "fill-bytes": BASE[:2] + b"\xff" + BASE[2:],
    "png": (lambda b: (noise_image(1, (8, 8)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_jpegs_are_read_without_pillow_and_as_pillow_reads_them(name: str) -> None:
    data = PLAIN[name]
    assert fast_view(data) is not None, f"{name}: should not need Pillow"
    assert fast_view(data) == pillow_view(data)


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_unusual_files_are_left_to_pillow(name: str) -> None:
    assert read_header(DECLINED[name]) is None


def test_the_cases_mean_what_they_say() -> None:
    assert pillow_view(PLAIN["grey"])[1] == "L"
    assert pillow_view(PLAIN["orientation-6-MM"])[3] == 6
    assert pillow_view(PLAIN["exif-and-xmp"])[3] == 6  # EXIF wins over XMP
    assert pillow_view(DECLINED["xmp-only"])[3] == 6  # XMP alone counts: the reader must decline
    assert pillow_view(PLAIN["huge"]) == ("error", ErrorCode.TOO_MANY_PIXELS)
    assert pillow_view(PLAIN["over-the-limit"]) == ("error", ErrorCode.TOO_MANY_PIXELS)
    assert pillow_view(DECLINED["cmyk"])[1] == "CMYK"
    assert pillow_view(DECLINED["mpo"])[0] == "MPO"
    assert pillow_view(DECLINED["12-bit"])[0] == "error"
    assert pillow_view(DECLINED["then-an-arithmetic-frame"])[1:3] == ("L", (10, 10))


def test_small_pixel_limits_give_the_same_code() -> None:
    for data in (BASE, PLAIN["grey"], PLAIN["progressive"]):
        assert fast_view(data, 100) == pillow_view(data, 100) == ("error", ErrorCode.TOO_MANY_PIXELS)


def test_tiff_types_are_pillows() -> None:
    dispatch = TiffImagePlugin.ImageFileDirectory_v2._load_dispatch
    assert jpeghead.TIFF_UNITS == {kind: size for kind, (size, _) in dispatch.items()}


@pytest.mark.parametrize("kind", sorted(jpeghead.TIFF_UNITS))
@pytest.mark.parametrize("count", [0, 1, 2, 3])
@pytest.mark.parametrize("fill", [0, 5])
def test_exif_resolution_of_any_type_is_read_as_pillow_reads_it(kind: int, count: int, fill: int) -> None:
    """Pillow's open reads a dpi from XResolution as ``value[0] / value[1]`` when the JFIF
    header gives none: for a 1-item BYTE, ASCII or UNDEFINED value that raises IndexError, and
    Pillow refuses the whole file, which the reader had read as a plain JPEG."""
    size = jpeghead.TIFF_UNITS[kind] * count
    tail_at = 8 + 2 + 3 * 12 + 4
    value = bytes((fill, 0, 0, 0)) if size <= 4 else struct.pack("<I", tail_at)
    unit = (0x0128, 3, 1, struct.pack("<HH", 2, 0))
    data = after_soi(
        BASE, exif("II", [(0x011A, kind, count, value), unit, orientation_entry(6)], tail=bytes((fill,)) * 64)
    )
    fast = fast_view(data)
    if fast is not None:
        assert fast == pillow_view(data)


def test_a_resolution_pillow_cannot_divide_is_left_to_it() -> None:
    unit = (0x0128, 3, 1, struct.pack("<HH", 2, 0))
    data = after_soi(BASE, exif("II", [(0x011A, 7, 1, b"\x05\x00\x00\x00"), unit]))
    assert pillow_view(data) == ("error", ErrorCode.NOT_AN_IMAGE)
    assert read_header(data) is None


SEEDS = {**PLAIN, **{k: v for k, v in DECLINED.items() if v.startswith(b"\xff\xd8")}}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    header_end = max((end for _, _, end in segments_of(bytes(data))), default=len(data))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "flip", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, min(len(data), header_end + 8) - 1))
        if kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x08, 0x0C, 0xC0, 0xC2, 0xC9, 0xD8, 0xDA, 0xE1, 0xFF]))
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        else:
            del data[at : at + draw(st.integers(1, 6))]
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_headers_are_read_as_pillow_reads_them_or_left_to_it(data: bytes) -> None:
    fast = fast_view(data)
    if fast is not None:
        assert fast == pillow_view(data)


def test_gpu_mode_stages_a_plain_jpeg_as_the_pillow_path_did(loaded_model) -> None:
    from worker.model.modes import make_mode

    mode = make_mode("gpu", loaded_model.preprocessing, torch.device("cpu"), torch.float32)
    held: list[int] = []

    def hold(nbytes: int):
        held.append(nbytes)
        return nullcontext()

    for name in ("orientation-6-II", "grey", "progressive", "icc", "cmyk", "xmp-only", "adobe"):
        data = {**PLAIN, **DECLINED}[name]
        fast = mode.stage_bytes(data, MAX_PIXELS, hold)
        slow = mode.stage(decode.open_image(data, max_pixels=MAX_PIXELS), data, hold)
        assert type(fast.payload) is type(slow.payload), name
        assert fast.nbytes == slow.nbytes, name
        if hasattr(fast.payload, "orientation"):
            assert fast.payload.orientation == slow.payload.orientation, name
            assert torch.equal(fast.payload.encoded, slow.payload.encoded), name
        else:
            assert np.array_equal(fast.payload, slow.payload), name
    with pytest.raises(ScoringError) as caught:
        mode.stage_bytes(PLAIN["huge"], MAX_PIXELS, hold)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS


_OVERLONG = {
    "tiny COM segments": lambda head, rest: head + segment(0xFE, b"") * (jpeghead.MAX_SEGMENTS + 1) + rest,
    "fill bytes": lambda head, rest: head + b"\xff" * (jpeghead.MAX_SKIPPED_BYTES + 2) + rest,
    "junk bytes": lambda head, rest: head + b"\x00" * (jpeghead.MAX_SKIPPED_BYTES + 2) + rest,
    "restart markers": lambda head, rest: head + b"\xff\xd0" * (jpeghead.MAX_SKIPPED_BYTES // 2 + 2) + rest,
}


@pytest.mark.parametrize("name", sorted(_OVERLONG))
def test_an_overlong_jpeg_header_is_refused_before_pillow_parses_it(name: str, loaded_model) -> None:
    from shared.settings import load_settings
    from worker.model.modes import make_mode

    data = jpeg()
    head, rest = data[:2], data[2:]
    crafted = _OVERLONG[name](head, rest)
    assert jpeghead.overlong_header(crafted) is not None
    assert jpeghead.read_header(crafted) is None
    for mode in ("exact", "gpu"):
        staging = make_mode(mode, loaded_model.preprocessing, loaded_model.device, loaded_model.dtype)
        with pytest.raises(ScoringError) as refused:
            staging.stage_bytes(crafted, load_settings().max_image_pixels, lambda n: nullcontext())
        assert refused.value.code.value == "corrupt_image", (mode, refused.value)


def test_headers_within_the_limits_are_not_overlong() -> None:
    data = jpeg()
    head, rest = data[:2], data[2:]
    assert jpeghead.overlong_header(data) is None
    near = head + segment(0xFE, b"x") * (jpeghead.MAX_SEGMENTS - 64) + b"\xff" * 1000 + rest
    assert jpeghead.overlong_header(near) is None
    assert pillow_view(near)[0] == "JPEG"
    big_segments = head + segment(0xE1, b"y" * 65000) * 8 + rest  # large segments are not junk
    assert jpeghead.overlong_header(big_segments) is None
