"""The small public surface: fit a model on normal images, load one, score batches, scan collections.

    model = fit(paths, cfg); model.save(dir); model = load(dir); model.score(batch)
    result = scan(model_dir, source, out_dir)      # maps.zarr + scores.parquet
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from engine.calibration import calibrate
from engine.config import FitConfig
from engine.errors import DataError, DecodeError, WeightsError
from engine.inputs.decode import read_rgb, to_tensor
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.models.base import AnomalyModel, resolve_device
from engine.models.registry import MODELS
from engine.models.registry import load_model as load
from engine.scan.job import scan

__all__ = ["fit", "load", "scan", "split_holdout", "iter_image_batches"]

Progress = Callable[[str], None]


def split_holdout(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split of the normal images into (train, holdout); at least 1 train and, if asked, 1 holdout."""
    order = list(paths)
    random.Random(seed).shuffle(order)
    n_hold = int(round(fraction * len(order)))
    if fraction > 0 and len(order) >= 3:
        n_hold = max(1, n_hold)
    n_hold = min(n_hold, len(order) - 2) if len(order) > 2 else 0
    holdout = sorted(order[:n_hold])
    return sorted(order[n_hold:]), holdout


def iter_image_batches(
    paths: Sequence[Path],
    size: int,
    batch_size: int,
    skipped: list[tuple[str, str]],
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> Iterator[torch.Tensor]:
    """Decoded, resized batches; unreadable files are appended to `skipped` as (path, reason).

    The reading path of fit and calibration: regular files only, each read within `read_timeout`
    seconds (engine.inputs.reader), so a FIFO or a hung mount is a skipped file, never a hang."""
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            batch.append(read_rgb(path, read_timeout=read_timeout))
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))
            continue
        if len(batch) == batch_size:
            yield to_tensor(batch, size)
            batch = []
    if batch:
        yield to_tensor(batch, size)


def _raw_scores(
    model: AnomalyModel, paths: Sequence[Path], skipped: list[tuple[str, str]], read_timeout: float
) -> np.ndarray:
    batches = iter_image_batches(paths, model.input_size, model.cfg.batch_size, skipped, read_timeout)
    scores = [model.score(b).scores.cpu() for b in batches]
    return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def _finite(feature_maps: list[torch.Tensor], cfg: FitConfig) -> list[torch.Tensor]:
    """The backbone's feature maps, refused if any value is NaN or infinite (broken weights)."""
    for name, fmap in zip(cfg.layers, feature_maps):
        if not bool(torch.isfinite(fmap).all()):
            raise WeightsError(
                f"{cfg.backbone} layer {name} produced NaN or infinite features on normal images; "
                f"the backbone weights{f' ({cfg.weights})' if cfg.weights else ''} are broken or not this backbone's"
            )
    return feature_maps


def fit(
    images: Sequence[str | Path],
    cfg: FitConfig | None = None,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> AnomalyModel:
    """Fit a model on normal images and calibrate its threshold on a seeded hold-out of them.

    An image that cannot be read (or not within `read_timeout` seconds) is skipped and listed in fit_stats."""
    say = progress or (lambda msg: None)
    cfg = (cfg or FitConfig()).resolved()
    torch.manual_seed(cfg.seed)
    paths = [Path(p) for p in images]
    if len(paths) < 2:
        raise DataError(f"need at least 2 normal images to fit, got {len(paths)}")
    train, holdout = split_holdout(paths, cfg.holdout_fraction, cfg.seed)
    model = MODELS[cfg.method](cfg, resolve_device(cfg.device))
    say(f"fitting {cfg.method} ({cfg.backbone}, layers {cfg.layers}) on {len(train)} images, "
        f"{len(holdout)} held out for the threshold")
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    images_in = iter_image_batches(train, cfg.input_size, cfg.batch_size, skipped, read_timeout)
    batches = (_finite(model.features(b), cfg) for b in images_in)
    model.fit_features(batches, len(train))
    t1 = time.perf_counter()
    source = "holdout" if holdout else "train"
    normal = _raw_scores(model, holdout or train, skipped, read_timeout)
    if normal.size == 0:
        raise DataError("no readable normal image left to calibrate the threshold")
    model.calibration = calibrate(normal, cfg.target_false_alarm_rate, source)
    model.fit_stats.update(
        train_images=len(train) - sum(1 for p, _ in skipped if Path(p) in set(train)),
        holdout_images=len(holdout),
        skipped=[{"path": p, "error": e} for p, e in skipped],
        seconds_fit=round(t1 - t0, 3),
        seconds_calibration=round(time.perf_counter() - t1, 3),
    )
    say(f"fit done in {time.perf_counter() - t0:.1f} s; threshold {model.threshold:.4g} ({source})")
    return model
