"""File inspection: read a file's bytes and check them without decoding pixels.

Every file is inspected (header, extension, pixel limit, JPEG/PNG structure) on the CPU before any
decoder sees it, so a broken file gets the same error whichever decoder runs (engine.inputs.decoders).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import DecodeError
from engine.inputs.reader import read_file
from engine.inputs.settings import DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S

# vade enforces its own limit (max_pixels) before decoding, so Pillow's global guard is switched off.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

FORMAT_BY_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".bmp": "BMP",
    ".dib": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".gif": "GIF", ".ppm": "PPM",
    ".pgm": "PPM", ".pbm": "PPM", ".pnm": "PPM", ".jp2": "JPEG2000", ".j2k": "JPEG2000", ".jpx": "JPEG2000",
}  # fmt: skip
SAME_FORMAT = {"MPO": "JPEG"}  # camera multi-picture JPEGs are JPEGs


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: container format, Pillow mode, stored width and height."""

    format: str
    mode: str
    width: int
    height: int


def _png_structure_problem(data: bytes) -> str | None:
    """Walk the PNG chunks: each must be complete with a matching CRC, and IEND must be reached."""
    pos, size = 8, len(data)
    while pos + 8 <= size:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > size:
            return f"truncated PNG: the {kind.decode('latin-1')} chunk at byte {pos} is cut off (file has {size} bytes)"
        crc = struct.unpack(">I", data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            return f"corrupt PNG: checksum mismatch in the {kind.decode('latin-1')} chunk at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end
    return f"truncated PNG: no IEND chunk before the end of the file ({size} bytes)"


_JPEG_BETWEEN_SCANS = {0xC4, 0xDB, 0xDD, 0xDA, 0xFE, 0xDC} | set(range(0xE0, 0xF0))


def _jpeg_structure_problem(data: bytes) -> str | None:
    """Walk the JPEG markers: segments complete, compressed data free of stray markers, EOI present."""
    buf = np.frombuffer(data, dtype=np.uint8)
    size = len(data)
    ff = np.flatnonzero(buf[:-1] == 0xFF)
    follow = buf[ff + 1]
    # In compressed data 0xFF is followed by 0x00 (stuffing), a restart code or more 0xFF fill bytes.
    markers = ff[~((follow == 0x00) | ((follow >= 0xD0) & (follow <= 0xD7)) | (follow == 0xFF))]
    pos, seen_scan = 2, False
    while True:
        if pos + 2 > size:
            return f"truncated JPEG: the file ends at byte {size} before the end-of-image marker"
        if data[pos] != 0xFF:
            return f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02X}"
        code = data[pos + 1]
        if code == 0xFF:
            pos += 1
            continue
        if code == 0xD9:
            return None if seen_scan else "corrupt JPEG: end-of-image marker before any image data"
        if seen_scan and code not in _JPEG_BETWEEN_SCANS:
            return f"corrupt JPEG: unexpected marker 0xFF{code:02X} inside the compressed data at byte {pos}"
        if 0xD0 <= code <= 0xD7 or code == 0x01:
            pos += 2
            continue
        if pos + 4 > size:
            return f"truncated JPEG: the file ends at byte {size} inside a marker"
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            return f"truncated JPEG: the segment 0xFF{code:02X} at byte {pos} is cut off (file has {size} bytes)"
        if code != 0xDA:
            pos = end
            continue
        seen_scan = True
        nxt = int(np.searchsorted(markers, end))
        if nxt >= len(markers):
            return f"truncated JPEG: compressed data runs to the end of the file ({size} bytes) without an end marker"
        pos = int(markers[nxt])


def inspect_bytes(data: bytes, suffix: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check a file's bytes without decoding pixels; raise DecodeError saying what is wrong."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = SAME_FORMAT.get(img.format or "", img.format or "unknown")
            info = ImageInfo(fmt, img.mode, img.width, img.height)
    except UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format (file starts with {data[:16]!r})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise DecodeError(f"corrupt image header: {type(exc).__name__}: {exc}") from exc
    expected = FORMAT_BY_SUFFIX.get(suffix.lower())
    if expected and expected != info.format:
        raise DecodeError(
            f"wrong content for the file extension: {suffix} means {expected} but the content is "
            f"{info.format}; rename the file to match its content or replace it"
        )
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise DecodeError(
            f"image is {info.width}x{info.height} = {pixels} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb); raise --max-pixels to allow it"
        )
    if pixels == 0:
        raise DecodeError(f"image has no pixels ({info.width}x{info.height})")
    problem = _jpeg_structure_problem(data) if info.format == "JPEG" else None
    problem = _png_structure_problem(data) if info.format == "PNG" else problem
    if problem:
        raise DecodeError(problem)
    return info


def read_bytes(path: str | Path, timeout: float = DEFAULT_READ_TIMEOUT_S, max_bytes: int | None = None) -> bytes:
    """A regular file's bytes within `timeout` seconds (engine.inputs.reader); DecodeError says what is wrong."""
    return read_file(path, timeout, max_bytes)
def oriented_size(path: str | Path, timeout: float = DEFAULT_READ_TIMEOUT_S) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF orientation applied), from its header alone;
    the file is read as every image is (regular files only, within `timeout`)."""
    data = read_bytes(path, timeout)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"cannot read the image header: {exc}") from exc
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
