"""`vade update` against a fit on all images: fit on half of the training images, update with the rest.

    python benchmarks/update_bank.py [--data ../shared/data] [--only bottle pcb] [--threads N]

Per category, at the defaults but `calibration: loo` (every image in the bank, so the banks compare
like for like; results/update_bank.json was measured at commit 01dec65, whose leave-one-out was
`repair`, within a few scores of today's `exclude`): (1) fit on a seeded half of train/good; (2) `engine.lifecycle.update`
with the other half; (3) fit on all of them. For each: bank size, covering radius (projected, as the
coreset measures it), image AUROC on the test split and wall time; and the second-half images that the
half model flagged (scored above its threshold, unseen), with their scores under the updated model.
Writes benchmarks/results/update_bank.json (merging categories already there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from benchmarks._metrics import split_metrics  # noqa: E402
from engine.api import _raw_scores, fit  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.inputs.datasets import test_items, train_images  # noqa: E402
from engine.lifecycle import update  # noqa: E402

ROOTS = {"bottle": ("mvtec_bottle", "bottle"), "pcb": ("deeppcb", "pcb")}
OUT = Path(__file__).resolve().parent / "results" / "update_bank.json"


def summary(model, items, seconds: float) -> dict:
    _, quality = split_metrics(model, items)
    return {"seconds": round(seconds, 1), "bank_size": model.fit_stats["bank_size"],
            "covering_radius_projected": model.fit_stats.get("coreset_covering_radius_projected"),
            **quality, "threshold": model.threshold,
            "calibration": {"source": model.calibration.source, "n": model.calibration.n,
                            "certified_rate": model.calibration.certified_rate}}


def run(root: Path, category: str, work: Path) -> dict:
    train = train_images(root, category)
    order = list(train)
    random.Random(0).shuffle(order)
    first, second = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])
    items = test_items(root, category)
    cfg = load_config(overrides={"device": "cpu", "calibration": "loo"})
    say = lambda m: print(f"  [{category}] {m}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    half = fit(first, cfg, progress=say)
    t_half = time.perf_counter() - t0
    half.save(work / "half")
    unseen = _raw_scores(half, second, [], 30.0)
    flagged = [i for i, s in enumerate(unseen) if s >= half.threshold]
    (work / "second.txt").write_text("\n".join(str(p) for p in second) + "\n")
    t0 = time.perf_counter()
    updated, _, info = update(work / "half", work / "second.txt", out=work / "updated", device="cpu")
    t_update = time.perf_counter() - t0
    after = _raw_scores(updated, [second[i] for i in flagged], [], 30.0)
    t0 = time.perf_counter()
    full = fit(train, cfg, progress=say)
    t_full = time.perf_counter() - t0
    out = {"train_images": len(train), "half_images": len(first), "update_images": len(second),
           "half": summary(half, items, t_half), "updated": summary(updated, items, t_update),
           "full": summary(full, items, t_full), "update": info,
           "flagged_by_half": {"count": len(flagged), "of": len(second),
                               "scores_half": [round(float(unseen[i]), 4) for i in flagged],
                               "scores_updated": [round(float(s), 4) for s in after],
                               "now_below_threshold": int(sum(s < updated.threshold for s in after))}}
    print(json.dumps({category: out}, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=list(ROOTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = json.loads(OUT.read_text()).get("categories", {}) if OUT.is_file() else {}
    for cat in args.only:
        folder, category = ROOTS[cat]
        with tempfile.TemporaryDirectory() as work:
            old[cat] = run(Path(args.data) / folder, category, Path(work))
        write_result(OUT.name, {"categories": old})


if __name__ == "__main__":
    main()
