"""Accuracy and fit time of the default models on the real data, next to the peer's numbers.

    python benchmarks/fit_accuracy.py [--data ../shared/data] [--only bottle:patchcore ...]

For each (category, method): fit with the defaults (hold-out calibration included), `evaluate` on the
test split, and for PatchCore the covering radius of the greedy coreset next to that of a random subset
of the same size (both in the projected space the selection works in). Writes
benchmarks/results/fit_accuracy_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from engine.api import fit, iter_image_batches, split_holdout  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.evaluation.evaluate import evaluate  # noqa: E402
from engine.features.embeddings import to_rows  # noqa: E402
from engine.inputs.datasets import train_images  # noqa: E402
from engine.models.patchcore import project_for_coreset  # noqa: E402
from kernels import knn  # noqa: E402

# anomalib 2.7.0, same Lite0 weights, 256 px, this machine kind (issue 2): PatchCore at 1% coreset.
PEER = {
    ("bottle", "patchcore"): {"image_auroc": 1.000, "pixel_auroc": 0.983, "aupro": 0.933, "fit_s": 184, "test_img_s": 14.5},
    ("bottle", "padim"): {"image_auroc": 0.998, "pixel_auroc": 0.980, "aupro": 0.922, "fit_s": 27, "test_img_s": 13.4},
    ("pcb", "patchcore"): {"image_auroc": 0.705, "pixel_auroc": 0.823, "aupro": 0.518, "fit_s": 692, "test_img_s": 14.0},
    ("pcb", "padim"): {"image_auroc": 0.660, "pixel_auroc": 0.889, "aupro": 0.640, "fit_s": 59, "test_img_s": 14.1},
}
ROOTS = {"bottle": "mvtec_bottle", "pcb": "deeppcb"}


def random_subset_radius(model, images: list[Path], seed: int) -> float:
    """Covering radius of a random subset the size of the bank, in the same projected space."""
    train, _ = split_holdout(images, model.cfg.holdout_fraction, model.cfg.seed)
    rows = [to_rows(model._embed(model.features(b))) for b in iter_image_batches(train, model.input_size, 16, [])]
    projected, _ = project_for_coreset(torch.cat(rows), model.cfg.projection_dim, model.cfg.seed)
    gen = torch.Generator().manual_seed(seed)
    subset = projected[torch.randperm(projected.shape[0], generator=gen)[: model.meta["bank_size"]]]
    norms = knn.sq_norms(subset)
    worst = 0.0
    for i in range(0, projected.shape[0], 8192):
        d, _ = knn.topk(projected[i : i + 8192], subset, 1, bank_sq_norms=norms)
        worst = max(worst, float(d.max()))
    return worst


def run_one(data: Path, category: str, method: str) -> dict:
    root = data / ROOTS[category]
    images = train_images(root, category)
    t0 = time.perf_counter()
    model = fit(images, load_config(overrides={"method": method, "device": "cpu"}))
    fit_s = time.perf_counter() - t0
    result = evaluate(model, root, category)
    row = {
        "category": category,
        "method": method,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "f1_max": result["f1_max"],
        "fit_s": round(fit_s, 1),
        "fit_stats": {k: v for k, v in model.fit_stats.items() if k != "skipped"},
        "test_img_s": result.get("images_per_second"),
        "per_defect": result["per_defect"],
        "peer": PEER[(category, method)],
    }
    if method == "patchcore":
        row["covering_radius_random_subset"] = random_subset_radius(model, images, seed=0)
    print({k: v for k, v in row.items() if k not in ("per_defect", "peer")}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=[f"{c}:{m}" for c, m in PEER])
    args = parser.parse_args()
    rows = [run_one(Path(args.data), *item.split(":")) for item in args.only]
    print(write_result("fit_accuracy_cpu.json", {"results": rows}))


if __name__ == "__main__":
    main()
