"""PaDiM takes the fused kernel's triangular path: the precision's Cholesky factor, made once."""

from __future__ import annotations

import pytest
import torch

import kernels.mahalanobis as mahalanobis
from engine.config import load_config
from engine.models.padim import PaDiM


def _fitted() -> tuple[PaDiM, list[torch.Tensor]]:
    model = PaDiM(load_config(overrides={"method": "padim", "device": "cpu", "input_size": 64}))
    shapes = [(c, 64 // s) for c, s in zip(model.extractor.channels, model.extractor.strides, strict=True)]
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(12, c, g, g, generator=gen) for c, g in shapes]
    model.fit_features(iter([maps]), 12)
    return model, [m[:2] for m in maps]


def test_the_kernel_path_gets_the_factor_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model, maps = _fitted()
    reference = model.score_features(maps).maps  # CPU tensors, backend auto: the torch path, no factor
    assert model.factor is None
    calls: list[torch.Tensor | None] = []
    made: list[int] = []
    real_factor = mahalanobis.precision_factor

    def spy(x, mean, precision, *, backend="auto", factor=None):  # noqa: ANN001, ANN202
        calls.append(factor)
        return mahalanobis.mahalanobis_torch(x, mean, precision)  # the interpreter is too slow for 4 x 256 x 176^2

    monkeypatch.setattr(mahalanobis, "mahalanobis", spy)
    monkeypatch.setattr(mahalanobis, "precision_factor", lambda p: made.append(1) or real_factor(p))
    model.kernel_backend = "triton"  # what auto means for CUDA tensors
    for _ in range(2):
        torch.testing.assert_close(model.score_features(maps).maps, reference)
    assert len(made) == 1 and len(calls) == 2 and all(f is calls[0] for f in calls)
    factor = calls[0]
    assert factor is not None and factor.shape == model.precision.shape
    assert torch.equal(factor, factor.tril())
    torch.testing.assert_close(factor @ factor.transpose(1, 2), model.precision, rtol=1e-4, atol=1e-5)
