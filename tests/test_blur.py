"""Anomaly maps: the operator form of upsample + blur is the direct computation, to float32 rounding."""

import pytest
import torch

from engine.features.maps import grid_to_map, grid_to_map_direct


@pytest.mark.parametrize(("h", "w", "size", "sigma"), [(32, 32, 256, 4.0), (64, 64, 256, 4.0), (7, 5, 64, 4.0),
                                                       (8, 8, 32, 4.0), (16, 16, 128, 0.0), (3, 3, 20, 1.5)])
def test_operator_matches_direct_float64(h: int, w: int, size: int, sigma: float) -> None:
    grid = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w)) * 20
    fast = grid_to_map(grid, size, sigma)
    ref = grid_to_map_direct(grid.double(), size, sigma)
    assert fast.shape == (3, size, size) and fast.dtype == torch.float32
    assert torch.allclose(fast.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_blur_spreads_a_peak_and_keeps_mass() -> None:
    grid = torch.zeros(1, 32, 32)
    grid[0, 16, 16] = 1.0
    flat = grid_to_map(torch.ones(1, 32, 32), 256, 4.0)
    peak = grid_to_map(grid, 256, 4.0)
    assert torch.allclose(flat, torch.ones_like(flat), atol=1e-5)  # constants stay constant
    assert peak.argmax() == peak[0].flatten().argmax() and 0 < float(peak.max()) < 1.0
    assert float(peak.sum()) == pytest.approx(64.0, rel=1e-3)  # 8 x 8 pixels per cell, mass kept
