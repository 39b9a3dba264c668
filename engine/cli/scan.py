"""`vade scan MODEL_DIR SOURCE --out OUT_DIR`: the command-line face of engine.scan.job.scan.

Exit codes: 0 the scan completed (error rows included), 1 with --strict when any row is an error,
2 a usage or input problem, 3 OUT_DIR locked by another scan, 4-8 a failure of the machine (disk full,
output unwritable, model changed, out of memory, storage), 130/143 SIGINT/SIGTERM: one line on stderr
each (engine/cli/main.py lists them; engine/faults.py makes them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from engine.inputs.settings import DECODERS, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S
from engine.scan.options import ScanOptions

EXIT_OK, EXIT_STRICT, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `scan` subcommand."""
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
    p.add_argument("--shard-size", type=int, default=ScanOptions.shard_size, help="images per shard (unit of resume and of a worker's task; default: from the input count and the workers, at most 1024)")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images as decompression bombs"
    )
    p.add_argument(
        "--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S, metavar="SECONDS",
        help=f"a file whose read takes longer is an error row and the scan goes on (default {DEFAULT_READ_TIMEOUT_S:g})",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit 1 when any input could not be scored")
    p.add_argument("--quiet", action="store_true", help="no progress output (the summary line still prints)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)
    return p


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """--workers / --gpus / --scheduler (at most one; none = one process)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--workers", type=int, metavar="N", help="run shards on a local Dask cluster of N worker processes"
    )
    group.add_argument(
        "--gpus",
        metavar="all|N",
        help="one local Dask worker per GPU (all visible, or the first N), each pinned to its GPU",
    )
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing Dask cluster: tcp://HOST:PORT of its scheduler, or its --scheduler-file JSON",
    )


def options_from_args(args: argparse.Namespace) -> ScanOptions:
    return ScanOptions(
        device=args.device,
        decoder=args.decoder,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        max_pixels=args.max_pixels,
        read_timeout=args.read_timeout,
    )


def scan_function(args: argparse.Namespace) -> Callable[..., Any]:
    """engine.scan.job.scan, or engine.distributed.driver.scan_on_cluster bound to the cluster asked for."""
    workers, gpus, scheduler = (getattr(args, name, None) for name in ("workers", "gpus", "scheduler"))
    if workers is None and gpus is None and scheduler is None:
        from engine.scan.job import scan

        return scan
    from engine.distributed.cluster import ClusterRequest
    from engine.distributed.driver import scan_on_cluster

    request = ClusterRequest(workers=workers, gpus=gpus, scheduler=scheduler)
    request.validate()

    def run(*a: Any, **kw: Any) -> Any:
        return scan_on_cluster(*a, cluster=request, **kw)

    return run


def run(args: argparse.Namespace) -> int:
    """Run a scan from parsed arguments; print a summary line; return the exit code."""
    from engine.scan.progress import Progress

    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    result = scan_function(args)(  # errors and faults: one line and their exit code (engine/cli/main.py)
        args.model_dir,
        args.source,
        args.out,
        options_from_args(args),
        resume=args.resume,
        progress=Progress(0, quiet=args.quiet),
        say=say,
    )
    say(f"decoder {result.decoder} on {result.device}, {result.seconds:.1f} s")
    print(result.summary())
    return EXIT_STRICT if args.strict and result.counts.error else EXIT_OK
