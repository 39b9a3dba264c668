"""Coreset among a thinned patch grid vs the exact greedy among all rows: time and covering radius.

    python benchmarks/coreset_thinning.py ROWS.npy --grid 64 --picks 36864 [--strides 1 2 3] [--out NAME.json]

ROWS.npy: projected training rows (N x 128) as PatchCore's selection sees them, image-major and
row-major over a grid x grid patch grid per image (what engine.features.embeddings.to_rows makes).
For each stride s (1 = all rows, the exact greedy everywhere): greedy k-center among every s-th row
and column of each grid, timed; then the covering radius over ALL rows (max distance from a row to
its nearest pick, exact kNN) next to the radius the selection saw among its candidates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from kernels.coreset import greedy_kcenter_with_radius  # noqa: E402
from kernels.knn_index import KnnIndex  # noqa: E402


def covering_radius(rows: torch.Tensor, bank: torch.Tensor) -> float:
    index = KnnIndex.build(bank)
    worst = 0.0
    for start in range(0, rows.shape[0], 65536):
        dist, _ = index.search(rows[start : start + 65536], 1)
        worst = max(worst, float(dist.max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows")
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--picks", type=int, required=True)
    parser.add_argument("--strides", type=int, nargs="*", default=[2, 1])
    parser.add_argument("--start", type=int, default=0, help="first pick (row id among the candidates)")
    parser.add_argument("--out", default="coreset_thinning_cpu.json")
    args = parser.parse_args()
    rows = torch.from_numpy(np.load(args.rows)).float()
    cell = torch.arange(rows.shape[0]) % (args.grid * args.grid)
    results = []
    for stride in args.strides:
        keep = ((cell // args.grid) % stride == 0) & ((cell % args.grid) % stride == 0)
        candidates = keep.nonzero().squeeze(1)
        t0 = time.perf_counter()
        picks, radius_seen = greedy_kcenter_with_radius(rows[candidates], args.picks, start=args.start)
        seconds = time.perf_counter() - t0
        full = covering_radius(rows, rows[candidates[picks]])
        results.append({"stride": stride, "candidates": int(candidates.numel()), "picks": args.picks,
                        "seconds": round(seconds, 2), "radius_among_candidates": radius_seen,
                        "radius_all_rows": full})
        print(results[-1], flush=True)
        write_result(args.out, {"rows": args.rows, "n_rows": int(rows.shape[0]), "results": results})


if __name__ == "__main__":
    main()
