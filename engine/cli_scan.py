"""`vade scan MODEL_DIR SOURCE --out OUT_DIR`: the command-line face of engine.pipeline.scan.

engine/cli.py calls `register(subparsers)`; the parsed arguments go to `run(args) -> exit code`.
Exit codes: 0 the scan completed (error rows included), 1 with --strict when any row is an error,
2 a usage or input problem (message on stderr).
"""

from __future__ import annotations

import argparse
import sys

from engine.decode import DEFAULT_MAX_PIXELS
from engine.decoders import DECODERS
from engine.distributed import add_cluster_arguments, cluster_scan_for
from engine.errors import VadeError
from engine.pipeline import ScanOptions, scan
from engine.progress import Progress

EXIT_OK, EXIT_STRICT, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `scan` subcommand (issue 5 adds --workers/--scheduler/--gpus to the returned parser)."""
    p = subparsers.add_parser(
        "scan",
        help="score every image of a folder, glob, list or Parquet manifest",
        description="Score every image of SOURCE with a fitted model: OUT_DIR/maps.zarr (anomaly maps) and "
        "OUT_DIR/scores.parquet (one row per input, errors included).",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model folder written by `vade fit`")
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder (recursive; an MVTec root without its ground_truth masks), a glob (quote it), "
        "a text file of paths, or a Parquet manifest with a 'path' column",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (must be new, unless --resume)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted scan in OUT_DIR")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--decoder", default="auto", choices=DECODERS, help="image decoder (default auto: DALI when installed)")
    p.add_argument("--batch-size", type=int, default=ScanOptions.batch_size, help="images decoded and written together (the backbone runs fixed micro-batches: 8 on CPU, 64 on CUDA)")
    p.add_argument("--shard-size", type=int, default=ScanOptions.shard_size, help="images per shard (unit of resume)")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images as decompression bombs"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any input could not be scored")
    p.add_argument("--quiet", action="store_true", help="no progress output (the summary line still prints)")
    add_cluster_arguments(p)  # --workers N | --gpus all|N | --scheduler ADDRESS (engine.distributed)
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace) -> ScanOptions:
    return ScanOptions(
        device=args.device,
        decoder=args.decoder,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
    )


def run(args: argparse.Namespace) -> int:
    """Run a scan from parsed arguments; print a summary line; return the exit code."""
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        result = (cluster_scan_for(args) or scan)(
            args.model_dir,
            args.source,
            args.out,
            options_from_args(args),
            resume=args.resume,
            progress=Progress(0, quiet=args.quiet),
            say=say,
        )
    except VadeError as exc:
        print(f"vade scan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    say(f"decoder {result.decoder} on {result.device}, {result.seconds:.1f} s")
    print(result.summary())
    return EXIT_STRICT if args.strict and result.counts.error else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m engine.cli_scan ...`) until engine/cli.py wires `register`."""
    parser = argparse.ArgumentParser(prog="vade")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
