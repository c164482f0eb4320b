"""Image bytes -> an 8-bit RGB Pillow image, with our own limits and stable error codes.

The pixel limit is checked on the header, before any pixel is decoded (Pillow's own
``MAX_IMAGE_PIXELS`` only raises above twice its value and is process-global). Only the first
frame of an animated or multi-page file is decoded, so frame count never multiplies memory.
Formats are limited to the ones photos come in: Pillow's EPS plugin, for one, runs Ghostscript.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ErrorCode, ScoringError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")  # JPEG covers MPO
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the header only; refuse non-images and images over ``max_pixels``."""
    if not data:
        raise ScoringError(ErrorCode.NOT_AN_IMAGE, "empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ScoringError(
            ErrorCode.NOT_AN_IMAGE, f"not an image in a supported format {ALLOWED_FORMATS}"
        ) from None
    except Image.DecompressionBombError as error:
        raise ScoringError(ErrorCode.TOO_MANY_PIXELS, str(error)) from None
    except Exception as error:  # a header Pillow recognises but cannot parse
        raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"unreadable image header: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ScoringError(
            ErrorCode.TOO_MANY_PIXELS,
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(REALSCORE_MAX_IMAGE_PIXELS)",
        )
    if width == 0 or height == 0:
        raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"image has no pixels ({width}x{height})")
    return image


def decoded_bytes_estimate(image: Image.Image) -> int:
    """Upper bound on memory the decode of ``image`` takes (source frame plus RGB copies)."""
    width, height = image.size
    return width * height * 4 * 3


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame to 8-bit RGB: EXIF orientation applied, alpha over white,
    palette, CMYK and greyscale converted, 16-bit scaled to 8 (not clipped)."""
    try:
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block must not cost the picture
            pass
        return _convert(image)
    except ScoringError:
        raise
    except Image.DecompressionBombError as error:
        raise ScoringError(ErrorCode.TOO_MANY_PIXELS, str(error)) from None
    except Exception as error:  # truncated data, bad chunks, broken codecs
        raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"cannot decode image: {error}") from None


def _convert(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """:func:`open_image` then :func:`to_rgb`."""
    return to_rgb(open_image(data, max_pixels=max_pixels))
