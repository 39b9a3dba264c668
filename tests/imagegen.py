"""Generate unusual-but-valid and broken image files at test time (no image files live in the repo).

`valid_corpus(folder)` and `broken_corpus(folder)` write files and return {file name: expectation}.
Every valid file holds a smooth pattern with noise so decoders have real work and resizes matter.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with mild noise, RGB uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            128 + 100 * np.sin(x / max(width, 1) * 6.0 + seed),
            128 + 100 * np.cos(y / max(height, 1) * 5.0),
            (x + y) / max(width + height, 1) * 255.0,
        ],
        axis=-1,
    )
    rgb += rng.normal(0.0, 6.0, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg_bytes(width: int = 96, height: int = 64, seed: int = 0, quality: int = 90) -> bytes:
    return encode(Image.fromarray(pattern(width, height, seed)), "JPEG", quality=quality)


def png_bytes(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(width, height, seed)), "PNG")


def exif_rotated_jpeg(width: int = 96, height: int = 64, orientation: int = 6) -> bytes:
    """A JPEG stored width x height whose EXIF says: display rotated (orientation 6 = 90 degrees CW)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pattern(width, height, 3)), "JPEG", quality=90, exif=exif.tobytes())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with a tiny zlib stream."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb48(width: int = 40, height: int = 30) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one, so the chunks are written here)."""
    rows = (pattern(width, height, 10).astype(np.uint16) * 257).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def valid_files() -> dict[str, bytes]:
    """Unusual but valid images: every one must be scored."""
    base = pattern(80, 60, 1)
    rgba = np.concatenate([base, np.full((60, 80, 1), 128, np.uint8)], axis=-1)
    grey16 = (pattern(80, 60, 2)[:, :, 0].astype(np.uint16) * 257).astype(np.uint16)
    files = {
        "plain.jpg": jpeg_bytes(seed=1),
        "plain.png": png_bytes(seed=1),
        "grey.png": encode(Image.fromarray(base[:, :, 0]), "PNG"),
        "grey.jpg": encode(Image.fromarray(base[:, :, 1]), "JPEG", quality=90),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.png": encode(Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent.gif": encode(
            Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0
        ),
        "cmyk.jpg": encode(Image.fromarray(base).convert("CMYK"), "JPEG", quality=90),
        "grey16.png": encode(Image.fromarray(grey16), "PNG"),
        "grey16.tif": encode(Image.fromarray(grey16), "TIFF"),
        "rgb48.png": png_rgb48(),
        "grey_alpha.png": encode(Image.fromarray(base[:, :, 0]).convert("LA"), "PNG"),
        "bilevel.png": encode(Image.fromarray(base[:, :, 0]).convert("1"), "PNG"),
        "float32.tif": encode(Image.fromarray(base[:, :, 0].astype(np.float32) / 7), "TIFF"),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "tiny_1x1.png": encode(Image.fromarray(pattern(1, 1, 4)), "PNG"),
        "bitmap.bmp": encode(Image.fromarray(base), "BMP"),
        "photo.webp": encode(Image.fromarray(base), "WEBP", quality=90),
        "tiled.tiff": encode(Image.fromarray(base), "TIFF", compression="tiff_deflate"),
        "UPPER.JPG": jpeg_bytes(seed=5),
        "Mixed.Png": png_bytes(seed=6),
        "has space ü日本.jpeg": jpeg_bytes(seed=7),
        "progressive.jpg": encode(Image.fromarray(pattern(120, 90, 8)), "JPEG", quality=85, progressive=True),
    }
    return files


def huge_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    return encode(Image.fromarray(pattern(width, height, 9)), "JPEG", quality=80)


def broken_files(jpeg: bytes | None = None, png: bytes | None = None) -> dict[str, tuple[bytes, str]]:
    """Broken inputs -> (bytes, a word the error message must contain)."""
    jpeg = jpeg if jpeg is not None else jpeg_bytes(160, 120, 11)
    png = png if png is not None else png_bytes(160, 120, 12)
    rng = np.random.default_rng(13)
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2 : len(png) // 2 + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    corrupt_jpeg = bytearray(jpeg)
    sos = corrupt_jpeg.find(b"\xff\xda")
    mid = (sos + len(jpeg)) // 2
    corrupt_jpeg[mid : mid + 4] = b"\xff\xc0\x12\x34"  # a frame marker inside compressed data
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "text_not_image.jpg": (b"<html><body>404 not found</body></html>\n" * 20, "not a recognised image"),
        "png_named.jpg": (png, "extension"),
        "random_bytes.png": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a recognised image"),
        "corrupt.png": (bytes(corrupt_png), "corrupt"),
        "corrupt.jpg": (bytes(corrupt_jpeg), "corrupt"),
        "bomb.png": (png_header_only(60_000, 60_000), "pixels"),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths
