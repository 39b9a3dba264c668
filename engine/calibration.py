"""Threshold and score normalisation from normal images' raw scores, with a stated guarantee.

Conformal order statistic: for n normal scores exchangeable with a future normal image's, the
threshold t = the r-th smallest, r = ceil((n + 1)(1 - a)), flags a future normal image with
probability (n + 1 - r) / (n + 1) <= a (exactly that for continuous scores, in expectation over the
calibration draw). n is too small for a when r > n (n < 1/a - 1: 99 images certify 1%); then
t = the largest score and the certified rate is 1 / (n + 1), the best n can promise: recorded as
`certified_rate` with `sufficient = False`, and said by `vade fit`, model.json and the report.

normalised(x) = 0.5 + 0.5 * (x - threshold) / (threshold - centre), centre = median normal score:
the typical normal image maps to 0, the threshold to 0.5. Monotonic and unclipped, so rankings
(and AUROC) are unchanged.

source: "loo" (training images scored leave-one-out), "fold" (PatchCore: a calibration fold fitted
last, scored against the bank without it), "holdout" (images kept out of the fit), "loo+holdout" or
"fold+holdout" (both, pooled), "calibrate" (`vade calibrate`'s images), "train" (in-sample, files of
older files without a hold-out: optimistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def conformal_rank(n: int, target: float) -> int:
    """r = ceil((n + 1)(1 - target)), the order statistic that certifies `target`; may exceed n."""
    # A relative nudge so that (n + 1)(1 - a) landing on an integer is not rounded up by float error.
    return max(1, math.ceil((n + 1) * (1.0 - target) - 1e-9))


def certifiable_rate(n: int) -> float:
    """The smallest false-alarm rate that n exchangeable normal scores can certify: 1 / (n + 1)."""
    return 1.0 / (n + 1)


@dataclass(frozen=True)
class Calibration:
    threshold: float
    centre: float
    source: str
    normal_scores: tuple[float, ...]  # raw calibration scores, kept for drift checks
    target_rate: float | None = None  # the requested false-alarm rate (None: files from before conformal thresholds)
    rank: int = 0  # the threshold is the rank-th smallest normal score (0: a quantile, files from before conformal thresholds)

    @property
    def n(self) -> int:
        return len(self.normal_scores)

    @property
    def certified_rate(self) -> float | None:
        """Guaranteed expected false-alarm rate on exchangeable normal images (None: no guarantee)."""
        if not self.rank:
            return None
        return (self.n + 1 - self.rank) / (self.n + 1)

    @property
    def sufficient(self) -> bool:
        """Whether n certifies the requested rate."""
        rate = self.certified_rate
        return rate is not None and self.target_rate is not None and rate <= self.target_rate + 1e-12

    def statement(self) -> str:
        """One line on what the threshold promises."""
        rate = self.certified_rate
        if rate is None:
            return f"threshold from a quantile of {self.n} {self.source} scores (no certified rate; recalibrate)"
        target = f"{self.target_rate:.2%}" if self.target_rate is not None else "?"
        if self.sufficient:
            return (f"threshold certifies an expected false-alarm rate <= {rate:.2%} (target {target}) "
                    f"from {self.n} {self.source} normal scores")
        need = max(1, math.ceil(1.0 / self.target_rate - 1)) if self.target_rate else 0
        return (f"only {self.n} {self.source} normal scores: they cannot certify the target {target}; the threshold "
                f"is their maximum, certifying {rate:.2%} (need >= {need} images for {target})")

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
            "n": self.n,
            "target_rate": self.target_rate,
            "rank": self.rank,
            "certified_rate": self.certified_rate,
            "sufficient": self.sufficient,
            "statement": self.statement(),
            "normal_scores": [float(s) for s in normal],
            "normal_scores_normalized": [float(s) for s in self.normalize(normal)],
            "normal_score_quantiles": {str(q): float(self.normalize(np.quantile(normal, q))) for q in quantiles},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        target = data.get("target_rate")
        return cls(
            float(data["threshold"]), float(data["centre"]), str(data["source"]), tuple(data["normal_scores"]),
            None if target is None else float(target), int(data.get("rank", 0)),
        )


def calibrate(normal_scores: np.ndarray, target_false_alarm_rate: float, source: str) -> Calibration:
    """The conformal threshold for `target_false_alarm_rate` from normal images' raw scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no normal scores to calibrate on")
    if not np.isfinite(scores).all():
        raise ValueError("normal scores include NaN or infinite values")
    n = int(scores.size)
    rank = min(conformal_rank(n, target_false_alarm_rate), n)
    threshold = float(np.sort(scores)[rank - 1])
    return Calibration(threshold, float(np.median(scores)), source, tuple(float(s) for s in scores),
                       float(target_false_alarm_rate), rank)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for a rate of k events in n trials."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi
