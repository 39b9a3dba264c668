"""A small synthetic inspection dataset in MVTec layout, generated at run time (no files shipped).

Normal images: a woven texture (two crossed sinusoid gratings with per-image phase jitter, mild
illumination gradient and sensor noise). Defects, each with an exact pixel mask: a dark scratch, a bright
stain, and a hole where the weave is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
DEFECTS = ("scratch", "stain", "hole")


def _texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, 2)
    period = 16.0 + rng.uniform(-0.5, 0.5)
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * x / period + phase_x) * np.sin(2 * np.pi * y / period + phase_y)
    light = 1.0 + 0.08 * rng.uniform(-1, 1) * (x / size - 0.5) + 0.08 * rng.uniform(-1, 1) * (y / size - 0.5)
    base = np.stack([weave * 0.9, weave * 0.75, weave * 0.55], axis=2) * light[:, :, None]
    return base + rng.normal(0, 0.02, base.shape).astype(np.float32)


def _defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Paint a defect in place (its size in pixels, for an image of any side); returns its boolean mask."""
    size = img.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    margin = min(60.0, size / 4)
    cy, cx = rng.uniform(margin, size - margin, 2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        mask = (np.abs(across) < 2.5) & (np.abs(along) < rng.uniform(30, 60))
        img[mask] *= 0.25
    elif kind == "stain":
        r = rng.uniform(10, 20)
        mask = (x - cx) ** 2 + ((y - cy) * 1.3) ** 2 < r**2
        img[mask] = img[mask] * 0.4 + np.array([0.55, 0.5, 0.2], dtype=np.float32)
    else:
        r = rng.uniform(12, 22)
        mask = (np.abs(x - cx) < r) & (np.abs(y - cy) < r * 0.7)
        img[mask] = img[mask].mean(axis=0) * 0.6
    return mask


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def make_demo_dataset(root: Path, n_train: int = 40, n_test_good: int = 10, n_per_defect: int = 6, seed: int = 0) -> Path:
    """Write ROOT/weave/{train/good, test/<defect>, ground_truth/<defect>}; returns ROOT."""
    rng = np.random.default_rng(seed)
    cat = Path(root) / "weave"
    for i in range(n_train):
        _save(_texture(rng), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_texture(rng), cat / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(n_per_defect):
            img = _texture(rng)
            mask = _defect(img, kind, rng)
            _save(img, cat / "test" / kind / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(_mkparent(cat / "ground_truth" / kind / f"{i:03d}_mask.png"))
    return Path(root)


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
