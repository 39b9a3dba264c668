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
from engine.scan.progress import Progress as Bar
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
    owners: list[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Decoded, resized batches; unreadable files are appended to `skipped` as (path, reason), and
    the index in `paths` of each image yielded to `owners` (when given).

    The reading path of fit and calibration: regular files only, each read within `read_timeout`
    seconds (engine.inputs.reader), so a FIFO or a hung mount is a skipped file, never a hang."""
    batch: list[np.ndarray] = []
    for i, path in enumerate(paths):
        try:
            batch.append(read_rgb(path, read_timeout=read_timeout))
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))
            continue
        if owners is not None:
            owners.append(i)
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
                      owners: list[int] | None = None, owner_of: dict[Path, int] | None = None,
                      ) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` training tiles (the last may be short), in the plan's order; the
    owner of each tile yielded (`owner_of[path]`, else the image's position in the plan) goes to `owners`."""
    pending: list[torch.Tensor] = []
    held = 0
    for position, (path, tiles) in enumerate(plan.items()):
        try:
            pixels = pixels_tensor(read_rgb(path, read_timeout=read_timeout))
        except DecodeError as exc:
            skipped.append((str(path), str(exc)))
            continue
        layout = spec.layout(pixels.shape[0], pixels.shape[1])
        for _, chunk in tile_chunks(pixels, layout, batch_size, [t for t in tiles if t < layout.n_tiles]):
            pending.append(chunk)
            held += chunk.shape[0]
            if owners is not None:
                owners += [owner_of[path] if owner_of is not None else position] * chunk.shape[0]
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


def loo_scores(
    model: AnomalyModel, paths: Sequence[Path], owners: Sequence[int], skipped: list[tuple[str, str]],
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> np.ndarray:
    """Leave-one-out raw scores of training images `paths` whose owner ids (their index in the fit's
    image list) are `owners`: each scored without its own contribution to the model."""
    decoded = ((owner, pixels) for (_, pixels), owner in _readable_with(paths, owners, skipped, read_timeout))
    if model.tile_spec is not None:
        return np.asarray([float(out.score) for _, out in score_images_tiled(model, decoded, loo=True)], dtype=np.float64)
    scores: list[torch.Tensor] = []
    batch: list[tuple[int, np.ndarray]] = []
    for item in decoded:
        batch.append(item)
        if len(batch) == model.cfg.batch_size:
            scores.append(_loo_batch(model, batch))
            batch = []
    if batch:
        scores.append(_loo_batch(model, batch))
    return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def _loo_batch(model: AnomalyModel, batch: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    images = to_tensor([pixels for _, pixels in batch], model.input_size)
    return model.score(images, torch.tensor([owner for owner, _ in batch])).scores.cpu()


def _readable_with(paths: Sequence[Path], owners: Sequence[int], skipped: list[tuple[str, str]],
                   read_timeout: float) -> Iterator[tuple[tuple[Path, np.ndarray], int]]:
    for path, owner in zip(paths, owners, strict=True):
        for item in _readable([path], skipped, read_timeout):
            yield item, owner


def loo_subset(n_train: int, limit: int, seed: int) -> list[int]:
    """Seeded subset of `limit` training-image indices (all of them when limit <= 0 or >= n), sorted."""
    if limit <= 0 or limit >= n_train:
        return list(range(n_train))
    return sorted(random.Random(seed + 1).sample(range(n_train), limit))


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


def _decoded(paths: Sequence[Path], size: int, batch: int, skipped: list[tuple[str, str]],
             read_timeout: float) -> torch.Tensor:
    """Every readable image of `paths` decoded once, resized to the model input: (N, 3, S, S) float32."""
    parts = list(iter_image_batches(paths, size, batch, skipped, read_timeout))
    return torch.cat(parts) if parts else torch.zeros((0, 3, size, size))


def _train_model(model: AnomalyModel, train: Sequence[Path], holdout: Sequence[Path],
                 skipped: list[tuple[str, str]], read_timeout: float, quiet: bool) -> None:
    """A trained method's fit: the images decoded once, the network trained with a bar (loss, ETA)."""
    cfg = model.cfg
    images = _decoded(train, cfg.input_size, cfg.batch_size, skipped, read_timeout)
    if images.shape[0] < 2:
        raise DataError(f"need at least 2 readable training images, got {images.shape[0]}")
    held = _decoded(holdout, cfg.input_size, cfg.batch_size, [], read_timeout)  # calibration records its skips
    bar = Bar(0, label=f"train {cfg.method}", unit="batches", quiet=quiet)

    def hook(done: int, total: int, note: str) -> None:
        if bar.total != total:
            bar.begin(total, 0)
        bar.note = note
        bar.advance(done - bar.done)

    model.fit_images(images, held, hook)  # type: ignore[attr-defined]
    bar.close()


def history_event(event: str, images: int, model: AnomalyModel, **extra: object) -> dict:
    """One entry of a model's history (model.json "history"), with the calibration it left."""
    from datetime import datetime, timezone

    from engine import __version__

    cal = model.calibration
    return {"event": event, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "images": images,
            "vade_version": __version__, "threshold": None if cal is None else cal.threshold,
            "calibration_source": None if cal is None else cal.source, "calibration_n": None if cal is None else cal.n,
            "certified_rate": None if cal is None else cal.certified_rate, **extra}


def fit(
    images: Sequence[str | Path],
    cfg: FitConfig | None = None,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> AnomalyModel:
    """Fit a model on normal images and calibrate its threshold (engine/calibration.py) on leave-one-out
    scores of (a seeded subset of) them, a seeded hold-out, or both (`cfg.calibration`).

    An image that cannot be read (or not within `read_timeout` seconds) is skipped and listed in fit_stats."""
    say = progress or (lambda msg: None)
    cfg = (cfg or FitConfig()).resolved()
    torch.manual_seed(cfg.seed)
    paths = [Path(p) for p in images]
    if len(paths) < 2:
        raise DataError(f"need at least 2 normal images to fit, got {len(paths)}")
    use_loo = cfg.calibration in ("loo", "both")
    train, holdout = split_holdout(paths, cfg.holdout_fraction if cfg.calibration != "loo" else 0.0, cfg.seed)
    model = MODELS[cfg.method](cfg, resolve_device(cfg.device))
    say(f"fitting {cfg.method} ({cfg.backbone}, layers {cfg.layers}) on {len(train)} images, "
        f"{len(holdout)} held out for the threshold")
    owners: list[int] = []
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    spec = model.tile_spec
    if getattr(model, "trained", False):
        _train_model(model, train, holdout, skipped, read_timeout, quiet=progress is None)
    elif spec is None:
        images_in = iter_image_batches(train, cfg.input_size, cfg.batch_size, skipped, read_timeout, owners)
        units = len(train)
    else:
        plan, tiles_total = plan_training_tiles(train, spec, cfg.max_train_patches, cfg.seed, skipped, read_timeout)
        units = sum(len(t) for t in plan.values())
        say(f"training on {units} tiles of {len(plan)} images" + (f" (a seeded sample of {tiles_total})" if units < tiles_total else ""))
        model.fit_stats.update(training_tiles=units, tiles_total=tiles_total)
        owner_of = {path: i for i, path in enumerate(train)}
        images_in = iter_tile_batches(plan, spec, cfg.batch_size, skipped, read_timeout, owners, owner_of)
    loo_idx: list[int] = []
    if use_loo:
        fold_first = cfg.loo_method == "fold" and model.fits_fold_last
        limit = cfg.loo_images if cfg.loo_images > 0 else len(train)
        loo_idx = loo_subset(len(train), min(limit, len(train) // 2) if fold_first else limit, cfg.seed)
        model.calibration_images = tuple(loo_idx)  # the fit prepares their out-of-sample scoring
    if not getattr(model, "trained", False):
        if progress is not None:
            model.step_bar = lambda total, label: Bar(total, label=label, unit="picks")
        images_in = counted(images_in, units, label="fit features", unit="tiles" if spec else "images",
                            quiet=progress is None)
        batches = (_finite(model.features(b), cfg) for b in images_in)
        model.fit_features(batches, units, owners)
    t1 = time.perf_counter()
    parts, sources = [], []
    if use_loo:
        as_group = "calibration_fold_images" in model.fit_stats
        how = "as a hold-out of the bank selected without them" if as_group else "leave-one-out"
        say(f"scoring {len(loo_idx)} training images {how} for the threshold")
        with model.out_of_sample(loo_idx, as_group) as owners:
            parts.append(loo_scores(model, [train[i] for i in loo_idx], owners, skipped, read_timeout))
        sources.append("fold" if as_group else "loo")
    model.calibration_images = ()  # the fit's own calibration is done
    if holdout:
        parts.append(_raw_scores(model, holdout, skipped, read_timeout))
        sources.append("holdout")
    if not sources:  # calibration holdout with too few images to hold any out: in-sample, optimistic
        parts.append(_raw_scores(model, train, skipped, read_timeout))
        sources.append("train")
    normal = np.concatenate(parts)
    if normal.size == 0:
        raise DataError("no readable normal image left to calibrate the threshold")
    source = "+".join(sources)
    model.calibration = calibrate(normal, cfg.target_false_alarm_rate, source)
    model.fit_stats.update(
        train_images=len(train) - sum(1 for p, _ in skipped if Path(p) in set(train)),
        holdout_images=len(holdout),
        loo_images=len(loo_idx),
        skipped=[{"path": p, "error": e} for p, e in skipped],
        seconds_fit=round(t1 - t0, 3),
        seconds_calibration=round(time.perf_counter() - t1, 3),
    )
    model.history = [history_event("fitted", len(paths) - len(skipped), model)]
    say(f"fit done in {time.perf_counter() - t0:.1f} s; threshold {model.threshold:.4g} ({source})")
    say(model.calibration.statement())
    return model
