"""`vade bench [MODEL_DIR] [SOURCE]`: throughput of the real scan by stage, against a peer-style baseline.

Without SOURCE: synthetic JPEG/PNG images (a few with defects) in a temporary folder; without
MODEL_DIR: a small default PatchCore fitted on synthetic normals. Prints a table; --json FILE keeps
everything (machine, GPU, versions, command, date). Engine: engine/bench/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import say
from engine.cli.scan import add_cluster_arguments
from engine.inputs.settings import DECODERS


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="measure scan throughput per stage, against a peer-style baseline and the machine's ceilings",
        description="Scan SOURCE (or synthetic images) with MODEL_DIR (or a default model fitted on synthetic normals) "
        "to a temporary folder and report images/s per stage and end to end, a baseline the peers' way "
        "(Pillow, fp32, torch.cdist) on the same images, and GEMM / copy / decode ceilings.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", nargs="?", help="a model from `vade fit` (default: fit a small one)")
    p.add_argument("source", metavar="SOURCE", nargs="?", help="images, as `vade scan` takes them (default: synthetic)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--decoder", default="auto", choices=DECODERS, help="image decoder (as `vade scan`)")
    p.add_argument("--images", type=int, default=200, metavar="N", help="images to scan (synthetic, or the first N of SOURCE)")
    p.add_argument("--image-size", type=int, default=512, metavar="PX", help="side of the synthetic images (default 512)")
    p.add_argument("--json", metavar="FILE", help="write the full result as JSON")
    p.add_argument("--sweep", action="store_true", help="also cost curves: scoring vs bank size, coreset vs training patches")
    p.add_argument("--sweep-only", action="store_true", help="the cost curves alone (no scan, baseline or ceilings)")
    p.add_argument("--sweep-max", type=int, default=4_000_000, metavar="ROWS", help="largest bank / training set of the sweep")
    p.add_argument("--sweep-budget", type=float, default=300.0, metavar="SECONDS",
                   help="skip a sweep point predicted to take longer (default 300)")  # fmt: skip
    p.add_argument("--no-baseline", action="store_true", help="skip the peer-style baseline")
    p.add_argument("--keep", metavar="DIR", help="keep inputs, model and scans in DIR instead of a temporary folder")
    add_cluster_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from engine.bench.report import table, write_json
    from engine.bench.run import BenchRequest, run_bench

    cluster = None
    if any(getattr(args, name, None) is not None for name in ("workers", "gpus", "scheduler")):
        from engine.distributed.cluster import ClusterRequest

        cluster = ClusterRequest(workers=args.workers, gpus=args.gpus, scheduler=args.scheduler)
        cluster.validate()
    request = BenchRequest(
        model_dir=args.model_dir, source=args.source, device=args.device, decoder=args.decoder, images=args.images,
        image_size=args.image_size, cluster=cluster, sweep=args.sweep, sweep_only=args.sweep_only,
        sweep_max=args.sweep_max, sweep_budget=args.sweep_budget, baseline=not args.no_baseline, keep=args.keep,
    )  # fmt: skip
    result = run_bench(request, ["vade", *sys.argv[1:]], say)
    if args.json:
        say(f"wrote {write_json(result, Path(args.json))}")
    print(table(result))
    return 0
