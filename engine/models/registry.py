"""The methods by name, and loading a model directory back into a model object."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.artifact import META_FILE, TENSORS_FILE, read_meta, read_tensors
from engine.calibration import Calibration
from engine.config import config_from_dict
from engine.errors import ConfigError, ModelFileError, VadeError
from engine.models.base import AnomalyModel, resolve_device
from engine.models.feature_ae import FeatureAE
from engine.models.padim import PaDiM
from engine.models.patchcore import PatchCore
from engine.models.stfpm import STFPM

MODELS: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "padim": PaDiM, "stfpm": STFPM, "feature_ae": FeatureAE}


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", weights: str | Path | None = None) -> AnomalyModel:
    """Load a model directory written by `AnomalyModel.save`, refusing anything inconsistent."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir, tuple(MODELS))
    tensors = read_tensors(model_dir / TENSORS_FILE, meta)
    try:
        overrides = {"weights": str(weights)} if weights else {}
        # Files written before `precision`, layer balancing and tiling existed: fp32 CPU features,
        # raw layers, whole-image squash.
        old = {"precision": "fp32", "layer_balance": "none", "tile_size": 0, "calibration": "holdout"}
        cfg = config_from_dict({**old, **meta["config"], **overrides}).resolved()
    except ConfigError as exc:
        raise ModelFileError(f"{model_dir / META_FILE} has an invalid config: {exc}") from exc
    model_cls = MODELS[meta["method"]]
    dev = resolve_device(str(device)) if isinstance(device, str) else device
    try:
        model = model_cls(cfg, dev)
    except VadeError as exc:
        raise type(exc)(f"cannot rebuild the backbone of {model_dir}: {exc}") from exc
    model.load_tensors(tensors)
    model.calibration = Calibration.from_dict(meta["calibration"])
    model.fit_stats = dict(meta.get("fit", {}))
    # Files from before the history was kept: their fit is the one event known.
    model.history = list(meta.get("history") or [
        {"event": "fitted", "when": meta.get("created"), "images": model.fit_stats.get("train_images"),
         "vade_version": meta.get("vade_version")}])
    return model
