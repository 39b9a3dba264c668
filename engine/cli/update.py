"""`vade update MODEL_DIR IMAGES`: add confirmed-normal images to a model without a refit (engine.lifecycle)."""

from __future__ import annotations

import argparse

from engine.cli.common import positive_seconds, say
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("update", help="add confirmed-normal images to a model, then recalibrate",
                       description="Add confirmed-normal images (cleared false alarms, a new batch of good parts): "
                                   "PatchCore's bank grows down to its covering radius, PaDiM's Gaussians absorb them; "
                                   "the threshold is recalibrated and the model's history records it.")
    p.add_argument("model_dir", help="model directory written by vade fit")
    p.add_argument("images", help="normal images: a folder, glob, list file or Parquet manifest (as vade scan takes)")
    p.add_argument("--out", help="write the updated model here instead of overwriting MODEL_DIR")
    p.add_argument("--force", action="store_true", help="overwrite MODEL_DIR (without --out) or an existing --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS", dest="read_timeout",
                   help=f"an image whose read takes longer is an error (default {DEFAULT_READ_TIMEOUT_S:g})")
    p.set_defaults(func=run_update)


def run_update(args: argparse.Namespace) -> int:
    from engine.lifecycle import update

    model, out, info = update(args.model_dir, args.images, args.out, args.force,
                              positive_seconds(args.read_timeout), args.device)
    added = f"bank {info['bank_size']} rows (+{info['added']})" if "bank_size" in info else \
        f"Gaussians on {info['training_images']} images (+{info['added']})"
    say(f"wrote {out}/model.json: {added}; threshold {model.threshold:.4g}")
    assert model.calibration is not None
    say(model.calibration.statement())
    return 0
