"""Patch density sweep: accuracy, fit time and scan speed of PatchCore at several tile sizes.

    python benchmarks/resolution_sweep.py [--data ../shared/data] [--only pcb:512 bottle:256 ...]
                                          [--squash] [--out NAME.json] [--keep DIR] [--set KEY=VALUE ...]

For each (category, side): fit PatchCore with the defaults but tile_size = side (the image's short
side scaled to it, so these square images are one tile of side x side; --squash: tile_size 0 and
input_size = side, the whole-image path), `evaluate` the test split (pixel metrics at the masks' own
resolution), and time a one-process CPU scan of the test split (end to end, model load included).
Categories: bottle (MVTec, 256 px files), pcb (DeepPCB, 256 px files), pcb640 (DeepPCB, native 640 px).
Writes benchmarks/results/resolution_sweep_cpu.json (or --out), one row per point, as each finishes.
--keep DIR keeps each point's model and scan (DIR/NAME_SIDE, DIR/scan_NAME_SIDE) for later study
(benchmarks/multiscale.py combines two points' scans). --set overrides config keys at every point
(e.g. coreset_candidates=0: the exact greedy over all training patches); they are recorded per row.
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
from engine.api import fit, scan  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.evaluation.evaluate import evaluate  # noqa: E402
from engine.inputs.datasets import train_images  # noqa: E402

ROOTS = {"bottle": ("mvtec_bottle", "bottle"), "pcb": ("deeppcb", "pcb"), "pcb640": ("deeppcb_640", "pcb")}
DEFAULT_POINTS = [f"{c}:{s}" for c in ("bottle", "pcb", "pcb640") for s in (256, 384, 512, 640)]


def run_point(data: Path, name: str, side: int, squash: bool, work: Path, keep: bool, extra: dict) -> dict:
    folder, category = ROOTS[name]
    root = data / folder
    overrides = {"device": "cpu", "tile_size": 0, "input_size": side} if squash else {"device": "cpu", "tile_size": side}
    cfg = load_config(overrides={**overrides, **extra})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = fit(train_images(root, category), cfg)
    fit_s = time.perf_counter() - t0
    result = evaluate(model, root, category)
    model_dir = work / f"{name}_{side}"
    model.save(model_dir)
    out = work / f"scan_{name}_{side}"
    t1 = time.perf_counter()
    scanned = scan(model_dir, str(root / category / "test"), out, device="cpu")
    scan_s = time.perf_counter() - t1
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    stats = {k: v for k, v in model.fit_stats.items() if k != "skipped"}
    row = {
        "category": name,
        "side": side,
        "mode": "squash" if squash else "tiled",
        "overrides": extra,
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "f1_max": result["f1_max"],
        "fit_s": round(fit_s, 1),
        "seconds_features": stats.get("seconds_features"),
        "seconds_coreset": stats.get("seconds_coreset"),
        "bank_size": model.meta.get("bank_size"),
        "coreset_ratio": model.cfg.coreset_ratio,
        "training_patches": stats.get("training_patches"),
        "eval_img_s": result.get("images_per_second"),
        "scan_img_s": round(scanned.total / scan_s, 2),
        "scan_images": scanned.total,
        "scan_stage_seconds": scanned.times.as_dict(),
        "per_defect": result["per_defect"],
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print({k: v for k, v in row.items() if k not in ("per_defect", "scan_stage_seconds")}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=DEFAULT_POINTS)
    parser.add_argument("--squash", action="store_true", help="whole-image models at input_size = side")
    parser.add_argument("--out", default="resolution_sweep_cpu.json")
    parser.add_argument("--keep", help="folder that keeps every point's model and scan")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vade_sweep_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for item in args.only:
            name, side = item.split(":")
            rows.append(run_point(Path(args.data), name, int(side), args.squash, work, bool(args.keep), extra))
            write_result(args.out, {"results": rows})
    print(Path(__file__).resolve().parent / "results" / args.out)


if __name__ == "__main__":
    main()
