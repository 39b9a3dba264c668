"""Anomaly-map post-processing: upsample a patch grid to the input size and Gaussian-blur it."""

from __future__ import annotations


import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian, radius 4 sigma (the usual truncation, as in scipy and the peers)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding; sigma <= 0 returns the input."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    pad_mode = "reflect" if min(maps.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def grid_to_map(grid_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, size, size) map: bilinear upsample, then Gaussian blur."""
    up = F.interpolate(grid_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


