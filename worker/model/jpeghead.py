"""A plain JPEG's header read in a few microseconds, without building a Pillow image.

``gpu`` mode hands a plain JPEG to the device decoder whole: of its header it needs only the
format, mode, size and EXIF orientation. Pillow's ``Image.open`` costs about 0.4 ms of the task
thread's GIL time per image for that, in a process where the GIL is the measured limit.

:func:`read_header` walks the marker segments from SOI to SOS and returns a :class:`JpegHeader`
only for a file it knows Pillow reads to the same (format ``JPEG``, mode, size, orientation):
8-bit Huffman JPEGs (baseline, extended or progressive) of 1 or 3 components, whose segments
all lie within the data and whose Exif block (if any) is well formed. Anything else (CMYK, 12-bit,
arithmetic coding, an Adobe APP14 or Photoshop segment, an MPO, XMP without an Exif orientation,
fill bytes, a truncated or oddly sized segment) returns None and the caller asks Pillow, so every
result and error code stays Pillow's. tests/test_jpeghead.py compares the two over varied and
mutated files.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# SOF0-2: Huffman baseline, extended sequential, progressive. Arithmetic (SOF9+), lossless and
# hierarchical frames go to Pillow.
_PLAIN_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
_DHT, _SOS, _DQT, _DRI, _COM = 0xC4, 0xDA, 0xDB, 0xDD, 0xFE
_ORIENTATION = 0x0112
# Pillow's JPEG open reads a dpi from Exif's XResolution as ``value[0] / value[1]``: a BYTE,
# ASCII or UNDEFINED value (bytes or str) of under two items raises IndexError there, which
# Image.open does not catch, so Pillow refuses the whole file.
_X_RESOLUTION = 0x011A
_BYTE_STRINGS = frozenset((1, 2, 7))
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
# Bytes per value of each TIFF field type Pillow reads (ImageFileDirectory_v2._load_dispatch);
# Pillow skips an entry of any other type.
TIFF_UNITS = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_U16 = {b"II": struct.Struct("<H"), b"MM": struct.Struct(">H")}
_U32 = {b"II": struct.Struct("<I"), b"MM": struct.Struct(">I")}
_TIFF_MAGIC = {b"II": b"II*\x00", b"MM": b"MM\x00*"}
# Limits of a header walk, far above any camera's or editor's JPEG (a few dozen segments, a few
# fill bytes) and far below what makes Pillow's byte-by-byte header parse slow: a crafted 50 MB
# file of tiny segments or fill bytes held a task thread (and the GIL) for 10-20 s.
MAX_SEGMENTS = 4096
MAX_SKIPPED_BYTES = 1 << 16
_TO_MARKER = re.compile(rb"([^\xff]*)(\xff+)(.)", re.DOTALL)  # junk, fill bytes, the marker
_STANDALONE = frozenset((0x00, 0x01, *range(0xD0, 0xD8)))  # stuffed 0, TEM, RSTn: no length


@dataclass(frozen=True, slots=True)
class JpegHeader:
    width: int
    height: int
    mode: str  # "L" or "RGB", as Pillow names a 1- or 3-component JPEG
    orientation: int  # 1..8, as decode.orientation reads it from Pillow's getexif()


def read_header(data: bytes) -> JpegHeader | None:
    """The header of a plain JPEG, or None: Pillow must decide (see the module docstring)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = len(data)
    pos = 2
    frame: tuple[int, int, str] | None = None
    exif: tuple[int, int] | None = None
    xmp = False
    for _ in range(MAX_SEGMENTS):
        if pos + 4 > end or data[pos] != 0xFF:
            return None  # truncated, or junk / fill bytes Pillow would skip its own way
        marker = data[pos + 1]
        start, stop = pos + 4, pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if stop < start or stop > end:
            return None  # a length below 2, or past the end (Pillow: a truncated read)
        if marker == _SOS:
            break
        if 0xE0 <= marker <= 0xEF:
            segment = data[start : min(stop, start + 32)]  # the signature is all we look at
            if marker == 0xE0:
                if segment.startswith(b"JFIF") and stop - start < 7:
                    return None  # Pillow reads the JFIF version at offset 5 and fails
            elif marker == 0xE1:
                if segment.startswith(b"Exif\x00\x00"):
                    if exif is not None:
                        return None  # Pillow joins several Exif segments into one block
                    exif = (start + 6, stop)
                elif segment.startswith(_XMP):
                    xmp = True  # Pillow falls back to XMP's tiff:Orientation
            elif marker == 0xE2:
                if segment.startswith(b"MPF\x00"):
                    return None  # an MPO, or Pillow may make it one
                if segment.startswith(b"ICC_PROFILE\x00") and stop - start < 14:
                    return None  # Pillow indexes the chunk number at offset 13
            elif marker == 0xED:
                if segment.startswith(b"Photoshop 3.0\x00"):
                    return None  # Pillow parses its resources, and may fail on them
            elif marker == 0xEE:
                if segment.startswith(b"Adobe"):
                    return None  # a colour transform flag: Pillow's (and libjpeg's) call
        elif marker in _PLAIN_FRAMES:
            if frame is not None:
                return None  # Pillow takes the last frame header: not a plain JPEG
            frame = _frame(data, start, stop)
            if frame is None:
                return None
        elif marker == _DQT:
            if not _quantization_ok(data, start, stop):
                return None
        elif marker not in (_DHT, _DRI, _COM):
            return None  # anything else: other frame types, DNL, DAC, RSTn, JPGn, ...
        pos = stop
    else:
        return None  # over MAX_SEGMENTS: overlong_header refuses it
    if frame is None:
        return None
    found = None if exif is None else _exif_orientation(data[exif[0] : exif[1]])
    if found is False or (found is None and xmp):
        return None
    width, height, mode = frame
    return JpegHeader(width, height, mode, 1 if found is None else found)


def overlong_header(data: bytes) -> str | None:
    """Why a JPEG's marker walk up to its scan is too long to parse (more than
    :data:`MAX_SEGMENTS` segments or :data:`MAX_SKIPPED_BYTES` junk and fill bytes), or None.
    Walks as Pillow does, but skips junk and fill with C-speed matching, so it is bounded too."""
    pos, end, segments, skipped = 2, len(data), 0, 0
    while pos < end:
        found = _TO_MARKER.match(data, pos)
        if found is None:
            return None  # no marker left: truncated, Pillow's call
        skipped += len(found[1]) + len(found[2]) - 1
        if skipped > MAX_SKIPPED_BYTES:
            return f"over {MAX_SKIPPED_BYTES} junk or fill bytes between JPEG header segments"
        marker, pos = found[3][0], found.end()
        if marker in _STANDALONE:  # meaningless before the scan: counted as skipped bytes
            skipped += 2
            if skipped > MAX_SKIPPED_BYTES:
                return f"over {MAX_SKIPPED_BYTES} junk or fill bytes between JPEG header segments"
            continue
        if marker in (_SOS, 0xD9) or pos + 2 > end:
            return None
        segments += 1
        if segments > MAX_SEGMENTS:
            return f"over {MAX_SEGMENTS} JPEG header segments before the image data"
        pos += (data[pos] << 8) | data[pos + 1]
    return None


def _frame(data: bytes, start: int, stop: int) -> tuple[int, int, str] | None:
    """(width, height, mode) of an 8-bit, 1- or 3-component frame header with one 3-byte entry
    per component; None for anything else."""
    if stop - start < 6:
        return None
    precision, components = data[start], data[start + 5]
    height = (data[start + 1] << 8) | data[start + 2]
    width = (data[start + 3] << 8) | data[start + 4]
    if precision != 8 or components not in (1, 3) or stop - start != 6 + 3 * components:
        return None
    if width == 0 or height == 0:
        return None  # a DNL-defined height, or no pixels: Pillow's call
    return width, height, "L" if components == 1 else "RGB"


def _quantization_ok(data: bytes, start: int, stop: int) -> bool:
    """Whether every table of a DQT segment is whole (Pillow refuses the file otherwise)."""
    while start < stop:
        start += 1 + (64 if data[start] < 16 else 128)
        if start > stop:
            return False
    return True


def _exif_orientation(tiff: bytes) -> int | None | bool:
    """IFD0's orientation (1 when outside 1..8, as decode.orientation maps it), None when IFD0
    has no orientation, False when Pillow might read the block differently (any malformation)."""
    order = tiff[:2]
    if order not in _TIFF_MAGIC or not tiff.startswith(_TIFF_MAGIC[order]) or len(tiff) < 8:
        return False
    u16, u32 = _U16[order], _U32[order]
    end = len(tiff)
    offset = u32.unpack_from(tiff, 4)[0]
    if offset + 2 > end:
        return False
    count = u16.unpack_from(tiff, offset)[0]
    entries = offset + 2
    if entries + 12 * count > end:
        return False  # Pillow keeps the entries before a truncation: no need to match that
    orientation: int | None = None
    out_of_line = 0
    for entry in range(entries, entries + 12 * count, 12):
        tag, kind = u16.unpack_from(tiff, entry)[0], u16.unpack_from(tiff, entry + 2)[0]
        values = u32.unpack_from(tiff, entry + 4)[0]
        if tag == _ORIENTATION:
            if orientation is not None or kind != 3 or values != 1:
                return False  # a repeat, or not one SHORT: Pillow's own reading
            value = u16.unpack_from(tiff, entry + 8)[0]
            orientation = value if 1 <= value <= 8 else 1
            continue
        if tag == _X_RESOLUTION and kind in _BYTE_STRINGS:
            return False  # Pillow may refuse the file (see _X_RESOLUTION): its call
        unit = TIFF_UNITS.get(kind)
        if unit is None or unit * values <= 4:
            continue  # skipped by Pillow, or held in the entry itself
        # Pillow stops reading IFD0 at a value past the end, and skips values once their sum
        # passes the block's size: either could hide an orientation later in the directory.
        out_of_line += unit * values
        if out_of_line > end or u32.unpack_from(tiff, entry + 8)[0] + unit * values > end:
            return False
    return orientation
