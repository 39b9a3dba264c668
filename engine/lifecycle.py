"""After the fit: `vade calibrate` (a new threshold from site images) and `vade update` (more normal images).

Both read a model directory, refuse anything wrong with one line (a damaged model, an unreadable image,
an output that exists without `force`), and write a model directory whose history (model.json) records
what was done. Calibration never touches the bank or the Gaussians: only the threshold and the
normalisation change, so `model.safetensors` is byte-identical.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from engine.api import _raw_scores, history_event
from engine.calibration import calibrate
from engine.errors import DataError, VadeError
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.inputs.sources import open_source
from engine.models.base import AnomalyModel
from engine.models.registry import load_model


def output_dir(model_dir: Path, out: Path | None, force: bool, verb: str) -> Path:
    """Where `verb` writes: OUT (new, or existing with force) or MODEL_DIR itself (force only)."""
    if out is None:
        if not force:
            raise VadeError(f"vade {verb} writes a model: pass --out NEW_DIR, or --force to overwrite {model_dir}")
        return model_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise VadeError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    return out


def source_paths(spec: str | Path) -> list[Path]:
    """The images of a SOURCE exactly as `vade scan` lists them (folder, glob, list or manifest)."""
    paths = [Path(record.file) for record in open_source(spec).records()]
    if not paths:
        raise DataError(f"{spec} lists no images")
    return paths


def raw_scores_all(model: AnomalyModel, paths: Sequence[Path], read_timeout: float) -> list[float]:
    """Raw scores of every image, refusing if any cannot be read (a calibration set must be whole)."""
    skipped: list[tuple[str, str]] = []
    scores = _raw_scores(model, paths, skipped, read_timeout)
    if skipped:
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise DataError(f"cannot read {len(skipped)} of {len(paths)} images: {reason}{more}; remove or fix them"
                        if path in reason else f"cannot read {path}: {reason}{more}; remove or fix it")
    return [float(s) for s in scores]


def save_as(model: AnomalyModel, model_dir: Path, out: Path) -> Path:
    """Write the model to `out` (MODEL_DIR itself or a new directory); nothing else is copied."""
    if out.resolve() != model_dir.resolve() and out.exists() and out.is_dir():
        shutil.rmtree(out)
    return model.save(out)


def recalibrate(
    model_dir: str | Path,
    images: str | Path,
    target_far: float | None = None,
    out: str | Path | None = None,
    force: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    device: str = "auto",
) -> tuple[AnomalyModel, Path]:
    """Refit the threshold and normalisation of MODEL_DIR on normal IMAGES; (model, where it was written)."""
    model_dir = Path(model_dir)
    target = output_dir(model_dir, Path(out) if out is not None else None, force, "calibrate")
    if target_far is not None and not 0.0 < target_far <= 0.5:
        raise VadeError(f"--target-far must be in (0, 0.5], got {target_far}")
    model = load_model(model_dir, device)
    paths = source_paths(images)
    scores = raw_scores_all(model, paths, read_timeout)
    assert model.calibration is not None
    rate = target_far if target_far is not None else (model.calibration.target_rate or model.cfg.target_false_alarm_rate)
    model.calibration = calibrate(scores, rate, "calibrate")
    model.history.append(history_event("calibrated", len(paths), model, source=str(images)))
    return model, save_as(model, model_dir, target)


def _decode_all(paths: Sequence[Path], read_timeout: float) -> list:
    from engine.errors import DecodeError
    from engine.inputs.decode import read_rgb

    decoded = []
    for path in paths:
        try:
            decoded.append(read_rgb(path, read_timeout=read_timeout))
        except DecodeError as exc:
            raise DataError(f"cannot read {path}: {exc}; remove or fix it") from exc
    return decoded


def _patch_rows(model: AnomalyModel, decoded: list, first_owner: int):
    """Weighted patch rows of every image (every tile), their owners, and the patch grid per tile."""
    import torch

    from engine.features.embeddings import to_rows
    from engine.inputs.decode import pixels_tensor, tile_chunks, to_tensor

    rows, owners, grid = [], [], (0, 0)
    spec = model.tile_spec
    for i, pixels in enumerate(decoded):
        if spec is None:
            chunks = [to_tensor([pixels], model.input_size)]
        else:
            tensor = pixels_tensor(pixels)
            layout = spec.layout(int(tensor.shape[0]), int(tensor.shape[1]))
            chunks = [chunk for _, chunk in tile_chunks(tensor, layout, model.cfg.batch_size)]
        for chunk in chunks:
            emb = model._embed(model.features(chunk))  # type: ignore[attr-defined]
            grid = tuple(emb.shape[-2:])
            part = to_rows(emb).float().cpu()
            rows.append(part)
            owners.append(torch.full((part.shape[0],), first_owner + i, dtype=torch.int32))
    return torch.cat(rows), torch.cat(owners), grid


def update(
    model_dir: str | Path,
    images: str | Path,
    out: str | Path | None = None,
    force: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    device: str = "auto",
) -> tuple[AnomalyModel, Path, dict]:
    """Add confirmed-normal IMAGES to MODEL_DIR without a refit, then recalibrate; (model, where, what was done).

    PatchCore: the bank grows by the fit's greedy k-center continued over the new patches down to its
    recorded covering radius; PaDiM: the Gaussians absorb the new images' statistics. The threshold is
    then recomputed from the previous calibration scores pooled with the new images' out-of-sample scores
    (PatchCore: against the bank before the update; PaDiM: leave-one-out)."""
    import torch

    from engine.api import loo_scores
    from engine.models.padim import PaDiM
    from engine.models.patchcore import PatchCore

    model_dir = Path(model_dir)
    target = output_dir(model_dir, Path(out) if out is not None else None, force, "update")
    model = load_model(model_dir, device)
    if getattr(model, "trained", False):
        raise VadeError(f"{model.method} models are trained networks; update would retrain: fit again with vade fit "
                        "on the old and the new normal images (vade calibrate sets a new threshold without training)")
    paths = source_paths(images)
    decoded = _decode_all(paths, read_timeout)
    old = model.calibration
    assert old is not None
    can_loo = True
    with torch.inference_mode():
        if isinstance(model, PatchCore):
            first = int(model.bank_owner.max()) + 1 if model.bank_owner is not None else 0
            can_loo = model.bank_owner is not None
            rows, owners, grid = _patch_rows(model, decoded, first)
            try:
                info = model.extend_bank(rows, owners, grid)
            except ValueError as exc:
                raise VadeError(f"cannot update {model_dir}: {exc}") from exc
        elif isinstance(model, PaDiM):
            first = int(model.fit_stats.get("training_images", 0))
            from engine.inputs.decode import to_tensor

            size, batch = model.input_size, model.cfg.batch_size
            batches = (model.features(to_tensor(decoded[i : i + batch], size)) for i in range(0, len(decoded), batch))
            try:
                info = model.update_stats(batches)
            except ValueError as exc:
                raise VadeError(f"cannot update {model_dir}: {exc}") from exc
        else:  # pragma: no cover - every method is one of the two
            raise VadeError(f"vade update does not know method {model.method!r}")
    new_scores: list[float] = []
    if can_loo:
        skipped: list[tuple[str, str]] = []
        # PatchCore: the new images against the bank without any of their rows (the bank before the
        # update, a hold-out of it); PaDiM: each leave-one-out of the updated Gaussians (exact).
        with model.out_of_sample(range(first, first + len(paths)), as_group=True) as owner_ids:
            new_scores = [float(s) for s in loo_scores(model, paths, owner_ids, skipped, read_timeout)]
    pooled = [*old.normal_scores, *new_scores]
    rate = old.target_rate or model.cfg.target_false_alarm_rate
    model.calibration = calibrate(pooled, rate, f"{old.source}+update" if new_scores else old.source)
    model.fit_stats["train_images"] = int(model.fit_stats.get("train_images", 0)) + len(paths)
    info["new_loo_scores"] = len(new_scores)
    model.history.append(history_event("updated", len(paths), model, source=str(images), **info))
    return model, save_as(model, model_dir, target), info
