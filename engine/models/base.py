"""What every anomaly model shares: backbone, device, calibration, scoring entry point, metadata."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.artifact import save_model
from engine.calibration import Calibration
from engine.config import FitConfig
from engine.features.backbones import FeatureExtractor, build_extractor
from engine.features.maps import grid_to_image_map
from engine.tiling import TileLayout, TileSpec
from kernels._checks import cpu_native_bf16


@dataclass
class ScoreOutput:
    """Raw (unnormalised) results for a batch: one score and one input-sized map per image."""

    scores: torch.Tensor  # (B,) float32
    maps: torch.Tensor  # (B, S, S) float32


@dataclass
class ImageOutput:
    """Raw results for one tiled image: its score and its map at the layout's map shape."""

    score: torch.Tensor  # () float32
    map: torch.Tensor  # (map_h, map_w) float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 natively (tensor cores; AVX512-BF16 or AMX on CPUs)."""
    return device.type == "cuda" or cpu_native_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device has native bf16 arithmetic, else fp32."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


class AnomalyModel(ABC):
    """A fitted (or being fitted) model. Subclasses add their statistics and the scoring rule."""

    method: str = ""
    # Whether the fit can take its calibration images last (`loo_method: fold`, PatchCore), so that
    # `out_of_sample(images, as_group=True)` scores them as a hold-out.
    fits_fold_last: bool = False

    def __init__(self, cfg: FitConfig, device: torch.device | str = "cpu", extractor: FeatureExtractor | None = None):
        self.device = torch.device(device)
        # The resolved precision is part of the model: a fit records it, every later scan uses it
        # (on hardware without native bf16 that is slower, never a different function).
        self.cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, self.device))
        # channels_last on every device: depthwise and 1x1 convs run about 1.7x faster on CPUs too.
        extractor = extractor or build_extractor(cfg.backbone, cfg.layers, cfg.weights)
        self.extractor = extractor.to(self.device, memory_format=torch.channels_last)
        self.calibration: Calibration | None = None
        self.fit_stats: dict = {}
        # Makes a progress bar (total, label) with `advance(n)` and `close()` for long fit steps
        # (engine.api.fit sets one when it reports progress); None: nothing drawn.
        self.step_bar: Callable[[int, str], Any] | None = None
        # What was done to the model, oldest first: {"event": fitted | calibrated | updated, "when",
        # "images", "vade_version", ...}; saved in model.json, so a file's scores stay explainable.
        self.history: list[dict] = []
        # Owner ids of the training images the fit's threshold will come from, set before the fit so
        # that it can prepare their out-of-sample scoring (PatchCore); emptied after the calibration.
        self.calibration_images: tuple[int, ...] = ()

    # ---- the surface the pipeline uses

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def tile_spec(self) -> TileSpec | None:
        """How this model tiles images; None for a whole-image (squash) model."""
        if not self.cfg.tile_size:
            return None
        strides = self.extractor.strides
        return TileSpec(
            self.cfg.tile_size, self.cfg.tile_overlap, self.cfg.image_scale, max(strides), strides[0], self.cfg.map_size
        )

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise RuntimeError("model is not calibrated yet")
        return self.calibration.threshold

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw scores or maps -> the scale users see, where 0.5 is the threshold."""
        if self.calibration is None:
            raise RuntimeError("model is not calibrated yet")
        return self.calibration.normalize(raw)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps for (B, 3, S, S) images in [0, 1]."""
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.cfg.precision != "bf16":
            return self.extractor(x)
        # bf16 operands, fp32 accumulation: 2.3x faster on AVX512-BF16 CPUs than fp32, same AUROCs
        # (bottle and pcb PaDiM within 0.001; benchmarks/results/fit_accuracy_cpu.json).
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return [f.float() for f in self.extractor(x)]

    @torch.inference_mode()
    def score(self, images: torch.Tensor, loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        """Raw image scores and anomaly maps for a batch of preprocessed images; `loo_owner` (B,):
        the images are training images with these owner ids, scored leave-one-out."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"images must be {self.input_size}x{self.input_size}, got {tuple(images.shape)}")
        if loo_owner is None:
            return self.score_features(self.features(images))
        return self.score_features(self.features(images), loo_owner)

    @torch.inference_mode()
    def score_tiles(self, images: torch.Tensor, loo_owner: torch.Tensor | None = None) -> torch.Tensor:
        """Raw patch-level grids of a batch of tiles, (B, C, h, w) float32: channel 0 the patch
        scores, further channels what `finish_tiled` needs (stitched like the scores); `loo_owner`
        (B,): leave-one-out, as in `score`."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"tiles must be {self.input_size}x{self.input_size}, got {tuple(images.shape)}")
        if loo_owner is None:
            return self.tile_grids(self.features(images))
        return self.tile_grids(self.features(images), loo_owner)

    def tile_grids(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{self.method} does not score tiles")

    def finish_tiled(self, stitched: torch.Tensor, layout: TileLayout) -> ImageOutput:
        """Image score and map from an image's stitched grids (C, gh, gw): the map is the patch
        scores upsampled and blurred onto the image; the score is the max patch score over the
        cells inside the image, times channel 1 at that cell where the method supplies one."""
        valid_h, valid_w = layout.valid_cells
        scores = stitched[0, :valid_h, :valid_w].reshape(-1)
        worst = int(scores.argmax())
        score = scores[worst]
        if stitched.shape[0] > 1:
            score = score * stitched[1, :valid_h, :valid_w].reshape(-1)[worst]
        amap = grid_to_image_map(
            stitched[0], layout.spec.stride, (layout.scaled_h, layout.scaled_w), (layout.map_h, layout.map_w),
            self.cfg.blur_sigma,
        )
        return ImageOutput(score.float(), amap)

    @property
    def meta(self) -> dict:
        """JSON-able description: how the model was made and what it holds."""
        spec = self.extractor.spec
        meta = {
            "method": self.method,
            "backbone": self.cfg.backbone,
            "layers": list(self.cfg.layers),
            "input_size": self.input_size,
            "normalization": {"mean": list(spec.mean), "std": list(spec.std), "range": "[0, 1] RGB"},
            "resize": self._resize_policy(),
            "config": self.cfg.to_dict(),
            "fit": dict(self.fit_stats),
            "history": [dict(event) for event in self.history],
        }
        meta.update(self.extra_meta())
        if self.calibration is not None:
            meta["threshold"] = self.calibration.threshold
            meta["calibration"] = self.calibration.to_dict()
            meta["normal_score_quantiles"] = meta["calibration"]["normal_score_quantiles"]
        return meta

    def _resize_policy(self) -> str:
        if not self.cfg.tile_size:
            return "bilinear with antialias to input_size x input_size; aspect ratio not kept"
        scale = "short side to tile_size" if self.cfg.image_scale <= 0 else f"x{self.cfg.image_scale:g}"
        return (f"resized ({scale}, bilinear with antialias), then tiles of {self.cfg.tile_size} px overlapping "
                f"by {self.cfg.tile_overlap:g}; aspect ratio kept")

    # ---- what each method supplies

    @abstractmethod
    def fit_features(
        self, batches: Iterable[list[torch.Tensor]], n_images: int, owners: Sequence[int] | None = None
    ) -> None:
        """Learn the method's statistics from batches of backbone feature maps of normal images;
        `owners` (filled while `batches` is read): the training image of each image (tile) fed."""

    @abstractmethod
    def score_features(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        """Raw scores and maps from backbone feature maps; with `loo_owner` the images are training
        images (owner ids as in the fit) scored leave-one-out, without their own contribution."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted statistics to save (CPU, contiguous)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the fitted statistics (already checked against model.json)."""

    def extra_meta(self) -> dict:
        return {}

    @contextmanager
    def out_of_sample(self, owners: Sequence[int], as_group: bool = False) -> Iterator[list[int]]:
        """The `loo_owner` ids that score training images `owners` out of sample; by default each
        leave-one-out (methods with `fits_fold_last` also score a fold as a group)."""
        yield list(owners)

    def prepare_scoring(self) -> None:
        """Build any shared scoring state ahead of concurrent `score_features` calls (default: none)."""

    def save(self, model_dir: str | Path) -> Path:
        """Write MODEL_DIR/model.safetensors + model.json (engine.artifact)."""
        return save_model(self, model_dir)
