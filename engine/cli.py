"""Command line: a thin layer over the API.

    vade fit DATA --out MODEL_DIR [--category C] [--method patchcore|padim] [--backbone NAME] [--config FILE]
    vade scan MODEL_DIR SOURCE --out OUT_DIR [--resume] [--workers N | --scheduler ADDRESS] [--device cpu|cuda]
    vade eval MODEL_DIR DATA [--category C] [--json FILE]
    vade report OUT_DIR
    vade demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine import __version__, cli_report, cli_scan
from engine.errors import VadeError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a model on normal images", description="Fit PatchCore or PaDiM on normal images.")
    p.add_argument("data", help="MVTec-layout root (uses CATEGORY/train/good) or a folder of normal images")
    p.add_argument("--out", required=True, help="model directory to write (model.safetensors + model.json)")
    p.add_argument("--category", help="MVTec category under DATA")
    p.add_argument("--config", help="YAML preset, e.g. configs/patchcore_lite0.yaml")
    p.add_argument("--method", choices=["patchcore", "padim"])
    p.add_argument("--backbone", help="efficientnet_lite0 (default) or wide_resnet50_2")
    p.add_argument("--weights", help="backbone weights file (.pth / .safetensors); required for wide_resnet50_2")
    p.add_argument("--layers", help="comma-separated backbone layers, e.g. blocks.2,blocks.4")
    p.add_argument("--input-size", type=int, dest="input_size")
    p.add_argument("--coreset-ratio", type=float, dest="coreset_ratio")
    p.add_argument("--holdout-fraction", type=float, dest="holdout_fraction")
    p.add_argument("--target-far", type=float, dest="target_false_alarm_rate", help="target false-alarm rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="backbone arithmetic; auto = bf16 where the hardware has it natively (recorded in the model)")
    p.add_argument("--layer-balance", choices=["nearest", "variance", "none"], dest="layer_balance",
                   help="PatchCore per-layer weights (default nearest: equal shares of the nearest-entry residuals)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model directory")
    p.set_defaults(func=run_fit)


FIT_KEYS = ("method", "backbone", "weights", "layers", "input_size", "coreset_ratio", "holdout_fraction",
            "target_false_alarm_rate", "seed", "batch_size", "device", "precision", "layer_balance")


def run_fit(args: argparse.Namespace) -> int:
    from engine.api import fit
    from engine.config import load_config
    from engine.datasets import train_images

    out = Path(args.out)
    if (out / "model.json").exists() and not args.force:
        raise VadeError(f"{out} already holds a model; pass --force to overwrite it or choose another --out")
    cfg = load_config(args.config, {k: getattr(args, k) for k in FIT_KEYS})
    images = train_images(Path(args.data), args.category)
    model = fit(images, cfg, progress=_say)
    model.save(out)
    stats = model.fit_stats
    _say(f"wrote {out}/model.safetensors and model.json ({model.method}, bank/positions "
         f"{model.meta.get('bank_size') or model.meta.get('positions')}, threshold {model.threshold:.4g}; "
         f"features {stats.get('seconds_features', 0):.1f} s, coreset {stats.get('seconds_coreset', 0):.1f} s)")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on an MVTec-layout test split")
    p.add_argument("model_dir")
    p.add_argument("data", help="MVTec-layout root or category folder")
    p.add_argument("--category")
    p.add_argument("--json", dest="json_path", help="write the metrics as JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from engine.artifact import load_model
    from engine.evaluate import evaluate, format_table

    model = load_model(args.model_dir, device=args.device)
    result = evaluate(model, Path(args.data), args.category, batch_size=args.batch_size)
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {args.json_path}")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fit, scan and evaluate on a small built-in dataset")
    p.add_argument("--out", default="vade-demo", help="folder for the demo data, model and outputs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo as demo

    return demo(Path(args.out), device=args.device, say=_say)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vade", description="Visual anomaly detection engine")
    parser.add_argument("--version", action="version", version=f"vade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_fit(sub)
    cli_scan.register(sub)
    add_eval(sub)
    cli_report.register(sub)
    add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        code = int(args.func(args) or 0)
    except VadeError as exc:
        _say(f"vade {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say(f"vade {args.command}: interrupted")
        return 130
    if args.command != "scan":
        _say(f"vade {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
