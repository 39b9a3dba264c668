"""`vade eval MODEL_DIR DATA`: score an MVTec-layout test split and print the metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.cli.common import positive_seconds, say
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on an MVTec-layout test split")
    p.add_argument("model_dir")
    p.add_argument("data", help="MVTec-layout root or category folder")
    p.add_argument("--category")
    p.add_argument("--json", dest="json_path", help="write the metrics as JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16, dest="batch_size")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS", dest="read_timeout",
                   help=f"an image whose read takes longer stops the evaluation, naming it (default {DEFAULT_READ_TIMEOUT_S:g})")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from engine.evaluation.evaluate import evaluate, format_table
    from engine.models.registry import load_model

    read_timeout = positive_seconds(args.read_timeout)
    model = load_model(args.model_dir, device=args.device)
    result = evaluate(model, Path(args.data), args.category, batch_size=args.batch_size, read_timeout=read_timeout)
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {args.json_path}")
    return 0
