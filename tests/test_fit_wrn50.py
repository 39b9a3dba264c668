"""WideResNet-50 PatchCore from a user's weights file: the 1536-dim path end to end, and broken weights."""

from pathlib import Path

import pytest
import torch

from engine.api import fit
from engine.config import FitConfig
from engine.errors import WeightsError
from engine.features.backbones import WideResNet50Trunk
from engine.inputs.datasets import train_images


def _weights_file(path: Path, broken: bool) -> Path:
    """Random but well-scaled torchvision-named weights (unit BN statistics); `broken`: one negative
    BN variance, so features come out NaN as from a corrupted file."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in WideResNet50Trunk(["layer2", "layer3"]).state_dict().items():
        if key.endswith("running_var"):
            value = torch.ones_like(value)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            value = torch.zeros_like(value)
        elif value.is_floating_point() and value.dim() == 4:  # conv: He-scaled
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        state[key] = value
    if broken:
        state["layer1.0.bn1.running_var"][0] = -1.0
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("broken", [False, True])
def test_wrn50_patchcore_fits_from_a_file(demo_root: Path, tmp_path: Path, broken: bool) -> None:
    weights = _weights_file(tmp_path / "wrn50.safetensors", broken)
    cfg = FitConfig(backbone="wide_resnet50_2", weights=str(weights), input_size=64, coreset_ratio=0.25,
                    device="cpu", precision="fp32")
    images = train_images(demo_root, "weave")[:8]
    if broken:
        with pytest.raises(WeightsError, match="layer2 produced NaN or infinite features.*wrn50.safetensors"):
            fit(images, cfg)
        return
    model = fit(images, cfg)
    assert model.bank.shape[1] == 512 + 1024
    w2, w3 = model.meta["fit"]["layer_weights"]
    assert w2 * w3 == pytest.approx(1.0, rel=1e-3) and w2 != w3  # nearest balance on 1536 dims
    assert torch.isfinite(model.score(torch.rand(2, 3, 64, 64)).scores).all()
