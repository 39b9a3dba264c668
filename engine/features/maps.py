"""Anomaly-map post-processing: upsample a patch grid to the input size and Gaussian-blur it.

Both steps are linear and separable, so for an h x w grid the whole map is A_h @ scores @ A_w^T with
A = blur(upsample(identity)), a (size x h) matrix made once per shape in float64. Two small GEMMs per
image replace a 33-tap convolution over size x size pixels: 0.3 ms instead of ~8 ms per 256 px map on
one CPU core, and the same function (tests/test_blur.py checks it against the direct float64 path).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine import timing


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius 4 sigma (the usual truncation, as in scipy and the peers)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _pad_mode(length: int, radius: int) -> str:
    return "reflect" if length > radius else "replicate"


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding; sigma <= 0 returns the input."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    pad_mode = _pad_mode(min(maps.shape[-2:]), r)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=pad_mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=pad_mode), k.view(1, 1, -1, 1))
    return x.squeeze(1)


@functools.lru_cache(maxsize=32)
def map_operator(cells: int, size: int, sigma: float, device: str = "cpu") -> torch.Tensor:
    """(size, cells) float32: column i is grid cell i's row of ones, bilinearly upsampled (align_corners
    False) to `size` and Gaussian-blurred (radius 4 sigma, reflect padding), computed in float64."""
    eye = torch.eye(cells, dtype=torch.float64).unsqueeze(1)  # (cells, 1, cells): row i = e_i
    up = F.interpolate(eye, size=size, mode="linear", align_corners=False)  # (cells, 1, size)
    if sigma > 0:
        k = gaussian_kernel1d(sigma, dtype=torch.float64)
        r = k.numel() // 2
        # The 2-D blur pads both axes by the mode its (square) output allows; do the same per axis.
        up = F.conv1d(F.pad(up, (r, r), mode=_pad_mode(size, r)), k.view(1, 1, -1))
    return up[:, 0, :].T.contiguous().float().to(device)


def grid_to_map(grid_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, size, size) map: bilinear upsample, then Gaussian blur."""
    _, h, w = grid_scores.shape
    dev = str(grid_scores.device)
    with timing.span("map"):
        rows, cols = map_operator(h, size, sigma, dev), map_operator(w, size, sigma, dev)
        return torch.matmul(torch.matmul(rows, grid_scores.float()), cols.T)


def grid_to_map_direct(grid_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The same map by upsampling and convolving the full-size image (the reference for tests)."""
    up = F.interpolate(grid_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


@functools.lru_cache(maxsize=64)
def crop_map_operator(cells: int, stride: int, extent: int, out: int, sigma: float, device: str = "cpu") -> torch.Tensor:
    """(out, cells) float32 for a grid of `cells` stride-pixel cells whose first `extent` pixels are the
    image: map pixel y samples image coordinate (y + 0.5) * extent / out, interpolated linearly between
    cell centres (clamped at the ends, as align_corners=False upsampling is), then Gaussian-blurred
    with sigma scaled to map pixels (reflect padding). When the grid covers exactly the image and the
    map has the image's size, this is map_operator itself."""
    if cells * stride == extent == out:
        return map_operator(cells, out, sigma, device)
    pos = (torch.arange(out, dtype=torch.float64) + 0.5) * (extent / out) / stride - 0.5
    pos = pos.clamp(0, cells - 1)
    low = pos.floor().long().clamp(max=cells - 1)
    high = (low + 1).clamp(max=cells - 1)
    frac = pos - low
    up = torch.zeros((out, cells), dtype=torch.float64)
    up[torch.arange(out), low] += 1.0 - frac
    up[torch.arange(out), high] += frac
    map_sigma = sigma * out / extent
    if map_sigma > 0:
        k = gaussian_kernel1d(map_sigma, dtype=torch.float64)
        r = k.numel() // 2
        cols = up.T.unsqueeze(1)  # (cells, 1, out)
        up = F.conv1d(F.pad(cols, (r, r), mode=_pad_mode(out, r)), k.view(1, 1, -1))[:, 0, :].T
    return up.contiguous().float().to(device)


def grid_to_image_map(grid: torch.Tensor, stride: int, extent: tuple[int, int], out: tuple[int, int], sigma: float) -> torch.Tensor:
    """(h, w) patch scores of a grid whose top-left `extent` (pixels) is the image -> (out_h, out_w) map."""
    dev = str(grid.device)
    rows = crop_map_operator(grid.shape[0], stride, extent[0], out[0], sigma, dev)
    cols = crop_map_operator(grid.shape[1], stride, extent[1], out[1], sigma, dev)
    return rows @ grid.float() @ cols.T
