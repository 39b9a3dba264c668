"""Layer weights of `layer_balance: nearest` from a sample of training images vs from all of them.

The weights are two numbers (a ratio of mean squared residual parts, each layer's share of the
distance from a training patch to its nearest coreset entry). Measuring them against a coreset of
every image costs a whole extra greedy k-center; this compares the weights, and the seconds that
pass takes, for coresets of seeded samples of N images (at the fit's ratio and candidate stride)
with the one over all images. Training images only: no test image is read.

    python benchmarks/layer_share_sample.py --data ../shared/data/deeppcb/pcb --units 0 50 100 200
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from engine import api  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.features.embeddings import patchcore_embedding, to_rows  # noqa: E402
from engine.inputs.datasets import list_images  # noqa: E402
from engine.models import patchcore  # noqa: E402
from engine.models.patchcore import PatchCore  # noqa: E402


def training_embeddings(model: PatchCore, train: list[Path]) -> torch.Tensor:
    """The fit's feature pass: every training tile's unweighted patch rows, unit-major."""
    spec = model.tile_spec
    assert spec is not None, "a tiled PatchCore (the default)"
    skipped: list[tuple[str, str]] = []
    plan, _ = api.plan_training_tiles(train, spec, model.cfg.max_train_patches, model.cfg.seed, skipped)
    parts = []
    for batch in api.iter_tile_batches(plan, spec, model.cfg.batch_size, skipped):
        fmaps = model.features(batch)
        model._fit_grid = tuple(fmaps[0].shape[-2:])
        parts.append(to_rows(patchcore_embedding(fmaps)).float())
    return torch.cat(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a category root (train/good inside)")
    ap.add_argument("--units", type=int, nargs="+", default=[0, 50, 100, 200], help="sample sizes; 0 = all images")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sample seeds (for sizes below all)")
    ap.add_argument("--out", default=None, help="results/<name>.json (default layer_share_<category>.json)")
    args = ap.parse_args()
    cfg = load_config(overrides={"device": "cpu"}).resolved()
    train = list_images(args.data / "train" / "good")
    model = PatchCore(cfg, torch.device("cpu"))
    t0 = time.perf_counter()
    rows = training_embeddings(model, train)
    seconds_features = time.perf_counter() - t0
    n_units = rows.shape[0] // (model._fit_grid[0] * model._fit_grid[1])
    runs = []
    for units in args.units:
        for seed in args.seeds if 0 < units < n_units else [cfg.seed]:
            patchcore.NEAREST_UNITS = units if units > 0 else n_units
            model.cfg.seed = seed
            t = time.perf_counter()
            share = model.layer_shares(rows, "nearest")
            seconds = time.perf_counter() - t
            weights = (share.log().mean().exp() / share).sqrt()
            runs.append({"units": units or n_units, "seed": seed, "seconds": round(seconds, 2),
                         "shares": [float(v) for v in share], "layer_weights": [round(float(w), 4) for w in weights]})
            print(runs[-1], flush=True)
    full = next(r for r in runs if r["units"] == n_units)["layer_weights"]
    for r in runs:
        r["weight_ratio_vs_all"] = round((r["layer_weights"][0] / r["layer_weights"][1]) / (full[0] / full[1]), 4)
    name = args.out or f"layer_share_{args.data.name}.json"
    write_result(name, {"data": str(args.data), "training_units": n_units, "training_patches": int(rows.shape[0]),
                        "seconds_features": round(seconds_features, 1), "runs": runs,
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})


if __name__ == "__main__":
    main()
