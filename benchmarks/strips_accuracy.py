"""Non-square, high-resolution images with thin defects: strips of three DeepPCB boards at 640 px.

    python benchmarks/strips_accuracy.py [--data ../shared/data] [--only squash256 default native]

The hidden categories include long non-square frames with thin defects; this is the closest measurable
stand-in. Three consecutive images of one folder (train/good, test/good, test/combined) are put side by
side: 1920 x 640 px strips (aspect 3, like 500 x 1250), masks concatenated the same way (a normal board
contributes an empty third). pcb's defects (opens, shorts, mouse bites, spurs, spurious copper) are a few
pixels wide at 640 px. Built in a temporary folder outside the repository (licences), deleted afterwards.
Settings, each fitted on the training strips and evaluated on the test strips:
    squash256  tile_size 0, input_size 256: the whole strip squashed to 256 x 256 (the old default)
    default    the defaults (tiles of 512 px, short side scaled to the tile: 1536 x 512, 4 tiles)
    native     tiles of 512 px at image_scale 1 (1920 x 640 px, 10 tiles)
Writes benchmarks/results/strips_accuracy_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._env import write_result  # noqa: E402
from engine.api import fit  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.evaluation.evaluate import evaluate  # noqa: E402
from engine.inputs.datasets import list_images, train_images  # noqa: E402

WIDTH = 3  # images per strip
SETTINGS = {
    "squash256": {"tile_size": 0, "input_size": 256},
    "default": {},
    "native": {"image_scale": 1.0},
}


def _concat(paths: list[Path], mode: str) -> Image.Image:
    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert(mode)))
    return Image.fromarray(np.concatenate(arrays, axis=1))


def _mask_or_empty(source: Path, image: Path) -> np.ndarray:
    mask = source / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    if mask.exists():
        with Image.open(mask) as m:
            return np.asarray(m.convert("L")) > 0
    with Image.open(image) as img:
        return np.zeros(img.size[::-1], dtype=bool)


def build_strips(source: Path, dest: Path) -> dict[str, int]:
    """Strips of WIDTH consecutive images of each folder; returns the count per folder."""
    counts = {}
    for folder in sorted({p.parent for p in list_images(source / "train")} | {p.parent for p in list_images(source / "test")}):
        images = list_images(folder)
        rel = folder.relative_to(source)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        n = 0
        for i in range(0, len(images) - WIDTH + 1, WIDTH):
            group = images[i : i + WIDTH]
            name = f"strip{n:04d}"
            _concat(group, "RGB").save(dest / rel / f"{name}.png")
            if rel.parts[0] == "test" and rel.name != "good":
                masks = np.concatenate([_mask_or_empty(source, p) for p in group], axis=1)
                (dest / "ground_truth" / rel.name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks.astype(np.uint8) * 255).save(dest / "ground_truth" / rel.name / f"{name}_mask.png")
            n += 1
        counts[rel.as_posix()] = n
    return counts


def run_setting(root: Path, name: str) -> dict:
    cfg = load_config(overrides={"device": "cpu", **SETTINGS[name]})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = fit(train_images(root, "pcb"), cfg)
    fit_s = time.perf_counter() - t0
    result = evaluate(model, root, "pcb")
    row = {
        "setting": name,
        "overrides": SETTINGS[name],
        "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"],
        "aupro": result["aupro"],
        "f1_max": result["f1_max"],
        "fit_s": round(fit_s, 1),
        "eval_img_s": result.get("images_per_second"),
        "bank_size": model.meta.get("bank_size"),
        "training_patches": model.fit_stats.get("training_patches"),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vade_strips_") as tmp:
        root = Path(tmp) / "strips"
        counts = build_strips(Path(args.data) / "deeppcb_640" / "pcb", root / "pcb")
        print(counts, flush=True)
        rows = []
        for name in args.only:
            rows.append(run_setting(root, name))
            out = write_result("strips_accuracy_cpu.json", {"strips": counts, "strip": f"{WIDTH} x 640 px boards side by side", "results": rows})
    print(out)


if __name__ == "__main__":
    main()
