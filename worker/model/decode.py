"""Image bytes -> an 8-bit RGB Pillow image, with our own limits and stable error codes.

The pixel limit is checked on the header, before any pixel is decoded (Pillow's own
``MAX_IMAGE_PIXELS`` only raises above twice its value and is process-global). Only the first
frame of an animated or multi-page file is decoded, so frame count never multiplies memory.
Formats are limited to the ones photos come in: Pillow's EPS plugin, for one, runs Ghostscript.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from shared.errors import ErrorCode, ScoringError
from worker.model import jpeghead

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")  # JPEG covers MPO
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Parse the header only; refuse non-images and images over ``max_pixels``."""
    if not data:
        raise ScoringError(ErrorCode.NOT_AN_IMAGE, "empty file")
    if data.startswith(b"\xff\xd8"):
        overlong = jpeghead.overlong_header(data)
        if overlong:
            raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"unreadable image header: {overlong}")
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
    check_size(*image.size, max_pixels=max_pixels)
    return image


def check_size(width: int, height: int, *, max_pixels: int) -> None:
    """:func:`open_image`'s checks of a header's size: the pixel limit, and some pixels."""
    if width * height > max_pixels:
        raise ScoringError(
            ErrorCode.TOO_MANY_PIXELS,
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(REALSCORE_MAX_IMAGE_PIXELS)",
        )
    if width == 0 or height == 0:
        raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"image has no pixels ({width}x{height})")


def check_header_size(width: int, height: int, *, max_pixels: int) -> None:
    """:func:`open_image`'s size checks for a header read without Pillow: Pillow's own
    decompression-bomb limit first (what ``Image.open`` would have raised), then ours."""
    try:
        Image._decompression_bomb_check((width, height))  # the very check Image.open runs
    except Image.DecompressionBombError as error:
        raise ScoringError(ErrorCode.TOO_MANY_PIXELS, str(error)) from None
    check_size(width, height, max_pixels=max_pixels)


# Bytes per pixel of a decoded Pillow frame, by mode (Pillow stores 3-band images in 4 bytes).
_FRAME_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Allowance for what is not a whole frame: decoder state, a resize's intermediate rows.
_SLACK = 8 << 20


def frame_bytes(mode: str, width: int, height: int) -> int:
    """Bytes Pillow allocates for one ``width`` x ``height`` frame in ``mode``."""
    return _FRAME_BYTES.get(mode, 4) * width * height


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) from the header; 1 when absent or unreadable."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not cost the picture
        return 1
    return value if 1 <= value <= 8 else 1


def decoded_bytes_estimate(image: Image.Image, *, rgb_array: bool = False) -> int:
    """Upper bound on the memory :func:`to_rgb` of ``image`` takes at its peak.

    Counts every frame alive at once along the real conversion steps for the header's mode (and
    the size after any ``draft``): the decoded frame, a transposed copy when the EXIF orientation
    rotates, the integer scaling of 16-bit modes, the alpha compositing and the RGB frame.
    ``rgb_array``: the caller also copies the RGB frame out as a uint8 array (``np.asarray``).
    """
    width, height = image.size
    pixels = width * height
    mode = image.mode
    source = frame_bytes(mode, width, height)
    peak = source
    if orientation(image) != 1:
        peak += source  # the transposed frame exists beside the original for a moment
    if mode in _HIGH_BIT_MODES or mode == "F":
        peak += source + 4 * pixels + pixels  # numpy copy, 32-bit work array, 8-bit result
        mode = "L"
    rgb = 4 * pixels
    if mode == "RGBA":
        peak += 2 * rgb  # white background and composite; the RGB frame replaces the background
    elif "A" in ImageMode.getmode(mode).bands or "transparency" in image.info:
        peak += 3 * rgb  # and an RGBA copy of the source first
    elif mode != "RGB":
        peak += rgb
    if rgb_array:
        peak += 6 * pixels  # numpy reads the frame through tobytes(): encoded chunks, then joined
    return peak + _SLACK


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame to 8-bit RGB: EXIF orientation applied, alpha over white,
    palette, CMYK and greyscale converted, 16-bit scaled to 8 (not clipped)."""
    try:
        image.load()
        try:
            # In place: no copy of the frame when there is nothing to rotate.
            ImageOps.exif_transpose(image, in_place=True)
        except MemoryError:
            raise
        except Exception:  # a broken EXIF block must not cost the picture
            pass
        return _convert(image)
    except ScoringError:
        raise
    except MemoryError:
        raise ScoringError(
            ErrorCode.OUT_OF_MEMORY,
            f"out of memory decoding a {image.size[0]}x{image.size[1]} {image.mode} image",
        ) from None
    except Image.DecompressionBombError as error:
        raise ScoringError(ErrorCode.TOO_MANY_PIXELS, str(error)) from None
    except Exception as error:  # truncated data, bad chunks, broken codecs
        raise ScoringError(ErrorCode.CORRUPT_IMAGE, f"cannot decode image: {error}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale -> "L", as the seed's float path rounded it,
    in integer (or float32) arithmetic: no float64 frames."""
    if image.mode == "F":
        values = np.array(image, dtype=np.float32)
        if values.max(initial=0) <= 1.0:
            values *= np.float32(255.0)
        np.rint(values, out=values)
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8), "L")
    values = np.array(image, dtype=np.int32)
    if image.mode != "I" or values.max(initial=0) > 255:
        # rint(v / 257) == (v + 128) // 257 for integers v (v / 257 is never exactly x.5).
        np.clip(values, 0, 65535, out=values)
        values += 128
        values //= 257
    else:
        np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _convert(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        composite = Image.alpha_composite(background, rgba)
        del rgba, background
        return composite.convert("RGB")
    if image.mode == "RGB":
        return image  # already what we need: no copy
    return image.convert("RGB")


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """:func:`open_image` then :func:`to_rgb`."""
    return to_rgb(open_image(data, max_pixels=max_pixels))
