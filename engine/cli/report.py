"""`vade report OUT_DIR`: the command-line face of engine.report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write OUT_DIR/report.html about a scan",
        description="One self-contained HTML page: summary, score histogram, ROC/PR where labels are known, "
        "the most anomalous images with their maps, drift per shard/folder/time, errors.",
    )
    p.add_argument("out_dir", help="the --out folder of a `vade scan` (holds scores.parquet and maps.zarr)")
    p.add_argument("--out", help="where to write the page (default OUT_DIR/report.html)")
    p.add_argument("--top", type=_positive, default=24, help="most anomalous images shown (default 24)")
    p.add_argument("--contrast", type=_positive, default=8, help="typical images shown for contrast (default 8)")
    p.add_argument(
        "--group-by",
        default="auto",
        choices=["auto", "shard", "folder", "time"],
        help="drift groups; auto: a timestamp/date column when present, else shards, else folders",
    )
    p.add_argument(
        "--sample-rows", type=_positive, default=200_000, help="rows sampled for curves on large scans (default 200000)"
    )
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from engine.report.page import build_report

    started = time.perf_counter()
    path = build_report(
        Path(args.out_dir),
        out=args.out,
        top=args.top,
        contrast=args.contrast,
        group_by=args.group_by,
        sample_rows=max(args.sample_rows, 1),
    )
    print(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
