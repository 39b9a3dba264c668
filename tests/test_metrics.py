"""Metrics against hand-worked answers, scikit-learn, and a slow plain AUPRO written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from engine.evaluation import metrics

# ---------------------------------------------------------------- image level


def test_image_auroc_perfect_reversed_and_tied() -> None:
    labels = [0, 0, 0, 1, 1]
    assert metrics.image_auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert metrics.image_auroc(labels, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc(labels, [0.5] * 5) == 0.5


def test_image_auroc_hand_worked_value() -> None:
    # Pairs (normal, anomalous): (0.1,0.35) ok, (0.1,0.8) ok, (0.4,0.35) wrong, (0.4,0.8) ok -> 3/4.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_metrics_undefined_with_one_class() -> None:
    assert math.isnan(metrics.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.image_auroc([1, 1], [0.1, 0.2]))
    assert math.isnan(metrics.f1_max([0, 0], [0.1, 0.2]))


def test_labels_must_be_binary() -> None:
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        metrics.image_auroc([0, 2], [0.1, 0.2])


def test_f1_max_perfect_and_hand_worked() -> None:
    assert metrics.f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    # threshold 0.9: P=1 R=1/2 F1=2/3; 0.8: P=1/2 R=1/2; 0.7: P=2/3 R=1 F1=0.8; 0.1: P=1/2 R=1.
    best, threshold = metrics.f1_max_threshold([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert best == pytest.approx(0.8)
    assert threshold == pytest.approx(0.7)


# ---------------------------------------------------------------- pixel level: hand-worked cases


def _row(values: list[float]) -> np.ndarray:
    return np.asarray([values], dtype=np.float32)


def test_pixel_auroc_perfect_and_reversed() -> None:
    mask = _row([0, 0, 1, 1])
    assert metrics.pixel_auroc(mask, _row([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.pixel_auroc(mask, _row([0.9, 0.8, 0.2, 0.1])) == 0.0


def test_aupro_perfect_and_reversed() -> None:
    mask = _row([0, 0, 1, 1])
    assert metrics.aupro(mask, _row([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert metrics.aupro(mask, _row([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)


def test_aupro_hand_worked_one_third() -> None:
    # Ten normal pixels scored 0.0 .. 0.9 and a one-pixel defect scored 0.75: it is found once the
    # threshold drops below 0.8, i.e. at FPR 0.2. PRO = 0 on [0, 0.2], 1 on [0.2, 0.3]: area 0.1 / 0.3.
    normal = [k / 10 for k in range(10)]
    scores = _row(normal + [0.75])
    mask = _row([0] * 10 + [1])
    assert metrics.aupro(mask, scores) == pytest.approx(1 / 3)


def test_aupro_averages_regions_not_pixels() -> None:
    # Region A (1 px) scores above every normal pixel, region B (3 px, apart from A) below all of them.
    # Up to FPR 0.3 PRO = (1 + 0) / 2 = 0.5, while the pixel recall there is only 1/4.
    scores = np.zeros((5, 5), dtype=np.float32)
    mask = np.zeros((5, 5), dtype=bool)
    scores[:] = np.linspace(0.2, 0.8, 25).reshape(5, 5)
    mask[0, 0] = True
    scores[0, 0] = 1.0
    mask[4, 2:5] = True
    scores[4, 2:5] = 0.0
    assert metrics.aupro(mask, scores) == pytest.approx(0.5)
    curves = metrics.pixel_curves(mask, scores)
    at_low_fpr = curves.fpr <= 0.3
    assert curves.tpr[at_low_fpr].max() == pytest.approx(0.25)


def test_aupro_regions_are_eight_connected() -> None:
    # A diagonal pair is one region (half found) plus a lone missed pixel: PRO = (0.5 + 0) / 2 = 0.25.
    # Four-connectivity would count three regions: (1 + 0 + 0) / 3.
    scores = np.full((6, 6), 0.5, dtype=np.float32)
    scores[:] += np.linspace(0.0, 0.1, 36).reshape(6, 6)
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    scores[0, 0], scores[1, 1] = 1.0, 0.0
    mask[5, 5] = True
    scores[5, 5] = 0.0
    assert metrics.aupro(mask, scores) == pytest.approx(0.25)


def test_pixel_metrics_undefined_without_defects_and_shape_errors() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    masks = np.zeros((2, 4, 4), dtype=bool)
    assert math.isnan(metrics.pixel_auroc(masks, maps))
    assert math.isnan(metrics.aupro(masks, maps))
    with pytest.raises(ValueError, match="differs from map shape"):
        metrics.pixel_auroc(masks[:, :3], maps)
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        metrics.aupro(masks, maps[:1])


# ---------------------------------------------------------------- against references


def _regions_by_flood_fill(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components, found the slow way (independent of scipy)."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack, pixels = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                pixels.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            regions.append(pixels)
    return regions


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Every distinct score as a threshold; PRO and FPR counted directly; area by explicit trapezoids."""
    region_scores = []
    for mask, amap in zip(masks, maps):
        for pixels in _regions_by_flood_fill(mask.astype(bool)):
            region_scores.append(np.array([amap[y, x] for y, x in pixels], dtype=np.float64))
    normal_scores = maps[~masks.astype(bool)].astype(np.float64)
    points = [(0.0, 0.0)]
    for t in np.unique(maps.astype(np.float64))[::-1]:
        fpr = float(np.mean(normal_scores >= t))
        pro = float(np.mean([np.mean(r >= t) for r in region_scores]))
        points.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f0 >= limit:
            break
        if f1 > limit:
            p1 = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
            f1 = limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / limit


def _blob_case(seed: int, n: int, size: int, levels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few rectangles and diagonal blobs; maps that are noisy and higher on the defects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.normal(0.0, 1.0, masks.shape) + 1.5 * masks
    if levels is not None:  # few distinct values: ties everywhere
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("levels", [None, 4])
def test_aupro_matches_slow_reference_exactly_when_thresholds_fit(levels: int | None) -> None:
    masks, maps = _blob_case(seed=1, n=5, size=16, levels=levels)
    assert metrics.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-9)


def test_aupro_on_threshold_grid_within_stated_bound() -> None:
    masks, maps = _blob_case(seed=2, n=6, size=24, levels=None)
    max_thresholds = 300  # fewer than the 3456 distinct scores: the quantile grid is used
    assert np.unique(maps).size > max_thresholds
    expected = reference_aupro(masks, maps)
    got = metrics.aupro(masks, maps, max_thresholds=max_thresholds)
    assert abs(got - expected) <= 1.5 / max_thresholds
    assert 0.2 < expected < 0.9  # the case is neither trivial nor hopeless


@pytest.mark.parametrize("max_thresholds", [metrics.DEFAULT_MAX_THRESHOLDS, 200])
def test_pixel_auroc_matches_sklearn(max_thresholds: int) -> None:
    masks, maps = _blob_case(seed=3, n=6, size=20, levels=None)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    got = metrics.pixel_auroc(masks, maps, max_thresholds=max_thresholds)
    assert abs(got - expected) <= (1e-12 if max_thresholds >= maps.size else 1.5 / max_thresholds)


def test_pixel_metrics_accept_a_list_of_maps() -> None:
    masks, maps = _blob_case(seed=4, n=3, size=12, levels=8)
    as_array = metrics.pixel_curves(masks, maps)
    as_lists = metrics.pixel_curves(list(masks), list(maps))
    np.testing.assert_array_equal(as_array.pro, as_lists.pro)
    assert as_array.n_regions == as_lists.n_regions >= 2
