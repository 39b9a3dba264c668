"""What every anomaly model shares: backbone, device, calibration, scoring entry point, metadata."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.artifact import save_model
from engine.calibration import Calibration
from engine.config import FitConfig
from engine.features.backbones import FeatureExtractor, build_extractor
from kernels._checks import cpu_native_bf16


@dataclass
class ScoreOutput:
    """Raw (unnormalised) results for a batch: one score and one input-sized map per image."""

    scores: torch.Tensor  # (B,) float32
    maps: torch.Tensor  # (B, S, S) float32


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

    # ---- the surface the pipeline uses

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

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
    def score(self, images: torch.Tensor) -> ScoreOutput:
        """Raw image scores and anomaly maps for a batch of preprocessed images."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"images must be {self.input_size}x{self.input_size}, got {tuple(images.shape)}")
        return self.score_features(self.features(images))

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
            "resize": "bilinear with antialias to input_size x input_size; aspect ratio not kept",
            "config": self.cfg.to_dict(),
            "fit": dict(self.fit_stats),
        }
        meta.update(self.extra_meta())
        if self.calibration is not None:
            meta["threshold"] = self.calibration.threshold
            meta["calibration"] = self.calibration.to_dict()
            meta["normal_score_quantiles"] = meta["calibration"]["normal_score_quantiles"]
        return meta

    # ---- what each method supplies

    @abstractmethod
    def fit_features(self, batches: Iterable[list[torch.Tensor]], n_images: int) -> None:
        """Learn the method's statistics from batches of backbone feature maps of normal images."""

    @abstractmethod
    def score_features(self, feature_maps: list[torch.Tensor]) -> ScoreOutput:
        """Raw scores and maps from backbone feature maps."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted statistics to save (CPU, contiguous)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the fitted statistics (already checked against model.json)."""

    def extra_meta(self) -> dict:
        return {}

    def prepare_scoring(self) -> None:
        """Build any shared scoring state ahead of concurrent `score_features` calls (default: none)."""

    def save(self, model_dir: str | Path) -> Path:
        """Write MODEL_DIR/model.safetensors + model.json (engine.artifact)."""
        return save_model(self, model_dir)
