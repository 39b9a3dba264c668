"""Anomaly-detection metrics: image AUROC, F1-max, pixel AUROC and AUPRO.

Image metrics use scikit-learn on the per-image scores. Pixel metrics stream over the maps one image at
a time against a bounded set of thresholds: beyond the maps themselves they hold one image's bins, the
per-threshold counts and a bounded sample of scores to place the thresholds (at most 2 x 2M floats),
never a sort or a copy of all pixels as roc_auc_score on the flattened maps would.

Threshold grid: where the maps hold at most `max_thresholds` distinct values every one of them is a
threshold and the curves are exact. Otherwise the thresholds are quantiles of the normal-pixel scores
(evenly spaced over the whole range, and again over the top 30% that AUPRO integrates) joined with
quantiles of the defect-pixel scores, so no step between two thresholds moves the false-positive rate
or the true-positive rate by more than 3 / max_thresholds. Between two thresholds the trapezoid differs
from the exact staircase by at most half the step's rectangle, so either area is within
1.5 / max_thresholds of the exact one (4e-4 at the default).

Undefined metrics (one class only, no defect region) are NaN.

AUPRO (Bergmann et al., MVTec AD): for each threshold, PRO is the mean over connected defect regions
(8-connectivity, each region counted once, whatever its size) of the fraction of the region's pixels at or
above the threshold; plotted against the false-positive rate of the normal pixels, integrated from 0 up to
`fpr_limit` (0.3, the curve interpolated linearly at the limit) and divided by `fpr_limit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

AUPRO_FPR_LIMIT = 0.3
DEFAULT_MAX_THRESHOLDS = 4096
_SAMPLE_PER_CLASS = 2_000_000  # pixel scores kept per class to place the thresholds
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz

MapStack = np.ndarray | Sequence[np.ndarray]


def _binary_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    y = np.asarray(labels).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); found values {np.unique(y)[:5]}")
    return y.astype(bool)


def image_auroc(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC curve of image scores (1 = anomalous). NaN when only one class is present."""
    y = _binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def f1_max(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """Best F1 over all thresholds of the precision-recall curve. NaN without any anomalous sample."""
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(
    labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]
) -> tuple[float, float]:
    """(best F1, the score threshold reaching it; predicted anomalous when score >= threshold)."""
    y = _binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not y.any():
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; it never holds the maximum F1.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


@dataclass(frozen=True)
class PixelCurves:
    """Counts at each threshold, from the highest threshold (nothing flagged) to below the lowest (all).

    fpr[i], tpr[i], pro[i] describe the same threshold; fpr is non-decreasing.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray
    n_normal_pixels: int
    n_defect_pixels: int
    n_regions: int


def _as_stack(arrays: MapStack, name: str) -> Sequence[np.ndarray]:
    """A stack of 2-D arrays as an indexable sequence, without copying (lazy sequences stay lazy)."""
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 2:
            return [arrays]
        if arrays.ndim != 3:
            raise ValueError(f"{name} must be 2-D per image (H, W); found shape {arrays.shape}")
    return arrays


def _pairs(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]):
    """(bool mask, float32 map) per image, checked, one image at a time."""
    for i in range(len(masks)):
        mask, amap = np.asarray(masks[i]), np.asarray(maps[i], dtype=np.float32)
        if mask.ndim != 2 or amap.ndim != 2:
            raise ValueError(f"image {i}: masks and maps must be 2-D per image (H, W); found {mask.shape}, {amap.shape}")
        if mask.shape != amap.shape:
            raise ValueError(f"image {i}: mask shape {mask.shape} differs from map shape {amap.shape}")
        yield (mask if mask.dtype == bool else mask != 0), amap


def _sample(values: np.ndarray, stride: int) -> np.ndarray:
    # A copy, not a view: a view would keep the whole masked copy of the map alive.
    return values[::stride].copy() if stride > 1 else values


def _quantiles(sample: np.ndarray, levels: np.ndarray) -> np.ndarray:
    if sample.size == 0:
        return np.empty(0, dtype=np.float64)
    return np.quantile(sample, levels, method="inverted_cdf")


def _thresholds(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_thresholds: int) -> np.ndarray:
    """Ascending thresholds: every distinct value when few, else quantiles of each class (see module doc)."""
    n_defect = n_all = 0
    for i in range(len(masks)):  # masks alone: a lazy map sequence is not computed for this
        mask = np.asarray(masks[i])
        n_defect += int(np.count_nonzero(mask))
        n_all += mask.size
    n_normal = n_all - n_defect
    normal_stride = max(1, -(-n_normal // _SAMPLE_PER_CLASS))
    defect_stride = max(1, -(-n_defect // _SAMPLE_PER_CLASS))
    normal_parts, defect_parts = [], []
    for mask, amap in _pairs(masks, maps):
        normal_parts.append(_sample(amap[~mask], normal_stride))
        defect_parts.append(_sample(amap[mask], defect_stride))
    normal = np.concatenate(normal_parts).astype(np.float64)
    defect = np.concatenate(defect_parts).astype(np.float64)
    exact = normal_stride == 1 and defect_stride == 1
    if exact:
        distinct = np.unique(np.concatenate([normal, defect]))
        if distinct.size <= max_thresholds:
            return distinct
    per_part = max(2, max_thresholds // 3)
    whole = np.linspace(0.0, 1.0, per_part)
    top = np.linspace(1.0 - AUPRO_FPR_LIMIT, 1.0, per_part)  # dense where AUPRO integrates
    thresholds = np.concatenate(
        [_quantiles(normal, whole), _quantiles(normal, top), _quantiles(defect, whole)]
    )
    return np.unique(thresholds)


def pixel_curves(
    masks: MapStack, maps: MapStack, *, max_thresholds: int = DEFAULT_MAX_THRESHOLDS
) -> PixelCurves:
    """FPR, TPR and PRO of anomaly maps against ground-truth masks, one image in memory at a time.

    masks: (N, H, W) or a sequence of (H, W) (any indexable sequence with len: a lazy one is read
    image by image, twice), nonzero = defect. maps: the same shapes, higher = more anomalous.
    A pixel is flagged at threshold t when its score >= t.
    """
    mask_seq, map_seq = _as_stack(masks, "masks"), _as_stack(maps, "maps")
    if len(mask_seq) != len(map_seq):
        raise ValueError(f"{len(mask_seq)} masks but {len(map_seq)} maps")
    thresholds = _thresholds(mask_seq, map_seq, max_thresholds)
    n_bins = thresholds.size + 1
    # bin b of a pixel = how many thresholds are <= its score: flagged at thresholds[0 .. b-1].
    normal_hist = np.zeros(n_bins, dtype=np.int64)
    defect_hist = np.zeros(n_bins, dtype=np.int64)
    overlap_hist = np.zeros(n_bins, dtype=np.float64)  # sum over regions of flagged fraction
    n_regions = 0
    for mask, amap in _pairs(mask_seq, map_seq):
        bins = np.searchsorted(thresholds, amap.ravel(), side="right")
        flat_mask = mask.ravel()
        normal_hist += np.bincount(bins[~flat_mask], minlength=n_bins)
        if not flat_mask.any():
            continue
        defect_bins = bins[flat_mask]
        defect_hist += np.bincount(defect_bins, minlength=n_bins)
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_of_pixel = regions.ravel()[flat_mask]
        region_sizes = np.bincount(region_of_pixel)
        overlap_hist += np.bincount(defect_bins, weights=1.0 / region_sizes[region_of_pixel], minlength=n_bins)
        n_regions += count

    def flagged(hist: np.ndarray) -> np.ndarray:
        # at or above thresholds[j] = bins j+1.. ; listed from the top threshold down, framed by 0 and all.
        at_or_above = np.cumsum(hist[::-1])  # [k] = pixels in the top k+1 bins
        return np.concatenate([[0], at_or_above[:-1], [hist.sum()]]).astype(np.float64)

    n_normal, n_defect = int(normal_hist.sum()), int(defect_hist.sum())
    fpr = flagged(normal_hist) / n_normal if n_normal else np.full(n_bins + 1, np.nan)
    tpr = flagged(defect_hist) / n_defect if n_defect else np.full(n_bins + 1, np.nan)
    pro = flagged(overlap_hist) / n_regions if n_regions else np.full(n_bins + 1, np.nan)
    return PixelCurves(fpr, tpr, pro, n_normal, n_defect, n_regions)


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x non-decreasing from 0; y linear at the cut."""
    end = int(np.searchsorted(x, limit, side="right"))  # x[:end] <= limit
    area = float(_trapezoid(y[:end], x[:end]))
    if end < x.size and end > 0:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_cut) / 2.0
    return area


def pixel_auroc_from(curves: PixelCurves) -> float:
    if not curves.n_normal_pixels or not curves.n_defect_pixels:
        return math.nan
    return float(_trapezoid(curves.tpr, curves.fpr))


def aupro_from(curves: PixelCurves, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    if not curves.n_normal_pixels or not curves.n_regions:
        return math.nan
    return area_up_to(curves.fpr, curves.pro, fpr_limit) / fpr_limit


def pixel_auroc(masks: MapStack, maps: MapStack, *, max_thresholds: int = DEFAULT_MAX_THRESHOLDS) -> float:
    """Area under the per-pixel ROC curve over all maps pooled. NaN without normal or defect pixels."""
    return pixel_auroc_from(pixel_curves(masks, maps, max_thresholds=max_thresholds))


def aupro(
    masks: MapStack,
    maps: MapStack,
    *,
    fpr_limit: float = AUPRO_FPR_LIMIT,
    max_thresholds: int = DEFAULT_MAX_THRESHOLDS,
) -> float:
    """Normalised area under the per-region-overlap curve for FPR <= fpr_limit (see module doc)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    return aupro_from(pixel_curves(masks, maps, max_thresholds=max_thresholds), fpr_limit)
