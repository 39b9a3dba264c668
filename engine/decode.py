"""Image decoding and preprocessing: file bytes -> RGB uint8 -> resized float tensor in [0, 1].

Every file is first *inspected* (header, extension, pixel limit, JPEG/PNG structure) on the CPU, so a
broken file gets the same error whichever decoder runs. Then one decoder turns the good ones into RGB
uint8 pixels: DALI (CPU pipeline, or "mixed" on CUDA), torchvision's nvjpeg (CUDA) or Pillow; formats a
decoder cannot read fall back to Pillow. Pixels from every decoder go through the same resize.

Resize policy: every image is resized to the model's square input (size x size), aspect ratio not kept,
bilinear with antialiasing, EXIF orientation applied first; the width and height after orientation are
recorded so a map can be mapped back. Images over 16 megapixels whose short side is at least 8x `size`
are first box-averaged by an integer factor (bounded memory), then resized the same way.
Decoder agreement: on the CPU, DALI and Pillow give bitwise-equal pixels for the formats DALI decodes
here (tests/test_decode_dali.py checks |difference| <= DECODER_TOLERANCE after preprocessing).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import DecodeError

# Pillow's own decompression-bomb limit (2 x 89,478,485 pixels, about 13,400 x 13,400): larger images are
# refused unless the caller raises the limit (vade scan --max-pixels).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
DECODER_TOLERANCE = 2.0 / 255.0  # max |difference| between decoders after preprocessing, values in [0, 1]
REDUCE_ABOVE_PIXELS = 4096 * 4096

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


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> RGB uint8 (H, W, 3). 16-bit and float images are scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return np.repeat(np.nan_to_num(arr).astype(np.uint8)[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_pillow(data: bytes) -> np.ndarray:
    """Decode inspected bytes with Pillow to RGB uint8 (H, W, 3), EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except OSError as exc:
        if "truncated" in str(exc):
            raise DecodeError(f"truncated image data: {exc}") from exc
        raise DecodeError(f"corrupt image data: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken data
        raise DecodeError(f"corrupt image data: {type(exc).__name__}: {exc}") from exc


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except IsADirectoryError:
        raise DecodeError("is a folder, not an image file") from None
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror or exc}") from exc


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image file to RGB uint8 (H, W, 3), EXIF orientation applied.

    Raises DecodeError with a message that says what is wrong with the file.
    """
    data = read_bytes(path)
    inspect_bytes(data, Path(path).suffix, max_pixels)
    return decode_pillow(data)


def _box_reduce(chw: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 box averages over factor x factor blocks, a strip at a time (memory)."""
    strip = factor * 64
    parts = [
        F.avg_pool2d(chw[:, top : top + strip].float().unsqueeze(0), factor, ceil_mode=True)[0]
        for top in range(0, chw.shape[1], strip)
    ]
    return torch.cat(parts, dim=1)


def resize_batch(pixels: list[torch.Tensor], size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) tensors of any sizes, one device -> float32 (B, 3, size, size) in [0, 1].

    Same-shape images are resized together; the result per image does not depend on the batch.
    """
    device = pixels[0].device if pixels else torch.device("cpu")
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, px in enumerate(pixels):
        groups.setdefault(tuple(px.shape), []).append(i)
    for shape, members in groups.items():
        height, width = shape[0], shape[1]
        factor = min(height, width) // (4 * size)
        if height * width > REDUCE_ABOVE_PIXELS and factor >= 2:
            batch = torch.stack([_box_reduce(pixels[i].permute(2, 0, 1), factor) for i in members])
        else:
            batch = torch.stack([pixels[i] for i in members]).permute(0, 3, 1, 2).float()
        if batch.shape[-2:] != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[members] = batch.clamp_(0, 255) / 255.0
    return out


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 arrays of any sizes -> float32 (B, 3, size, size) in [0, 1]."""
    return resize_batch([torch.from_numpy(np.ascontiguousarray(rgb)) for rgb in images], size)
