"""`vade fit DATA --out MODEL_DIR`: fit a model on normal images (engine.api.fit)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import positive_seconds, say
from engine.config import LOO_METHODS, load_config
from engine.errors import VadeError
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a model on normal images", description="Fit PatchCore, PaDiM, STFPM or a feature autoencoder on normal images.")
    p.add_argument("data", help="MVTec-layout root (uses CATEGORY/train/good) or a folder of normal images")
    p.add_argument("--out", required=True, help="model directory to write (model.safetensors + model.json)")
    p.add_argument("--category", help="MVTec category under DATA")
    p.add_argument("--config", help="YAML preset, e.g. configs/patchcore_lite0.yaml")
    p.add_argument("--method", choices=["patchcore", "padim", "stfpm", "feature_ae"])
    p.add_argument("--backbone", help="efficientnet_lite0 (default) or wide_resnet50_2")
    p.add_argument("--weights", help="backbone weights file (.pth / .safetensors); required for wide_resnet50_2")
    p.add_argument("--layers", help="comma-separated backbone layers, e.g. blocks.2,blocks.4")
    p.add_argument("--input-size", type=int, dest="input_size", help="whole-image models: the square input side")
    p.add_argument("--tile-size", type=int, dest="tile_size",
                   help="model input side per tile; 0 = whole image squashed to --input-size (default: the method's)")
    p.add_argument("--tile-overlap", type=float, dest="tile_overlap", help="overlap of neighbouring tiles, fraction of a tile")
    p.add_argument("--image-scale", type=float, dest="image_scale",
                   help="resize factor before tiling; 1 = native, 0 = the short side to the tile size (default)")
    p.add_argument("--map-size", type=int, dest="map_size", help="tiled models: long side of stored maps at most")
    p.add_argument("--coreset-ratio", type=float, dest="coreset_ratio")
    p.add_argument("--calibration", choices=["auto", "loo", "holdout", "both"],
                   help="threshold from leave-one-out scores of training images (auto for padim: every image in "
                        "the model), a held-out --holdout-fraction (auto for the trained stfpm / feature_ae), or "
                        "both pooled (auto for patchcore)")
    p.add_argument("--max-epochs", type=int, dest="max_epochs", help="trained methods: epochs at most")
    p.add_argument("--patience", type=int, help="trained methods: stop after this many epochs without hold-out progress")
    p.add_argument("--learning-rate", type=float, dest="learning_rate", help="trained methods: Adam's learning rate")
    p.add_argument("--loo-images", type=int, dest="loo_images",
                   help="training images scored leave-one-out (a seeded subset; 0 = all; default 100)")
    p.add_argument("--loo-method", choices=list(LOO_METHODS), dest="loo_method",
                   help="patchcore: how its leave-one-out scores are made (default exclude; see README)")
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
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS", dest="read_timeout",
                   help=f"an image whose read takes longer is skipped (default {DEFAULT_READ_TIMEOUT_S:g})")
    p.set_defaults(func=run_fit)


FIT_KEYS = ("method", "backbone", "weights", "layers", "input_size", "tile_size", "tile_overlap", "image_scale",
            "map_size", "coreset_ratio", "calibration", "loo_images", "loo_method", "holdout_fraction",
            "target_false_alarm_rate", "seed", "batch_size", "device", "precision", "layer_balance", "max_epochs",
            "patience", "learning_rate")


def run_fit(args: argparse.Namespace) -> int:
    from engine.api import fit
    from engine.inputs.datasets import train_images

    out = Path(args.out)
    if (out / "model.json").exists() and not args.force:
        raise VadeError(f"{out} already holds a model; pass --force to overwrite it or choose another --out")
    cfg = load_config(args.config, {k: getattr(args, k) for k in FIT_KEYS})
    images = train_images(Path(args.data), args.category)
    model = fit(images, cfg, progress=say, read_timeout=positive_seconds(args.read_timeout))
    model.save(out)
    stats = model.fit_stats
    if "training" in stats:
        rec = stats["training"]
        say(f"wrote {out}/model.safetensors and model.json ({model.method}, {rec['epochs']} epochs in "
            f"{rec['seconds_total']:.1f} s, best {rec['best_epoch']}: {rec['stop_reason']}; "
            f"threshold {model.threshold:.4g})")
        return 0
    say(f"wrote {out}/model.safetensors and model.json ({model.method}, bank/positions "
         f"{model.meta.get('bank_size') or model.meta.get('positions')}, threshold {model.threshold:.4g}; "
         f"features {stats.get('seconds_features', 0):.1f} s, coreset {stats.get('seconds_coreset', 0):.1f} s)")
    return 0
