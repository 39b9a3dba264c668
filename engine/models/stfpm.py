"""STFPM (Wang, Han, Chen, Hu, 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection").

teacher: the registered pretrained backbone (frozen; Lite0's fused trunk by default).
student: the same architecture up to the deepest used stage, randomly initialised (seeded), trained
         on the normal images so that its feature maps match the teacher's at the used stages
         (Lite0: blocks.1, blocks.2, blocks.4 at strides 4, 8, 16, the paper's ResNet18 layer1-3).
loss:    per stage, both maps L2-normalised over channels, 0.5 * ||t - s||^2 averaged over positions;
         summed over stages (the paper's loss).
map:     per stage 0.5 * ||t - s||^2 per position (in [0, 2]), each upsampled bilinearly to the finest
         stage's grid, multiplied across stages (the paper's product: an anomaly must disagree at
         every scale), then upsampled to the input and blurred (sigma 4) like the other methods;
         image score = max of the map. (The paper multiplies at image resolution; upsampling the
         product of grid-level maps is the same up to interpolation order, and one small GEMM pair.)
scan:    the student is BatchNorm-folded into the teacher's fused trunk after training, so both run per
         fixed micro-batch on one thread, each image independently of its batch: bitwise results for
         any scan batch size.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelFileError
from engine.features.backbones import FeatureExtractor, build_student
from engine.features.maps import grid_to_map
from engine.models.base import ScoreOutput
from engine.models.training import BatchHook, TrainedModel, autocast_for, train_network


def stage_discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps -> (B, h, w): 0.5 * squared distance of the channel-L2-normalised vectors."""
    t = F.normalize(teacher.float(), dim=1)
    s = F.normalize(student.float(), dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1)


class STFPM(TrainedModel):
    method = "stfpm"

    def __init__(self, cfg, device="cpu", extractor=None):  # noqa: ANN001 - the base signature
        super().__init__(cfg, device, extractor)
        torch.manual_seed(self.cfg.seed)  # the student's random initialisation
        self.student_net = build_student(self.cfg.backbone, self.cfg.layers)
        self.student: FeatureExtractor | None = None

    # ---- the network being trained: normalise, student trunk

    def _trainable(self) -> FeatureExtractor:
        return FeatureExtractor(self.extractor.spec, self.cfg.layers, self.student_net).to(
            self.device, memory_format=torch.channels_last)

    def _freeze(self) -> None:
        """The inference student: BatchNorm folded, frozen, channels_last on the model's device."""
        self.student_net.eval()
        trunk = self.student_net.inference()
        self.student = FeatureExtractor(self.extractor.spec, self.cfg.layers, trunk).eval().to(
            self.device, memory_format=torch.channels_last)
        for p in self.student.parameters():
            p.requires_grad_(False)

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return super().features(images)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher maps followed by student maps, one per used stage each."""
        if self.student is None:
            raise RuntimeError("the STFPM student is not trained yet")
        teacher = self.teacher_features(images)
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device, self.cfg.precision):
            student = [f.float() for f in self.student(x)]
        return [*teacher, *student]

    # ---- fit

    def fit_images(self, train: torch.Tensor, holdout: torch.Tensor, on_batch: BatchHook | None = None) -> None:
        t0 = time.perf_counter()
        targets = self._targets(train)
        held = [holdout, *self._targets(holdout)] if holdout.shape[0] else None
        t1 = time.perf_counter()
        net = self._trainable()

        def loss_fn(module: nn.Module, images: torch.Tensor, *teacher: torch.Tensor) -> torch.Tensor:
            student = module(images.contiguous(memory_format=torch.channels_last))
            return sum(stage_discrepancy(t, s).mean() for t, s in zip(teacher, student))  # type: ignore[return-value]

        record = train_network(net, loss_fn, [train, *targets], held, self.train_settings(), self.device, on_batch)
        self._freeze()
        self.fit_stats.update(training=record.to_dict(), training_images=int(train.shape[0]),
                              seconds_teacher=round(t1 - t0, 3), seconds_features=round(t1 - t0, 3),
                              seconds_training=round(time.perf_counter() - t1, 3))

    def _targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's maps of every image, made once (CPU float32)."""
        parts: list[list[torch.Tensor]] = []
        bs = self.cfg.batch_size
        for start in range(0, images.shape[0], bs):
            maps = self.teacher_features(images[start : start + bs])
            parts.append([m.float().cpu().contiguous() for m in maps])
        if not parts:
            return [torch.zeros(0) for _ in self.cfg.layers]
        return [torch.cat([p[k] for p in parts]) for k in range(len(self.cfg.layers))]

    # ---- score

    def score_features(self, feature_maps: list[torch.Tensor], loo_owner: torch.Tensor | None = None) -> ScoreOutput:
        if loo_owner is not None:
            raise ValueError("stfpm has no leave-one-out scores: it is a trained network (calibrate on held-out images)")
        n = len(feature_maps) // 2
        teacher, student = feature_maps[:n], feature_maps[n:]
        grid = teacher[0].shape[-2:]
        combined = None
        for t, s in zip(teacher, student):
            d = stage_discrepancy(t, s)
            if d.shape[-2:] != grid:
                d = F.interpolate(d.unsqueeze(1), size=grid, mode="bilinear", align_corners=False).squeeze(1)
            combined = d if combined is None else combined * d
        assert combined is not None
        maps = grid_to_map(combined, self.input_size, self.cfg.blur_sigma)
        return ScoreOutput(maps.amax(dim=(1, 2)).float(), maps.float())

    # ---- files

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"student.{k}": v.detach().cpu().contiguous() for k, v in self.student_net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        wanted = self.student_net.state_dict()
        given = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
        missing = sorted(set(wanted) - set(given))
        extra = sorted(set(given) - set(wanted))
        if missing or extra:
            raise ModelFileError(f"the student weights do not fit {self.cfg.backbone} up to {self.cfg.layers[-1]}: "
                                 f"missing {missing[:3]}, unexpected {extra[:3]}")
        for k, v in wanted.items():
            if tuple(given[k].shape) != tuple(v.shape) or given[k].dtype != v.dtype:
                raise ModelFileError(f"student tensor {k!r} is {given[k].dtype}{list(given[k].shape)}, "
                                     f"the architecture needs {v.dtype}{list(v.shape)}")
        self.student_net.load_state_dict(given, strict=True)
        self._freeze()
