"""Image decoding and preprocessing: inspected bytes -> RGB uint8 -> resized float tensor in [0, 1].

Files are first inspected (engine.inputs.inspection). Then one decoder turns the good ones into RGB
uint8 pixels: DALI (CPU pipeline, or "mixed" on CUDA), torchvision's nvjpeg (CUDA) or Pillow, here;
formats a decoder cannot read fall back to Pillow. Pixels from every decoder go through the same resize.

Resize policy: every image is resized to the model's square input (size x size), aspect ratio not kept,
bilinear with antialiasing, EXIF orientation applied first; the width and height after orientation are
recorded so a map can be mapped back. Images over 16 megapixels whose short side is at least 8x `size`
are first box-averaged by an integer factor (bounded memory), then resized the same way.
Decoder agreement: on the CPU, DALI and Pillow give bitwise-equal pixels for the formats DALI decodes
here (tests/test_decode_dali.py checks |difference| <= DECODER_TOLERANCE after preprocessing).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engine.errors import DecodeError
from engine.inputs.inspection import inspect_bytes, read_bytes
from engine.inputs.reader import max_file_bytes
from engine.inputs.settings import DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S

DECODER_TOLERANCE = 2.0 / 255.0  # max |difference| between decoders after preprocessing, values in [0, 1]
REDUCE_ABOVE_PIXELS = 4096 * 4096


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


def read_rgb(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, read_timeout: float = DEFAULT_READ_TIMEOUT_S
) -> np.ndarray:
    """Decode one image file to RGB uint8 (H, W, 3), EXIF orientation applied: the reading path of every
    verb that reads images outside a scan (fit, eval, calibrate). Regular files only, each read within
    `read_timeout` seconds (engine.inputs.reader).

    Raises DecodeError with a message that says what is wrong with the file.
    """
    data = read_bytes(path, read_timeout, max_file_bytes(max_pixels))
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
