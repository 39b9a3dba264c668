"""`vade eval`: score an MVTec-layout test split with a model and compute the metrics.

Images are decoded and resized exactly as a scan does (engine.inputs.decode); ground-truth masks are resized to
the model's input with nearest-neighbour sampling so they stay binary. Maps are kept at the input size
as float32: 600 test images at 256 px hold 157 MB. The throughput counts decode + resize + scoring, not
the mask reading.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from engine.errors import DataError, DecodeError
from engine.evaluation import metrics
from engine.inputs.datasets import TestItem, test_items
from engine.inputs.decode import read_rgb, to_tensor
from engine.inputs.inspection import read_bytes
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S

Progress = Callable[[int, int], None]  # (images done, images in all)


class ScoringModel(Protocol):
    """The part of the model API evaluation needs (see engine.models.base)."""

    input_size: int

    def score(self, images: torch.Tensor) -> Any: ...  # ScoreOutput(scores[B], maps[B, S, S])


def _read_mask(item: TestItem, size: int, read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> np.ndarray:
    """The item's mask resized (nearest) to size x size, as its image is; refused unless the mask
    has its image's size (either orientation: EXIF rotation may transpose the image). Files are read
    as every image is (regular files only, within read_timeout: engine.inputs.reader)."""
    if item.mask is None:
        return np.zeros((size, size), dtype=bool)
    try:
        with Image.open(io.BytesIO(read_bytes(item.mask, read_timeout))) as img:
            mask_size = img.size
            mask = img.convert("L").resize((size, size), Image.Resampling.NEAREST)
    except (OSError, DecodeError) as exc:
        raise DataError(f"cannot read ground-truth mask {item.mask}: {exc}") from exc
    try:
        with Image.open(io.BytesIO(read_bytes(item.path, read_timeout))) as img:
            image_size = img.size
    except (OSError, DecodeError):
        return np.asarray(mask) > 0  # an unreadable image is reported when it is decoded
    if mask_size not in (image_size, image_size[::-1]):
        raise DataError(
            f"ground-truth mask {item.mask} is {mask_size[0]}x{mask_size[1]} but its image {item.path} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
        )
    return np.asarray(mask) > 0


def _decode(item: TestItem, read_timeout: float) -> np.ndarray:
    try:
        return read_rgb(item.path, read_timeout=read_timeout)
    except DecodeError as exc:
        raise DecodeError(f"test image {item.path}: {exc}; remove or replace it to evaluate") from exc


def score_items(
    model: ScoringModel,
    items: Sequence[TestItem],
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(image scores [N] float32, maps [N, S, S] float32, seconds spent decoding and scoring)."""
    size = int(model.input_size)
    device = getattr(model, "device", "cpu")
    scores = np.empty(len(items), dtype=np.float32)
    maps = np.empty((len(items), size, size), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        images = to_tensor([_decode(item, read_timeout) for item in batch], size).to(device)
        with torch.inference_mode():
            out = model.score(images)
        batch_maps = out.maps.detach().float().cpu().numpy()
        if batch_maps.shape != (len(batch), size, size):
            raise ValueError(f"model returned maps of shape {batch_maps.shape}; expected {(len(batch), size, size)}")
        scores[start : start + len(batch)] = out.scores.detach().float().cpu().numpy()
        maps[start : start + len(batch)] = batch_maps
        if progress is not None:
            progress(start + len(batch), len(items))
    return scores, maps, time.perf_counter() - started


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def _metric_block(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    curves = metrics.pixel_curves(masks, maps)
    return {
        "image_auroc": _json_float(metrics.image_auroc(labels, scores)),
        "pixel_auroc": _json_float(metrics.pixel_auroc_from(curves)),
        "aupro": _json_float(metrics.aupro_from(curves)),
        "f1_max": _json_float(metrics.f1_max(labels, scores)),
    }


def evaluate(
    model: ScoringModel,
    root: str | Path,
    category: str | None = None,
    *,
    batch_size: int = 16,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> dict[str, Any]:
    """Metrics of `model` on ROOT[/CATEGORY]/test, as a JSON-able dict.

    Keys: image_auroc, pixel_auroc, aupro (FPR <= 0.3), f1_max (image level), per_defect (each defect
    type against the good images: the same four metrics and `count`), n_images, images_per_second.
    A metric that is undefined (e.g. no good images in the split) is None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    items = test_items(Path(root), category)
    masks = np.stack([_read_mask(item, int(model.input_size), read_timeout) for item in items])  # checked first
    scores, maps, seconds = score_items(model, items, batch_size=batch_size, progress=progress, read_timeout=read_timeout)
    labels = np.array([item.label for item in items], dtype=np.int64)
    defects = np.array([item.defect for item in items])

    result = _metric_block(labels, scores, masks, maps)
    per_defect: dict[str, dict[str, Any]] = {}
    good = defects == "good"
    for defect in sorted(set(defects.tolist()) - {"good"}):
        subset = good | (defects == defect)
        block = _metric_block(labels[subset], scores[subset], masks[subset], maps[subset])
        per_defect[defect] = {**block, "count": int((defects == defect).sum())}
    result["per_defect"] = per_defect
    result["n_images"] = len(items)
    result["n_good"] = int(good.sum())
    result["images_per_second"] = round(len(items) / seconds, 3) if seconds > 0 else None
    return result


def _cell(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def format_table(result: dict[str, Any]) -> str:
    """The evaluation result as a fixed-width table for the terminal."""
    rows = [("all", result, result.get("n_images"))]
    rows += [(name, block, block.get("count")) for name, block in result.get("per_defect", {}).items()]
    name_width = max(12, *(len(name) for name, _, _ in rows))
    header = f"{'defect':<{name_width}}  {'img AUROC':>9}  {'px AUROC':>8}  {'AUPRO':>6}  {'F1-max':>6}  {'images':>6}"
    lines = [header, "-" * len(header)]
    for name, block, count in rows:
        lines.append(
            f"{name:<{name_width}}  {_cell(block.get('image_auroc')):>9}  {_cell(block.get('pixel_auroc')):>8}  "
            f"{_cell(block.get('aupro')):>6}  {_cell(block.get('f1_max')):>6}  {count if count is not None else '':>6}"
        )
    speed = result.get("images_per_second")
    tail = f"{result.get('n_images', 0)} test images ({result.get('n_good', '?')} good)"
    if speed is not None:
        tail += f", {speed:.1f} images/s (decode + score)"
    lines.append(tail)
    return "\n".join(lines)
