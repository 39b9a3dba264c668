"""Drift: does each group's score distribution still look like the fit-time normal scores?

Scores are on the normalised scale (0.5 = threshold; the median hold-out normal image sits at 0), so a
shift reads directly as "this far towards the threshold". The statistic depends on what the model
recorded:
- a sample of fit-time normal scores: two-sample Kolmogorov-Smirnov distance D between the group and
  that sample, p-value from scipy's kstwo distribution at n_eff = n*m/(n+m) (as scipy.stats.ks_2samp's
  asymptotic mode); a group is flagged when p < alpha / number of groups (Bonferroni);
- only fit-time quantiles: the largest shift of the 25/50/75% quantiles, flagged above QUANTILE_SHIFT;
- nothing: KS of each group against all other groups pooled (shows groups unlike the rest).
Group distributions come from fine histograms (report_data.HIST_BINS bins), so D is evaluated at bin
edges: it is within one bin's mass of the exact value.
Scores include the anomalies in a group: a flagged group has drifted *or* holds many anomalous images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import kstwo

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
QUANTILE_SHIFT = 0.25  # half of the way from the typical normal score (0) to the threshold (0.5)
MIN_GROUP = 5


@dataclass
class GroupDrift:
    name: str
    n: int
    quantiles: dict[float, float]
    share_above_threshold: float
    median_shift: float  # group median - reference median (normalised units; + = towards the threshold)
    statistic: float | None
    p_value: float | None
    flagged: bool


@dataclass
class DriftResult:
    statistic_name: str  # what `statistic` holds, said in words
    reference: str  # what the groups are compared with
    rule: str  # when a group is flagged
    reference_quantiles: dict[float, float] | None
    groups: list[GroupDrift]

    @property
    def flagged(self) -> list[GroupDrift]:
        return [g for g in self.groups if g.flagged]


def hist_quantiles(edges: np.ndarray, hist: np.ndarray, levels: tuple[float, ...] = QUANTILES) -> dict[float, float]:
    """Quantiles of a histogram, linear within a bin."""
    total = hist.sum()
    if total == 0:
        return {q: float("nan") for q in levels}
    cdf = np.concatenate([[0.0], np.cumsum(hist) / total])
    return {q: float(np.interp(q, cdf, edges)) for q in levels}


def _ks_p_value(d: float, n: int, m: int) -> float:
    n_eff = round(n * m / (n + m))
    return float(kstwo.sf(d, max(n_eff, 1)))


def drift(
    edges: np.ndarray,
    group_hists: np.ndarray,
    names: list[str],
    reference_sample: np.ndarray | None,
    reference_quantiles: dict[float, float] | None,
    *,
    alpha: float = 0.01,
) -> DriftResult:
    """Per-group drift statistics against the fit-time normal scores (see module docstring)."""
    upper_edges = edges[1:]
    tested = [i for i in range(len(names)) if group_hists[i].sum() >= MIN_GROUP]
    level = alpha / max(len(tested), 1)
    if reference_sample is not None and reference_sample.size:
        ref = np.sort(reference_sample)
        ref_cdf = np.searchsorted(ref, upper_edges, side="right") / ref.size
        statistic_name = "KS distance D to the fit-time normal scores"
        reference = f"fit-time normal scores of the hold-out images (n = {ref.size})"
        rule = f"two-sample KS p < {alpha:g} / {len(tested)} groups (Bonferroni)"
        ref_quantiles = {q: float(np.quantile(ref, q)) for q in QUANTILES}
    elif reference_quantiles:
        statistic_name = "largest shift of the 25/50/75% quantiles from the fit-time ones"
        reference = "fit-time normal-score quantiles recorded in the model"
        rule = f"shift > {QUANTILE_SHIFT} (normalised units; 0.5 = threshold)"
        ref_quantiles = reference_quantiles
    else:
        statistic_name = "KS distance D to all other groups pooled"
        reference = "the other groups of this scan (the model recorded no fit-time normal scores)"
        rule = f"two-sample KS p < {alpha:g} / {len(tested)} groups (Bonferroni)"
        ref_quantiles = None
    total = group_hists.sum(axis=0)
    ref_median = ref_quantiles[0.5] if ref_quantiles and 0.5 in ref_quantiles else hist_quantiles(edges, total, (0.5,))[0.5]
    threshold_bin = int(np.searchsorted(edges, 0.5, side="right") - 1)

    groups = []
    for i, name in enumerate(names):
        hist = group_hists[i]
        n = int(hist.sum())
        quantiles = hist_quantiles(edges, hist)
        share = float(hist[max(threshold_bin, 0) :].sum() / n) if n else float("nan")
        statistic = p_value = None
        flagged = False
        if i in tested:
            cdf = np.cumsum(hist) / n
            if reference_sample is not None and reference_sample.size:
                statistic = float(np.abs(cdf - ref_cdf).max())
                p_value = _ks_p_value(statistic, n, ref.size)
                flagged = p_value < level
            elif reference_quantiles:
                common = [q for q in (0.25, 0.5, 0.75) if q in reference_quantiles]
                mine = hist_quantiles(edges, hist, tuple(common))
                statistic = max(abs(mine[q] - reference_quantiles[q]) for q in common) if common else None
                flagged = statistic is not None and statistic > QUANTILE_SHIFT
            else:
                rest = total - hist
                m = int(rest.sum())
                if m >= MIN_GROUP:
                    statistic = float(np.abs(cdf - np.cumsum(rest) / m).max())
                    p_value = _ks_p_value(statistic, n, m)
                    flagged = p_value < level
        shift = quantiles[0.5] - ref_median
        groups.append(GroupDrift(name, n, quantiles, share, shift, statistic, p_value, flagged))
    return DriftResult(statistic_name, reference, rule, ref_quantiles, groups)
