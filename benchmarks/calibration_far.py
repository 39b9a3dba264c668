"""Realised false-alarm rate of the threshold on unseen normal images (each category's test/good).

    nice -n 10 python benchmarks/calibration_far.py [--data ../shared/data] [--only bottle pcb]

Per category, two fits at the defaults: (A) `calibration: both` — a seeded 10% hold-out kept out
of the bank, the rest in it; its hold-out scores give the old calibration ("holdout"), its leave-one-out
scores of up to `loo_images` training images plus the hold-out give "both"; (B) `calibration: loo` —
every image in the bank, leave-one-out scores of `loo_images` of them. For targets 1/5/10% the conformal
threshold is taken from each set of normal scores, and the share of test/good images above it is
reported with a Clopper-Pearson 95% interval, next to the image AUROC of each bank and fit times.
Writes benchmarks/results/calibration_far.json (merging categories already there).
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
from engine.api import fit  # noqa: E402
from engine.calibration import calibrate, clopper_pearson  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.evaluation import metrics  # noqa: E402
from engine.evaluation.evaluate import score_items  # noqa: E402
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


def run(root: Path, category: str) -> dict:
    train = train_images(root, category)
    items = test_items(root, category)
    labels = np.array([it.label for it in items])
    out: dict = {"train_images": len(train), "test_good": int((labels == 0).sum()), "test_defective": int(labels.sum())}
    for name, overrides in (("bank_90pct", {"calibration": "both"}), ("bank_all", {"calibration": "loo"})):
        cfg = load_config(overrides={"device": "cpu", **overrides})
        t0 = time.perf_counter()
        model = fit(train, cfg, progress=lambda m: print(f"  [{category} {name}] {m}", flush=True))
        fit_s = time.perf_counter() - t0
        scores, _, _, test_s = score_items(model, items)
        good = scores[labels == 0].astype(np.float64)
        normal = np.asarray(model.calibration.normal_scores)
        n_loo = model.fit_stats["loo_images"]
        entry = {"fit_s": round(fit_s, 1), "seconds_calibration": model.fit_stats["seconds_calibration"],
                 "test_s": round(test_s, 1), "bank_size": model.fit_stats["bank_size"],
                 "image_auroc": round(float(metrics.image_auroc(labels, scores)), 4), "far": {}}
        if name == "bank_90pct":
            entry["far"]["holdout"] = rates(normal[n_loo:], good)
            entry["far"]["both"] = rates(normal, good)
            entry["far"]["loo_only_90pct_bank"] = rates(normal[:n_loo], good)
        else:
            entry["far"]["loo"] = rates(normal, good)
        out[name] = entry
        print(json.dumps({category: {name: entry}}, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=list(ROOTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = json.loads(OUT.read_text()).get("categories", {}) if OUT.is_file() else {}
    for cat in args.only:
        folder, category = ROOTS[cat]
        old[cat] = run(Path(args.data) / folder, category)
        write_result(OUT.name, {"categories": old, "targets": list(TARGETS)})


if __name__ == "__main__":
    main()
