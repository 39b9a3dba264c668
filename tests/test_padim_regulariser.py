"""PaDiM's covariance regulariser: per-backbone default, explicit values kept, and it reaches the fit."""

import pytest
import torch

from engine.config import DEFAULT_COVARIANCE_EPS, load_config
from engine.models.padim import PaDiM


def test_covariance_eps_defaults_per_backbone_and_explicit_values_win(tmp_path) -> None:
    assert load_config(overrides={"method": "padim"}).covariance_eps == DEFAULT_COVARIANCE_EPS["efficientnet_lite0"] == 1.0
    wrn = load_config(overrides={"method": "padim", "backbone": "wide_resnet50_2", "weights": str(tmp_path / "w.pth")})
    assert wrn.covariance_eps == 0.01  # the paper's value for ResNet features
    assert load_config(overrides={"method": "padim", "covariance_eps": 0}).covariance_eps == 0.0
    assert load_config(overrides={"method": "padim", "covariance_eps": 0.25}).covariance_eps == 0.25


@pytest.mark.parametrize("eps", [0.5, 4.0])
def test_fit_adds_eps_to_the_covariance(eps: float) -> None:
    """Feature maps that are the same in every image: covariance 0, so the precision is I / eps and a
    feature vector off the mean by delta in every channel sits at sqrt(D * delta^2 / eps)."""
    model = PaDiM(load_config(overrides={"method": "padim", "device": "cpu", "covariance_eps": eps, "input_size": 64}))
    shapes = [(c, 64 // s) for c, s in zip(model.extractor.channels, model.extractor.strides, strict=True)]
    gen = torch.Generator().manual_seed(0)
    normal = [torch.randn(1, c, g, g, generator=gen).expand(4, c, g, g) for c, g in shapes]
    model.fit_features(iter([normal]), 4)
    d = model.mean.shape[1]
    precision = model.precision[0]
    torch.testing.assert_close(precision, torch.eye(d) / eps, rtol=1e-4, atol=1e-5)
    dist = model.score_features([f[:1] + 0.5 for f in normal]).maps
    # the blur keeps a constant map constant
    torch.testing.assert_close(dist, torch.full_like(dist, (d * 0.25 / eps) ** 0.5), rtol=1e-3, atol=1e-3)
