"""Image and pixel AUROC of a model on a test split, for the benchmarks that compare fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.evaluation import metrics
from engine.evaluation.evaluate import MapsAtImageSize, MaskSequence, score_items
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S


def split_metrics(model: Any, items: Sequence[Any]) -> tuple[np.ndarray, dict[str, float]]:
    """(raw image scores of `items`, {image_auroc, pixel_auroc, test_s}) on the items' own masks."""
    labels = np.array([it.label for it in items])
    scores, maps, sizes, seconds = score_items(model, items)
    masks = MaskSequence(items, sizes, DEFAULT_READ_TIMEOUT_S)
    return scores, {"image_auroc": round(float(metrics.image_auroc(labels, scores)), 4),
                    "pixel_auroc": round(float(metrics.pixel_auroc(masks, MapsAtImageSize(maps, sizes))), 4),
                    "test_s": round(seconds, 1)}
