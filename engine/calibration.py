"""Threshold and score normalisation, fitted on held-out normal images (never on the test set).

threshold: the (1 - target_false_alarm_rate) quantile of the hold-out images' raw scores.
normalised(x) = 0.5 + 0.5 * (x - threshold) / (threshold - centre), centre = median hold-out score:
the typical normal image maps to 0, the threshold to 0.5. Monotonic and unclipped, so rankings
(and AUROC) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Calibration:
    threshold: float
    centre: float
    source: str  # "holdout" or "train" (no hold-out images: optimistic, recorded so users know)
    normal_scores: tuple[float, ...]  # raw hold-out scores, kept for drift checks

    @property
    def scale(self) -> float:
        spread = self.threshold - self.centre
        return spread if spread > 1e-12 else max(abs(self.threshold) * 1e-6, 1e-12)

    def normalize(self, raw: torch.Tensor | np.ndarray | float):
        return 0.5 + 0.5 * (raw - self.threshold) / self.scale

    def to_dict(self) -> dict:
        normal = np.asarray(self.normal_scores, dtype=np.float64)
        quantiles = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
        return {
            "threshold": self.threshold,
            "centre": self.centre,
            "source": self.source,
            "normal_scores": [float(s) for s in normal],
            "normal_scores_normalized": [float(s) for s in self.normalize(normal)],
            "normal_score_quantiles": {str(q): float(self.normalize(np.quantile(normal, q))) for q in quantiles},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            float(data["threshold"]), float(data["centre"]), str(data["source"]), tuple(data["normal_scores"])
        )


def calibrate(normal_scores: np.ndarray, target_false_alarm_rate: float, source: str) -> Calibration:
    """Threshold that flags about `target_false_alarm_rate` of normal images, from their raw scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    threshold = float(np.quantile(scores, 1.0 - target_false_alarm_rate))
    return Calibration(threshold, float(np.median(scores)), source, tuple(float(s) for s in scores))
