"""`vade calibrate MODEL_DIR IMAGES`: a new threshold and normalisation from normal images (engine.lifecycle)."""

from __future__ import annotations

import argparse

from engine.cli.common import positive_seconds, say
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="refit a model's threshold on normal images from its site",
                       description="Refit the threshold and normalisation on normal images (the bank or Gaussians "
                                   "are not touched); the model's history records it.")
    p.add_argument("model_dir", help="model directory written by vade fit")
    p.add_argument("images", help="normal images: a folder, glob, list file or Parquet manifest (as vade scan takes)")
    p.add_argument("--target-far", type=float, dest="target_far",
                   help="target false-alarm rate (default: the model's)")
    p.add_argument("--out", help="write the recalibrated model here instead of overwriting MODEL_DIR")
    p.add_argument("--force", action="store_true", help="overwrite MODEL_DIR (without --out) or an existing --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS", dest="read_timeout",
                   help=f"an image whose read takes longer is an error (default {DEFAULT_READ_TIMEOUT_S:g})")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from engine.lifecycle import recalibrate

    model, out = recalibrate(args.model_dir, args.images, args.target_far, args.out, args.force,
                             positive_seconds(args.read_timeout), args.device)
    assert model.calibration is not None
    say(f"wrote {out}/model.json: threshold {model.threshold:.4g} from {model.calibration.n} images")
    say(model.calibration.statement())
    return 0
