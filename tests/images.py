"""Image files of every awkward kind, built in the test: formats, modes, orientations, bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.tiny_clip import noise_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def write_variants(folder: Path) -> dict[str, Path]:
    """Every supported variant of one base picture, plus each kind of bad file."""
    base = noise_image(11, (320, 240))
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = folder / name
        files[name].write_bytes(data)

    def save(name: str, image: Image.Image, fmt: str, **options: object) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        put(name, buffer.getvalue())

    save("upright.png", base, "PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    save("rgba.png", rgba, "PNG")
    save("palette.gif", base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    grey = np.asarray(base.convert("L"))
    save("grey8.png", Image.fromarray(grey, "L"), "PNG")
    save("grey16.png", Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    save("cmyk.jpg", base.convert("CMYK"), "JPEG", quality=95)
    save("photo.webp", base, "WEBP", lossless=True)
    save("upright.jpg", base, "JPEG", quality=100, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = base.transpose(Image.Transpose.ROTATE_90)
    save("exif-rotated.jpg", stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    put("empty.png", b"")
    put("notes.txt", b"these are not the pixels you are looking for\n" * 20)
    whole = jpeg_bytes(base, quality=90)
    put("truncated.jpg", whole[: len(whole) // 2])
    put("bomb.png", png_bomb())
    return files


def photo_like(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB picture: smooth gradients and blobs plus mild sensor noise (pure noise
    would make every resampling filter look equally bad and compress like nothing real)."""
    width, height = size
    rng = np.random.default_rng(seed)
    # Build at low resolution and upscale: smooth structure at any output size, cheaply.
    low_w, low_h = max(2, width // 16), max(2, height // 16)
    y, x = np.mgrid[0:low_h, 0:low_w].astype(np.float32)
    channels = []
    for _ in range(3):
        field = rng.uniform(40, 200) + rng.uniform(-60, 60) * x / low_w + rng.uniform(-60, 60) * y / low_h
        for _ in range(6):
            cx, cy, r = rng.uniform(0, low_w), rng.uniform(0, low_h), rng.uniform(2, max(low_w, low_h) / 3)
            field += rng.uniform(-70, 70) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(field)
    low = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")
    smooth = np.asarray(low.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, 6, smooth.shape).astype(np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8), "RGB")


def broken_huffman_jpeg(image: Image.Image) -> bytes:
    """A JPEG whose header and end marker are intact but whose Huffman table is garbage: it
    passes every header check and fails only when decoded (by Pillow and torchvision alike)."""
    data = bytearray(jpeg_bytes(image, quality=90))
    table = data.find(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    return bytes(data)
