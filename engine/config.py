"""Typed configuration: one dataclass, loaded from configs/*.yaml, overridden by CLI flags, validated once.

Nothing below this edge reads environment variables or global state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError

METHODS = ("patchcore", "padim", "stfpm", "feature_ae")
# Methods whose statistics are a network trained on the normal images (engine/models/training.py):
# no leave-one-out (one training run per image), so their threshold comes from held-out images.
TRAINED_METHODS = ("stfpm", "feature_ae")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LAYER_BALANCES = ("nearest", "variance", "none")
# Which normal scores set the threshold (engine/calibration.py): training images scored leave-one-out
# (the bank / Gaussians use every image), a held-out `holdout_fraction`, or both pooled.
# auto: both for PatchCore, loo for PaDiM, holdout for the trained methods (see FitConfig.calibration).
CALIBRATIONS = ("auto", "loo", "holdout", "both")
LOO_METHODS = ("exclude", "fold")
AUTO_CALIBRATION = {"patchcore": "both", "padim": "loo"}  # any other method: holdout

# (method, backbone) -> default layers. Lite0 stage strides: blocks.1 = 4, blocks.2 = 8, blocks.4 = 16.
DEFAULT_LAYERS: dict[tuple[str, str], list[str]] = {
    ("patchcore", "efficientnet_lite0"): ["blocks.2", "blocks.4"],
    ("padim", "efficientnet_lite0"): ["blocks.1", "blocks.2", "blocks.4"],
    ("patchcore", "wide_resnet50_2"): ["layer2", "layer3"],
    ("padim", "wide_resnet50_2"): ["layer1", "layer2", "layer3"],
    # STFPM: the paper matches ResNet18's layer1-3 (strides 4, 8, 16); Lite0's stages at those strides.
    ("stfpm", "efficientnet_lite0"): ["blocks.1", "blocks.2", "blocks.4"],
    ("stfpm", "wide_resnet50_2"): ["layer1", "layer2", "layer3"],
    # Feature AE: PatchCore's locally aware stride-8 + stride-16 embedding, reconstructed per position.
    ("feature_ae", "efficientnet_lite0"): ["blocks.2", "blocks.4"],
    ("feature_ae", "wide_resnet50_2"): ["layer2", "layer3"],
}
# Training (trained methods): epochs at most, Adam learning rate. Sized so that bottle (209 images at
# 256 px) trains in <= 10 minutes on a 2-core CPU (README, benchmarks/results/trained_accuracy_cpu.json).
DEFAULT_MAX_EPOCHS = {"stfpm": 30, "feature_ae": 300}
DEFAULT_LEARNING_RATE = {"stfpm": 1e-3, "feature_ae": 1e-3}
# PaDiM channel subset per backbone: the paper takes 100 of ResNet18's 448 and 550 of WRN50's 1792;
# Lite0 keeps all 176 of blocks.1+2+4 (bottle image AUROC 0.999 vs 0.996 with 100 of them).
DEFAULT_PADIM_FEATURES = {"efficientnet_lite0": 176, "wide_resnet50_2": 550}
# PaDiM covariance regulariser (covariance + eps * I) per backbone. The paper's 0.01 was set for ResNet
# features. Lite0's stage outputs (linear bottlenecks, BN folded, no ReLU) have per-channel variances of
# ~2-14 (bottle) and ~30-70 (pcb), so 0.01 leaves 176-dim covariances from a few hundred images almost
# unregularised and the distance dominated by their smallest, noisiest eigenvalues. eps = 1 (measured,
# bf16, all 176 channels): pcb image AUROC 0.620 -> 0.673, bottle 0.999 -> 1.000, pixel AUROC and AUPRO
# up on both; flat for eps 1-3 (pcb 0.673-0.676). Backbones not listed keep the paper's 0.01.
DEFAULT_COVARIANCE_EPS = {"efficientnet_lite0": 1.0, "wide_resnet50_2": 0.01}
# Tiles per method (0 = whole-image squash). PaDiM keeps one Gaussian per position of a fixed frame,
# which tiles of images of varying shapes do not have, so it stays whole-image.
# The trained methods are trained and scored on whole images (one input size), like PaDiM.
DEFAULT_TILE_SIZE = {"patchcore": 512, "padim": 0, "stfpm": 0, "feature_ae": 0}
# PatchCore's bank: 10% of the training patches at a 256 px input (32 x 32 patches per image). The bank
# needs to cover the normal patches, not to sample them at a fixed rate: at 4x the patches per image
# (512 px) neighbouring patches overlap more and the same bank size covers them, so the default ratio
# keeps the bank size per image constant: 0.1 * (256 / model input side)^2, and 0.1 below 256 px.
DEFAULT_CORESET_RATIO, CORESET_REFERENCE_SIDE = 0.1, 256
DEFAULT_INPUT_SIZE = 256  # whole-image models


@dataclass
class FitConfig:
    """Everything a fit needs; saved into model.json so a model says how it was made."""

    method: str = "patchcore"
    backbone: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=list)  # empty -> DEFAULT_LAYERS
    weights: str | None = None  # backbone weights file; required for wide_resnet50_2
    # The model's square input side: a whole-image model squashes every image to it; a tiled model's
    # input is one tile. 0 = the tile size, or 256 for whole-image models. Setting it (and not
    # tile_size) asks for a whole-image model of that input.
    input_size: int = 0
    # Tiling (engine/tiling.py). tile_size > 0: the image is resized by image_scale (0 = auto: its
    # short side to tile_size; 1 = native) and cut into tile_size x tile_size windows overlapping by
    # tile_overlap; their patch grids are stitched into one grid per image and the map keeps the
    # image's aspect ratio, long side at most map_size. tile_size 0: whole-image squash (input_size).
    # -1 = the method's default (DEFAULT_TILE_SIZE).
    tile_size: int = -1
    tile_overlap: float = 0.25
    image_scale: float = 0.0
    map_size: int = 1024
    # The fit keeps at most this many training patches: beyond it, a seeded sample of the tiles.
    max_train_patches: int = 2_000_000
    # PatchCore
    coreset_ratio: float = 0.0  # 0 = auto: DEFAULT_CORESET_RATIO at 256 x 256 patches' density (see resolved)
    projection_dim: int = 128  # random projection used only to select the coreset
    # Above this many training patches the coreset picks from every s-th row and column of each
    # patch grid (the smallest s that brings them under it): exact greedy k-center among those
    # candidates, 4x faster at s = 2. 0 = always among all rows (the exact greedy on everything).
    # A quarter of max_train_patches, so the default fit thins to s = 2 at most: pcb's 400 images at
    # 512 px (1.64 M patches), covering radius over all patches 38.4 at s = 2, 41.1 at s = 3 (exact
    # greedy over all: ~29; benchmarks/results/coreset_thinning_pcb512_400.json).
    coreset_candidates: int = 500_000
    num_neighbors: int = 9  # reweighting neighbourhood of the image score
    # Per-layer column weights, so that each layer carries the same share of
    #   nearest: the squared distances from training patches to their nearest coreset entry (what
    #            patch scores measure); the coreset is then selected again in the weighted space
    #   variance: the training patches' total variance
    #   none:    raw concatenation (anomalib's; the official PatchCore code gives layers equal dimensions)
    # Lite0, pcb image AUROC none / variance / nearest: 0.702 / 0.705 / 0.728, bottle 1.000 for all.
    layer_balance: str = "nearest"
    # PaDiM
    padim_features: int = 0  # 0 -> DEFAULT_PADIM_FEATURES[backbone]
    covariance_eps: float = -1.0  # < 0 -> DEFAULT_COVARIANCE_EPS[backbone]
    # both
    blur_sigma: float = 4.0
    # loo: every image in the fit, the threshold from leave-one-out scores of `loo_images` of them;
    # holdout / both: `holdout_fraction` of the images kept out of the fit (and, both, pooled with LOO).
    # auto: PaDiM loo (its rank-one downdate is exactly a fit without the image); PatchCore both (its
    # leave-one-out scores run higher than new images': a bank built with an image picked no rows near
    # its patches from the other images, so removing its rows leaves a hole; the hold-out part is
    # exchangeable with new images by construction and the pool is large enough for 1%; pcb at 5%:
    # loo flags 2.3% of the normal test images, both 4.0%); trained methods holdout (no
    # leave-one-out for a network).
    calibration: str = "auto"
    loo_images: int = 100  # training images scored leave-one-out (a seeded subset; 100 certifies 1%); 0 = all
    # How PatchCore scores its `loo_images` out of sample (loo / both); PaDiM's downdate is exact.
    #   exclude: each image against the bank without its own rows (exact, no extra fit time).
    #   fold:    the images (at most half) fitted last: the bank is selected on the others, the greedy
    #            continued over the fold; the fold is scored against the bank without it, exactly a
    #            hold-out of a bank of fewer images (pcb: its scores run higher still than exclude's).
    # (A third, "repair", also re-covering the hole from the other images' patches, changed 4 of 100
    # bottle scores and no pcb false-alarm count at +35 s of bottle fit: measured and dropped.)
    loo_method: str = "exclude"
    holdout_fraction: float = 0.1  # normal images kept out of the fit (calibration holdout / both)
    target_false_alarm_rate: float = 0.01
    # Trained methods (stfpm, feature_ae): Adam on mini-batches of `batch_size` images, at most
    # `max_epochs` (0 = DEFAULT_MAX_EPOCHS), stopping when the hold-out images' loss has not improved
    # for `patience` epochs (best epoch kept); learning_rate 0 = DEFAULT_LEARNING_RATE.
    max_epochs: int = 0
    patience: int = 5
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    # Backbone arithmetic. auto: bf16 (fp32 accumulation) where the hardware has it natively (CUDA,
    # CPUs with AVX512-BF16 or AMX), else fp32. A fit records the resolved value; scans use it.
    precision: str = "auto"

    def resolved(self) -> FitConfig:
        """A copy with defaults that depend on other keys filled in, validated."""
        cfg = dataclasses.replace(self, layers=list(self.layers))
        if not cfg.layers:
            cfg.layers = list(DEFAULT_LAYERS.get((cfg.method, cfg.backbone), []))
        if cfg.method == "padim" and cfg.padim_features <= 0:
            cfg.padim_features = DEFAULT_PADIM_FEATURES.get(cfg.backbone, 100)
        if cfg.calibration == "auto":
            cfg.calibration = AUTO_CALIBRATION.get(cfg.method, "holdout")
        if cfg.method in TRAINED_METHODS:
            cfg.max_epochs = cfg.max_epochs or DEFAULT_MAX_EPOCHS[cfg.method]
            cfg.learning_rate = cfg.learning_rate or DEFAULT_LEARNING_RATE[cfg.method]
        if cfg.covariance_eps < 0:
            cfg.covariance_eps = DEFAULT_COVARIANCE_EPS.get(cfg.backbone, 0.01)
        if cfg.tile_size < 0:  # the method's default, unless a whole-image input size was asked for
            cfg.tile_size = 0 if cfg.input_size else DEFAULT_TILE_SIZE.get(cfg.method, 0)
        if cfg.tile_size > 0:
            if cfg.input_size and cfg.input_size != cfg.tile_size:
                raise ConfigError(
                    f"input_size {cfg.input_size} and tile_size {cfg.tile_size} disagree: a tiled model's input is one "
                    "tile; set one of them, or tile_size 0 for a whole-image model"
                )
            cfg.input_size = cfg.tile_size
        cfg.input_size = cfg.input_size or DEFAULT_INPUT_SIZE
        if cfg.coreset_ratio <= 0:
            density = min(1.0, (CORESET_REFERENCE_SIDE / cfg.input_size) ** 2)
            cfg.coreset_ratio = DEFAULT_CORESET_RATIO * density
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from engine.features.backbones import check_layers, get_spec

        _choice("method", self.method, METHODS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("layer_balance", self.layer_balance, LAYER_BALANCES)
        _choice("calibration", self.calibration, CALIBRATIONS)
        _choice("loo_method", self.loo_method, LOO_METHODS)
        _range("loo_images", self.loo_images, 0, 10**9)
        spec = get_spec(self.backbone)
        check_layers(spec, self.layers)
        if spec.needs_weights_file and not self.weights:
            from engine.errors import WeightsError

            raise WeightsError(
                f"{self.backbone} needs ImageNet weights from a file you supply: pass --weights PATH "
                "(torchvision's state dict, .pth or .safetensors) or set `weights:` in the config"
            )
        _range("input_size", self.input_size, 32, 4096)
        _range("tile_size", self.tile_size, 0, 4096)
        _range("tile_overlap", self.tile_overlap, 0.0, 0.75)
        _range("image_scale", self.image_scale, 0.0, 16.0)
        _range("map_size", self.map_size, 16, 16384)
        _range("max_train_patches", self.max_train_patches, 1000, 10**9)
        _range("coreset_ratio", self.coreset_ratio, 1e-6, 1.0)
        _range("projection_dim", self.projection_dim, 0, 100_000)
        _range("coreset_candidates", self.coreset_candidates, 0, 10**10)
        _range("num_neighbors", self.num_neighbors, 1, 1000)
        _range("blur_sigma", self.blur_sigma, 0.0, 100.0)
        _range("holdout_fraction", self.holdout_fraction, 0.0, 0.9)
        _range("target_false_alarm_rate", self.target_false_alarm_rate, 0.0, 0.5)
        _range("batch_size", self.batch_size, 1, 4096)
        _range("covariance_eps", self.covariance_eps, 0.0, 1e6)
        if self.input_size % 32:
            raise ConfigError(f"input_size must be a multiple of 32 (backbone strides), got {self.input_size}")
        if self.tile_size % 32:
            raise ConfigError(f"tile_size must be 0 or a multiple of 32 (backbone strides), got {self.tile_size}")
        _range("max_epochs", self.max_epochs, 0, 100_000)
        _range("patience", self.patience, 1, 100_000)
        _range("learning_rate", self.learning_rate, 0.0, 10.0)
        _range("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.method in TRAINED_METHODS:
            if self.calibration != "holdout":
                raise ConfigError(
                    f"calibration {self.calibration!r} does not apply to method {self.method}: leave-one-out scores of "
                    "a trained network would need one training run per image; use calibration holdout"
                )
            if self.holdout_fraction <= 0:
                raise ConfigError(
                    f"method {self.method} needs holdout_fraction > 0: the held-out normal images stop the training "
                    "and set the threshold"
                )
            if self.tile_size:
                raise ConfigError(
                    f"tile_size must be 0 for method {self.method}: it is trained and scored on whole images "
                    "squashed to input_size; use method patchcore to tile"
                )
        if self.tile_size and self.method == "padim":
            raise ConfigError(
                "tile_size must be 0 for method padim: PaDiM keeps one Gaussian per position of a fixed frame, "
                "which tiles of images of different shapes do not share; use method patchcore to tile"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _range(key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{key} must be a number in [{lo}, {hi}], got {value!r}")


FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(FitConfig)}


def config_from_dict(values: dict[str, Any], base: FitConfig | None = None) -> FitConfig:
    """Apply `values` over `base` (default FitConfig); unknown keys and wrong types are errors."""
    cfg = dataclasses.replace(base) if base is not None else FitConfig()
    for key, value in values.items():
        if key == "balance_layers" and isinstance(value, bool):  # model.json files of vade 0.1
            key, value = "layer_balance", "variance" if value else "none"
        if key not in FIELD_TYPES:
            raise ConfigError(f"unknown config key {key!r}; allowed keys: {sorted(FIELD_TYPES)}")
        default = getattr(FitConfig(), key)
        if isinstance(default, bool) or value is None:
            pass
        elif isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif key == "layers":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"layers must be a list of layer names, got {value!r}")
        setattr(cfg, key, value)
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Config from a YAML file (flat keys, or under a top-level `fit:`), then overrides, resolved."""
    cfg = FitConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, found {type(data).__name__}")
        data = data.get("fit", data)
        cfg = config_from_dict(data, cfg)
    if overrides:
        cfg = config_from_dict({k: v for k, v in overrides.items() if v is not None}, cfg)
    return cfg.resolved()
