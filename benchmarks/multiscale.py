"""Does combining two patch densities help? Image and pixel metrics of two scans of the same test split
and of their combination.

    python benchmarks/multiscale.py ROOT CATEGORY SCAN_A SCAN_B [--out NAME.json]

SCAN_A and SCAN_B are `vade scan` outputs of ROOT/CATEGORY/test by two models (e.g. kept by
`benchmarks/resolution_sweep.py --keep`). Both models are calibrated (0.5 = threshold, 0 = typical
normal), so their normalised scores and maps are on one scale: the combination is their mean, image
scores and maps alike (maps resized onto each image first). Nothing is tuned: one fixed rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from engine.evaluation.evaluate import MaskSequence  # noqa: E402
from engine.evaluation.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402
from engine.inputs.datasets import test_items  # noqa: E402


class ScanMaps:
    """One scan's normalised maps, cropped to their stored shape and resized to each image, by path."""

    def __init__(self, out_dir: Path):
        table = pq.read_table(out_dir / "scores.parquet").to_pylist()
        self.rows = {str(Path(r["path"]).resolve()): r for r in table}
        self.maps = zarr.open_group(str(out_dir / "maps.zarr"), mode="r")["maps"]

    def score(self, path: Path) -> float:
        return float(self.rows[str(path.resolve())]["score"])

    def map_at(self, path: Path, size: tuple[int, int]) -> np.ndarray:
        row = self.rows[str(path.resolve())]
        amap = np.asarray(self.maps[row["index"]], dtype=np.float32)
        if row.get("map_height"):
            amap = amap[: row["map_height"], : row["map_width"]]
        up = F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear", align_corners=False)
        return up[0, 0].numpy()


class CombinedMaps:
    """Maps of each scan (or their mean) at the images' sizes, read on access."""

    def __init__(self, scans: list[ScanMaps], paths: list[Path], sizes: list[tuple[int, int]]):
        self.scans, self.paths, self.sizes = scans, paths, sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.mean([s.map_at(self.paths[i], self.sizes[i]) for s in self.scans], axis=0)


def metrics(scans: list[ScanMaps], items, sizes) -> dict:
    paths = [item.path for item in items]
    labels = np.array([item.defect != "good" for item in items])
    scores = np.mean([[s.score(p) for p in paths] for s in scans], axis=0)
    masks = MaskSequence(items, sizes)
    maps = CombinedMaps(scans, paths, sizes)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("category")
    parser.add_argument("scan_a")
    parser.add_argument("scan_b")
    parser.add_argument("--out", default="multiscale_cpu.json")
    args = parser.parse_args()
    items = test_items(Path(args.root), args.category)
    a, b = ScanMaps(Path(args.scan_a)), ScanMaps(Path(args.scan_b))
    sizes = [(int(a.rows[str(i.path.resolve())]["height"]), int(a.rows[str(i.path.resolve())]["width"])) for i in items]
    result = {
        "root": args.root, "category": args.category, "scan_a": args.scan_a, "scan_b": args.scan_b,
        "a": metrics([a], items, sizes), "b": metrics([b], items, sizes), "mean": metrics([a, b], items, sizes),
    }
    print(result, flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
