"""Image decoding and preprocessing: file -> RGB uint8 -> resized float tensor in [0, 1].

Resize policy: every image is resized to the model's square input (size x size), aspect ratio not kept,
bilinear with antialiasing; the original width and height are recorded so a map can be mapped back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engine.errors import DecodeError

DEFAULT_MAX_PIXELS = 20_000 * 20_000


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
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image file to RGB uint8 (H, W, 3), EXIF orientation applied.

    Raises DecodeError with a message that says what is wrong with the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DecodeError(f"cannot read {path}: {exc.strerror}") from exc
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken data
        raise DecodeError(f"not a readable image: {type(exc).__name__}: {exc}") from exc


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 arrays of any sizes -> float32 (B, 3, size, size) in [0, 1]."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, rgb in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = t[0].clamp_(0, 255) / 255.0
    return out
