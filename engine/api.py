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
from engine.inputs.decode import pixels_tensor, read_rgb, tile_chunks, to_tensor
from engine.inputs.inspection import oriented_size
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.models.base import AnomalyModel, resolve_device
from engine.models.registry import MODELS
from engine.models.registry import load_model as load
from engine.models.tiled import score_images_tiled
from engine.scan.job import scan
from engine.scan.progress import counted
from engine.tiling import TileSpec

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


def plan_training_tiles(paths: Sequence[Path], spec: TileSpec, max_patches: int, seed: int,
                        skipped: list[tuple[str, str]], read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                        ) -> tuple[dict[Path, list[int]], int]:
    """Which tiles of which images the fit uses: all of them, or a seeded uniform sample of tiles when
    they hold more than `max_patches` patches. Returns ({path: tile indices}, tiles in all)."""
    counts: dict[Path, int] = {}
    for path in paths:
        try:
            counts[path] = spec.layout(*oriented_size(path, read_timeout)).n_tiles
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))
    total = sum(counts.values())
    per_tile = (spec.tile // spec.stride) ** 2
    keep = max(1, max_patches // per_tile)
    if total <= keep:
        return {path: list(range(n)) for path, n in counts.items()}, total
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep].sort().values.tolist()
    plan: dict[Path, list[int]] = {}
    bounds = np.cumsum([0, *counts.values()])
    for path, lo, hi in zip(counts, bounds[:-1], bounds[1:], strict=True):
        mine = [int(t - lo) for t in chosen if lo <= t < hi]
        if mine:
            plan[path] = mine
    return plan, total


def iter_tile_batches(plan: dict[Path, list[int]], spec: TileSpec, batch_size: int,
                      skipped: list[tuple[str, str]], read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                      ) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` training tiles (the last may be short), in the plan's order."""
    pending: list[torch.Tensor] = []
    held = 0
    for path, tiles in plan.items():
        try:
            pixels = pixels_tensor(read_rgb(path, read_timeout=read_timeout))
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))
            continue
        layout = spec.layout(pixels.shape[0], pixels.shape[1])
        for _, chunk in tile_chunks(pixels, layout, batch_size, [t for t in tiles if t < layout.n_tiles]):
            pending.append(chunk)
            held += chunk.shape[0]
            while held >= batch_size:
                batch = torch.cat(pending)
                yield batch[:batch_size]
                pending, held = ([batch[batch_size:]] if held > batch_size else []), held - batch_size
    if held:
        yield torch.cat(pending)


def _raw_scores(
    model: AnomalyModel, paths: Sequence[Path], skipped: list[tuple[str, str]], read_timeout: float
) -> np.ndarray:
    if model.tile_spec is not None:
        decoded = _readable(paths, skipped, read_timeout)
        return np.asarray([float(out.score) for _, out in score_images_tiled(model, decoded)], dtype=np.float64)
    batches = iter_image_batches(paths, model.input_size, model.cfg.batch_size, skipped, read_timeout)
    scores = [model.score(b).scores.cpu() for b in batches]
    return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def _readable(
    paths: Sequence[Path], skipped: list[tuple[str, str]], read_timeout: float
) -> Iterator[tuple[Path, np.ndarray]]:
    for path in paths:
        try:
            yield path, read_rgb(path, read_timeout=read_timeout)
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))


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
    spec = model.tile_spec
    if spec is None:
        images_in = iter_image_batches(train, cfg.input_size, cfg.batch_size, skipped, read_timeout)
        units = len(train)
    else:
        plan, tiles_total = plan_training_tiles(train, spec, cfg.max_train_patches, cfg.seed, skipped, read_timeout)
        units = sum(len(t) for t in plan.values())
        say(f"training on {units} tiles of {len(plan)} images" + (f" (a seeded sample of {tiles_total})" if units < tiles_total else ""))
        model.fit_stats.update(training_tiles=units, tiles_total=tiles_total)
        images_in = iter_tile_batches(plan, spec, cfg.batch_size, skipped, read_timeout)
    images_in = counted(images_in, units, label="fit features", unit="tiles" if spec else "images", quiet=progress is None)
    batches = (_finite(model.features(b), cfg) for b in images_in)
    model.fit_features(batches, units)
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
