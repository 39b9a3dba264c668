"""`vade demo`: fit, scan, evaluate and report on a small generated dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fit, scan and evaluate on a small built-in dataset")
    p.add_argument("--out", default="vade-demo", help="folder for the demo data, model and outputs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from engine.demo.run import run_demo as demo

    return demo(Path(args.out), device=args.device, say=say)
