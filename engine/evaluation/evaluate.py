"""`vade eval`: score an MVTec-layout test split with a model and compute the metrics.

Images are decoded and resized exactly as a scan does (engine.inputs.decode); a tiled model scores
each image's tiles and stitches them as a scan does. Pixel metrics are computed at each ground-truth
mask's own resolution: every map is resized to its image's size (bilinear, the overlay rule of a
scan's maps) and a mask is never resized. Maps and masks are read one image at a time for the
metrics (engine.evaluation.metrics streams them), so memory holds the maps at map size only. The
throughput counts decode + resize + scoring, not the mask reading.
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
import torch.nn.functional as F
from PIL import Image

from engine.errors import DataError, DecodeError
from engine.evaluation import metrics
from engine.inputs.datasets import TestItem, test_items
from engine.inputs.decode import read_rgb, to_tensor
from engine.inputs.inspection import oriented_size, read_bytes
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.models.tiled import score_images_tiled

Progress = Callable[[int, int], None]  # (images done, images in all)
# EXIF orientation -> the transpose that displays the image (as PIL.ImageOps.exif_transpose applies it)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # fmt: skip


class ScoringModel(Protocol):
    """The part of the model API evaluation needs (see engine.models.base)."""

    input_size: int

    def score(self, images: torch.Tensor) -> Any: ...  # ScoreOutput(scores[B], maps[B, S, S])


def _open(path: Path, read_timeout: float) -> Image.Image:
    """A mask or image opened from bytes read as every image is (regular files only, within the timeout)."""
    return Image.open(io.BytesIO(read_bytes(path, read_timeout)))


def _orientation(path: Path, read_timeout: float) -> int:
    try:
        with _open(path, read_timeout) as img:
            return int(img.getexif().get(0x0112, 1))
    except (OSError, DecodeError):
        return 1


def check_masks(items: Sequence[TestItem], read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> list[tuple[int, int]]:
    """Each image's displayed (height, width); refuses a mask that is not its image's size (either
    orientation: EXIF rotation may transpose the image). Runs before any scoring."""
    sizes = []
    for item in items:
        try:
            size = oriented_size(item.path, read_timeout)
        except DecodeError:
            size = (0, 0)  # an unreadable image is reported when it is decoded
        if item.mask is not None:
            try:
                with _open(item.mask, read_timeout) as img:
                    mask_w, mask_h = img.size
            except (OSError, DecodeError) as exc:
                raise DataError(f"cannot read ground-truth mask {item.mask}: {exc}") from exc
            if size != (0, 0) and (mask_h, mask_w) not in (size, size[::-1]):
                raise DataError(
                    f"ground-truth mask {item.mask} is {mask_w}x{mask_h} but its image {item.path} is "
                    f"{size[1]}x{size[0]}; a mask must have its image's size"
                )
        sizes.append(size)
    return sizes


class MaskSequence(Sequence):
    """Ground-truth masks at their own resolution, read on access, oriented as their images are shown."""

    def __init__(self, items: Sequence[TestItem], sizes: Sequence[tuple[int, int]],
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S):
        self.items, self.sizes, self.read_timeout = list(items), list(sizes), read_timeout

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        item, size = self.items[i], self.sizes[i]
        if item.mask is None:
            return np.zeros(size, dtype=bool)
        with _open(item.mask, self.read_timeout) as img:
            mask = img.convert("L")
            if mask.size[::-1] != size:  # stored unrotated, its image displayed rotated
                orientation = _orientation(item.path, self.read_timeout)
                mask = mask.transpose(_ORIENT.get(orientation, Image.Transpose.TRANSPOSE))
            return np.asarray(mask) > 0


class MapsAtImageSize(Sequence):
    """Each map resized (bilinear, align_corners=False) to its image's (height, width), on access."""

    def __init__(self, maps: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]):
        self.maps, self.sizes = list(maps), list(sizes)

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        amap, size = self.maps[i], self.sizes[i]
        if amap.shape == size:
            return amap
        up = F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear", align_corners=False)
        return up[0, 0].numpy()


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
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]], float]:
    """(image scores [N] float32, raw maps (float32, the model's map shape each), displayed image
    sizes (height, width), seconds spent decoding and scoring)."""
    scores = np.empty(len(items), dtype=np.float32)
    maps: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    started = time.perf_counter()
    spec = getattr(model, "tile_spec", None)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        decoded = [_decode(item, read_timeout) for item in batch]
        sizes += [(int(px.shape[0]), int(px.shape[1])) for px in decoded]
        if spec is None:
            size = int(model.input_size)
            images = to_tensor(decoded, size).to(getattr(model, "device", "cpu"))
            with torch.inference_mode():
                out = model.score(images)
            batch_maps = out.maps.detach().float().cpu().numpy()
            if batch_maps.shape != (len(batch), size, size):
                raise ValueError(f"model returned maps of shape {batch_maps.shape}; expected {(len(batch), size, size)}")
            scores[start : start + len(batch)] = out.scores.detach().float().cpu().numpy()
            maps += list(batch_maps)
        else:
            for k, (_, out) in enumerate(score_images_tiled(model, enumerate(decoded))):
                scores[start + k] = float(out.score)
                maps.append(out.map.detach().float().cpu().numpy())
        if progress is not None:
            progress(start + len(batch), len(items))
    return scores, maps, sizes, time.perf_counter() - started


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def _metric_block(labels: np.ndarray, scores: np.ndarray, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> dict[str, Any]:
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
    check_masks(items, read_timeout)  # before scoring
    scores, maps, sizes, seconds = score_items(model, items, batch_size=batch_size, progress=progress,
                                               read_timeout=read_timeout)
    labels = np.array([item.label for item in items], dtype=np.int64)
    defects = np.array([item.defect for item in items])

    def block_of(subset: np.ndarray) -> dict[str, Any]:
        chosen = np.flatnonzero(subset)
        chosen_sizes = [sizes[i] for i in chosen]
        masks = MaskSequence([items[i] for i in chosen], chosen_sizes, read_timeout)
        return _metric_block(labels[chosen], scores[chosen], masks, MapsAtImageSize([maps[i] for i in chosen], chosen_sizes))

    result = block_of(np.ones(len(items), dtype=bool))
    per_defect: dict[str, dict[str, Any]] = {}
    good = defects == "good"
    for defect in sorted(set(defects.tolist()) - {"good"}):
        subset = good | (defects == defect)
        block = block_of(subset)
        per_defect[defect] = {**block, "count": int((defects == defect).sum())}
    result["per_defect"] = per_defect
    calibration = getattr(model, "calibration", None)
    if calibration is not None and good.any():
        result["false_alarms"] = false_alarms(scores[good], calibration)
    result["n_images"] = len(items)
    result["n_good"] = int(good.sum())
    result["images_per_second"] = round(len(items) / seconds, 3) if seconds > 0 else None
    return result


def false_alarms(good_scores: np.ndarray, calibration: Any) -> dict[str, Any]:
    """The realised false-alarm rate of the model's threshold on labelled normal images, with its
    exact (Clopper-Pearson) 95% interval, next to what the threshold promises."""
    from engine.calibration import clopper_pearson

    flagged = int((np.asarray(good_scores, dtype=np.float64) >= calibration.threshold).sum())  # is_anomalous
    n = int(len(good_scores))
    lo, hi = clopper_pearson(flagged, n)
    return {"flagged": flagged, "good": n, "rate": round(flagged / n, 6), "ci95": [round(lo, 6), round(hi, 6)],
            "target_rate": calibration.target_rate, "certified_rate": calibration.certified_rate,
            "calibration_n": calibration.n, "calibration_source": calibration.source,
            "sufficient": calibration.sufficient}


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
    far = result.get("false_alarms")
    if far:
        lo, hi = far["ci95"]
        line = (f"false alarms on good images: {far['flagged']} of {far['good']} ({far['rate']:.1%}, 95% CI "
                f"{lo:.1%}-{hi:.1%})")
        if far.get("certified_rate") is not None:
            line += (f"; target {far['target_rate']:.2%}, certified {far['certified_rate']:.2%} by "
                     f"{far['calibration_n']} {far['calibration_source']} images")
            if not far.get("sufficient"):
                line += " (too few to certify the target)"
        lines.append(line)
    return "\n".join(lines)
