"""The trained methods (STFPM, feature AE): accuracy, training record and scan speed on the shared data.

    nice -n 10 python benchmarks/trained_accuracy.py [--data ../shared/data] [--only bottle:stfpm pcb:feature_ae ...]
                                                     [--threads 1] [--out NAME.json] [--set KEY=VALUE ...]

For each (category, method): `fit` with the method's defaults (whole image at 256 px; --set overrides
config keys), `evaluate` the test split (image / pixel AUROC, AUPRO at the masks' resolution), then a
one-process CPU scan of the test split (end to end, model load included). Each row keeps the training
record (epochs, per-epoch train / hold-out loss and seconds, best epoch, stop reason), the torch thread
count and the 1-minute load average before and after (the 2 cores are shared: times are upper bounds).
Categories: bottle (MVTec, 256 px files), pcb (DeepPCB, 256 px files), pcb640 (DeepPCB, native 640 px).
Writes benchmarks/results/trained_accuracy_cpu.json (or --out), one row per point, as each finishes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402

ROOTS = {"bottle": ("mvtec_bottle", "bottle"), "pcb": ("deeppcb", "pcb"), "pcb640": ("deeppcb_640", "pcb")}
DEFAULT_POINTS = [f"{c}:{m}" for c in ("bottle", "pcb", "pcb640") for m in ("stfpm", "feature_ae")]


def run_point(data: Path, name: str, method: str, work: Path, extra: dict) -> dict:
    from engine.api import fit, scan
    from engine.config import load_config
    from engine.evaluation.evaluate import evaluate
    from engine.inputs.datasets import train_images

    folder, category = ROOTS[name]
    root = data / folder
    cfg = load_config(overrides={"device": "cpu", "method": method, **extra})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = fit(train_images(root, category), cfg)
    fit_s = time.perf_counter() - t0
    load_fit = os.getloadavg()[0]
    result = evaluate(model, root, category)
    model_dir = work / f"{name}_{method}"
    model.save(model_dir)
    out = work / f"scan_{name}_{method}"
    t1 = time.perf_counter()
    scanned = scan(model_dir, str(root / category / "test"), out, device="cpu")
    scan_s = time.perf_counter() - t1
    shutil.rmtree(out, ignore_errors=True)
    stats = model.fit_stats
    rec = stats["training"]
    row = {
        "category": name,
        "method": method,
        "input_size": model.input_size,
        "precision": model.cfg.precision,
        "overrides": extra,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "f1_max": result["f1_max"],
        "fit_s": round(fit_s, 1),
        "seconds_features": stats.get("seconds_features"),
        "seconds_training": stats.get("seconds_training"),
        "epochs": rec["epochs"],
        "best_epoch": rec["best_epoch"],
        "stop_reason": rec["stop_reason"],
        "seconds_per_epoch": rec["seconds"],
        "train_loss": rec["train_loss"],
        "holdout_loss": rec["holdout_loss"],
        "train_images": rec["train_images"],
        "holdout_images": rec["holdout_images"],
        "threshold_certifies": model.calibration.certified_rate if model.calibration else None,
        "eval_img_s": result.get("images_per_second"),
        "scan_img_s": round(scanned.total / scan_s, 2),
        "scan_images": scanned.total,
        "scan_stage_seconds": scanned.times.as_dict(),
        "per_defect": result["per_defect"],
        "latent_dim": stats.get("latent_dim"),
        "load_average_1min": {"before": round(load_before, 2), "after_fit": round(load_fit, 2),
                              "end": round(os.getloadavg()[0], 2)},
    }
    print({k: v for k, v in row.items() if k not in ("per_defect", "scan_stage_seconds", "train_loss",
                                                     "holdout_loss", "seconds_per_epoch")}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=DEFAULT_POINTS, metavar="CATEGORY:METHOD")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shared machine: 1)")
    parser.add_argument("--out", default="trained_accuracy_cpu.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vade_trained_") as tmp:
        for item in args.only:
            name, method = item.split(":")
            rows.append(run_point(Path(args.data), name, method, Path(tmp), extra))
            write_result(args.out, {"results": rows})
    print(Path(__file__).resolve().parent / "results" / args.out)


if __name__ == "__main__":
    main()
