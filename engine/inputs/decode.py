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
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from engine.errors import DecodeError
from engine.inputs.inspection import inspect_bytes, read_bytes
from engine.inputs.reader import max_file_bytes
from engine.inputs.settings import DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S
from engine.tiling import TileLayout

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
    # One copy of the pixels, read-only (np.array would add a second: 300 MB more for 100 MP).
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_pillow(data: bytes) -> np.ndarray:
    """Decode inspected bytes with Pillow to RGB uint8 (H, W, 3), EXIF orientation applied.

    The array is read-only (it shares Pillow's export of the pixels); wrap it with pixels_tensor."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
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

    Raises DecodeError with a message that says what is wrong with the file. The array is the
    caller's to change (a writable copy; the scan's decoders use decode_pillow's read-only one).
    """
    data = read_bytes(path, read_timeout, max_file_bytes(max_pixels))
    inspect_bytes(data, Path(path).suffix, max_pixels)
    return np.array(decode_pillow(data))


def _box_reduce(chw: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 box averages over factor x factor blocks, a strip at a time (memory)."""
    strip = factor * 64
    parts = [
        F.avg_pool2d(chw[:, top : top + strip].float().unsqueeze(0), factor, ceil_mode=True)[0]
        for top in range(0, chw.shape[1], strip)
    ]
    return torch.cat(parts, dim=1)


def _resized(batch_hwc: torch.Tensor, out_h: int, out_w: int, reduce: bool) -> torch.Tensor:
    """Same-shape uint8 (B, H, W, 3) -> float32 (B, 3, out_h, out_w) in [0, 255]: integer box reduction
    first for very large images, then bilinear with antialias."""
    height, width = batch_hwc.shape[1], batch_hwc.shape[2]
    factor = min(height // (4 * out_h), width // (4 * out_w))
    if reduce and height * width > REDUCE_ABOVE_PIXELS and factor >= 2:
        batch = torch.stack([_box_reduce(px.permute(2, 0, 1), factor) for px in batch_hwc])
    else:
        batch = batch_hwc.permute(0, 3, 1, 2).float()
    if batch.shape[-2:] != (out_h, out_w):
        batch = F.interpolate(batch, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return batch.clamp_(0, 255)


def resize_batch(pixels: list[torch.Tensor], size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) tensors of any sizes, one device -> float32 (B, 3, size, size) in [0, 1].

    Same-shape images are resized together; the result per image does not depend on the batch.
    """
    device = pixels[0].device if pixels else torch.device("cpu")
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, device=device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, px in enumerate(pixels):
        groups.setdefault(tuple(px.shape), []).append(i)
    for members in groups.values():
        batch = torch.stack([pixels[i] for i in members])
        out[members] = _resized(batch, size, size, reduce=True) / 255.0
    return out


def pixels_tensor(rgb: np.ndarray) -> torch.Tensor:
    """An RGB uint8 array as a tensor without a copy, read-only arrays included (decoded pixels are
    only ever read: every preprocessing step writes a new tensor)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(rgb))


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """RGB uint8 arrays of any sizes -> float32 (B, 3, size, size) in [0, 1]."""
    return resize_batch([pixels_tensor(rgb) for rgb in images], size)


def scaled_image(pixels: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> the image at the layout's scaled size, (3, h, w): the uint8 pixels
    themselves (no copy) when the size is unchanged, else float32 in [0, 255] resized as resize_batch does."""
    if (layout.scaled_h, layout.scaled_w) == tuple(pixels.shape[:2]):
        return pixels.permute(2, 0, 1)
    return _resized(pixels.unsqueeze(0), layout.scaled_h, layout.scaled_w, reduce=True)[0]


def mirrored(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Indices into [0, length) for any positions >= 0: the image reflected at its last row or column
    (..., n-2, n-1, n-2, ..., 0, 1, ...), as often as needed, so padding continues the picture."""
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    folded = positions.remainder(period)
    return torch.where(folded < length, folded, period - folded)


def cut_tiles(image: torch.Tensor, layout: TileLayout, first: int, count: int) -> torch.Tensor:
    """Tiles first .. first+count-1 of a scaled image (3, h, w) -> float32 (count, 3, T, T) in [0, 1].

    Rows and columns past the image mirror it (a texture or an edge goes on as it was, where repeating
    the last row would draw streaks no normal image has); one tile covering the whole image equals
    resize_batch's result for it bit for bit.
    """
    tile = layout.spec.tile
    out = torch.empty((count, 3, tile, tile), dtype=torch.float32, device=image.device)
    steps = torch.arange(tile, device=image.device)
    for k in range(count):
        y0, x0 = layout.origin(first + k)
        rows = mirrored(steps + y0, layout.scaled_h)
        cols = mirrored(steps + x0, layout.scaled_w)
        window = image.index_select(1, rows).index_select(2, cols)
        out[k] = window.float() / 255.0
    return out


def tile_chunks(pixels: torch.Tensor, layout: TileLayout, chunk: int, tiles: list[int] | None = None):
    """(first tile index, float32 tiles) for `tiles` (default all) of RGB uint8 (H, W, 3) `pixels`, at
    most `chunk` consecutive tiles at a time: one scaled image and one chunk of tiles in memory."""
    image = scaled_image(pixels, layout)
    wanted = list(range(layout.n_tiles)) if tiles is None else sorted(tiles)
    start = 0
    while start < len(wanted):
        stop = start + 1
        while stop < len(wanted) and stop - start < chunk and wanted[stop] == wanted[stop - 1] + 1:
            stop += 1
        yield wanted[start], cut_tiles(image, layout, wanted[start], stop - start)
        start = stop
