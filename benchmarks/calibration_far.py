"""Realised false-alarm rate of the threshold on unseen normal images (each category's test/good).

    python benchmarks/calibration_far.py [--data ../shared/data] [--only bottle pcb]
        [--modes holdout exclude fold both] [--threads N]

Per category and calibration mode, one fit at the defaults otherwise:
  holdout  a seeded 10% of the images kept out of the bank, their scores calibrate (the first landing);
  exclude  every image in the bank, `loo_images` of them scored without their own bank rows
           (`calibration: loo`, `loo_method: exclude`);
  fold     every image in the bank, `loo_images` of them (at most half) fitted last and scored
           against the bank without them (`loo_method: fold`);
  both     the 10% hold-out pooled with the leave-one-out scores of `loo_images` of the others (the
           PatchCore default).
(The results file also holds "repair" entries, a third leave-one-out method measured at commit 01dec65
and dropped: it changed 4 of 100 bottle scores and no pcb count.)
For targets 1/5/10% the conformal threshold is taken from the mode's normal scores, and the share of
test/good images above it is reported with a Clopper-Pearson 95% interval, next to the image / pixel
AUROC of each fit and its times. Writes benchmarks/results/calibration_far.json (merging what is there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from benchmarks._metrics import split_metrics  # noqa: E402
from engine.api import fit  # noqa: E402
from engine.calibration import calibrate, clopper_pearson  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.inputs.datasets import test_items, train_images  # noqa: E402

ROOTS = {"bottle": ("mvtec_bottle", "bottle"), "pcb": ("deeppcb", "pcb")}
TARGETS = (0.01, 0.05, 0.10)
OUT = Path(__file__).resolve().parent / "results" / "calibration_far.json"


def rates(normal: np.ndarray, good: np.ndarray) -> list[dict]:
    rows = []
    for target in TARGETS:
        cal = calibrate(normal, target, "x")
        flagged = int((good >= cal.threshold).sum())  # is_anomalous: score >= threshold
        lo, hi = clopper_pearson(flagged, good.size)
        rows.append({"target": target, "n": cal.n, "rank": cal.rank, "certified_rate": round(cal.certified_rate, 5),
                     "sufficient": cal.sufficient, "flagged": flagged, "of": int(good.size),
                     "realised_rate": round(flagged / good.size, 4), "ci95": [round(lo, 4), round(hi, 4)],
                     "target_in_ci": lo <= target <= hi})
    return rows


def exchangeability(normal: np.ndarray, good: np.ndarray) -> dict:
    """How the calibration scores compare with the test/good ones: quantiles, two-sample KS and
    Mann-Whitney p-values (exchangeable scores: both uniform), and the share of test/good scores above
    the calibration median (0.5 when exchangeable)."""
    from scipy.stats import ks_2samp, mannwhitneyu

    qs = (0.5, 0.9, 0.95, 0.99)
    return {"calibration_quantiles": {str(q): round(float(np.quantile(normal, q)), 4) for q in qs},
            "test_good_quantiles": {str(q): round(float(np.quantile(good, q)), 4) for q in qs},
            "ks_pvalue": round(float(ks_2samp(normal, good).pvalue), 6),
            "mannwhitney_pvalue": round(float(mannwhitneyu(normal, good).pvalue), 6),
            "test_good_above_calibration_median": round(float((good > np.median(normal)).mean()), 4)}


MODES = {
    "holdout": {"calibration": "holdout"},
    "exclude": {"calibration": "loo", "loo_method": "exclude"},
    "fold": {"calibration": "loo", "loo_method": "fold"},
    "both": {"calibration": "both"},
}


def run(root: Path, category: str, modes: list[str]) -> dict:
    train = train_images(root, category)
    items = test_items(root, category)
    labels = np.array([it.label for it in items])
    out: dict = {"train_images": len(train), "test_good": int((labels == 0).sum()), "test_defective": int(labels.sum())}
    for name in modes:
        cfg = load_config(overrides={"device": "cpu", **MODES[name]})
        t0 = time.perf_counter()
        model = fit(train, cfg, progress=lambda m: print(f"  [{category} {name}] {m}", flush=True))
        fit_s = time.perf_counter() - t0
        scores, quality = split_metrics(model, items)
        good = scores[labels == 0].astype(np.float64)
        normal = np.asarray(model.calibration.normal_scores)
        stats = model.fit_stats
        entry = {"fit_s": round(fit_s, 1), "seconds_coreset": stats.get("seconds_coreset"),
                 "seconds_calibration": stats["seconds_calibration"], **quality,
                 "bank_size": stats["bank_size"], "calibration_source": model.calibration.source,
                 "calibration_fold_rows": stats.get("calibration_fold_rows"),
                 "bank_images": stats["train_images"], "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "far": {}}
        entry["far"][model.calibration.source] = rates(normal, good)
        entry["exchangeability"] = exchangeability(normal, good)
        entry["scores"] = {"calibration": [round(float(x), 5) for x in normal], "test_good": [round(float(x), 5) for x in good]}
        if name == "both":  # the two parts of the pool alone
            n_oos = stats["loo_images"]
            entry["far"]["holdout_part"] = rates(normal[n_oos:], good)
            entry["far"]["loo_part"] = rates(normal[:n_oos], good)
        out[name] = entry
        print(json.dumps({category: {name: entry}}, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=list(ROOTS))
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = json.loads(OUT.read_text()).get("categories", {}) if OUT.is_file() else {}
    for entries in old.values():  # runs of the code before the modes (a quantile-era "loo", two banks)
        for stale in ("bank_90pct", "bank_all", "loo"):
            entries.pop(stale, None)
    for cat in args.only:
        folder, category = ROOTS[cat]
        old[cat] = {**old.get(cat, {}), **run(Path(args.data) / folder, category, args.modes)}
        write_result(OUT.name, {"categories": old, "targets": list(TARGETS)})


if __name__ == "__main__":
    main()
