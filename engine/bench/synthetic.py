"""Inputs and a model for `vade bench` when none are given: textured normals, a few planted defects.

The texture and defects are engine/demo/dataset.py's, at any side. Files alternate JPEG (quality 90)
and PNG, so decoding is measured on both; every DEFECT_EVERY-th image carries a defect.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from engine.demo.dataset import DEFECTS, _defect, _texture

DEFECT_EVERY = 10
JPEG_QUALITY = 90
TRAIN_IMAGES = 24  # normals the default model is fitted on


def _pixels(arr: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))


def _write_one(folder: Path, i: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng([seed, i])  # per image: the same files whatever the threads
    img = _texture(rng, size)
    kind = "good"
    if i % DEFECT_EVERY == DEFECT_EVERY - 1:
        kind = DEFECTS[(i // DEFECT_EVERY) % len(DEFECTS)]
        _defect(img, kind, rng)
    path = folder / f"{i:06d}_{kind}.{'jpg' if i % 2 == 0 else 'png'}"
    if path.suffix == ".jpg":
        _pixels(img).save(path, quality=JPEG_QUALITY)
    else:
        _pixels(img).save(path)
    return path


def make_images(folder: Path, count: int, size: int, seed: int = 1) -> list[Path]:
    """`count` images of size x size in `folder` (JPEG and PNG alternating, defects planted); their paths.
    Written by a few threads (numpy and the encoders release the GIL): 2,000 at 512 px take minutes on one."""
    folder.mkdir(parents=True, exist_ok=True)
    threads = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, "vade-bench-inputs") as pool:
        return list(pool.map(lambda i: _write_one(folder, i, size, seed), range(count)))


def make_normals(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """`count` normal PNGs (no defects) to fit the default model on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.png"
        _pixels(_texture(rng, size)).save(path)
        paths.append(path)
    return paths


def fit_default_model(folder: Path, size: int, device: str, say=None) -> Path:
    """Fit `vade fit`'s default model (PatchCore, Lite0, 512 px tiles) on synthetic normals of `size`
    px; returns its model folder."""
    from engine.api import fit
    from engine.config import FitConfig

    normals = make_normals(folder / "normals", TRAIN_IMAGES, size)
    cfg = FitConfig(device=device)
    model = fit(normals, cfg, progress=say)
    out = folder / "model"
    model.save(out)
    return out
