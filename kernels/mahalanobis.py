"""Per-position Mahalanobis distance.

    mahalanobis(x[B, P, D], mean[P, D], precision[P, D, D]) -> dist[B, P] float32

dist[b, p] = sqrt((x[b,p] - mean[p])^T precision[p] (x[b,p] - mean[p])), not squared.
"""

from __future__ import annotations

import torch

from kernels._checks import use_triton


def _check(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> None:
    if x.dim() != 3 or mean.dim() != 2 or precision.dim() != 3:
        raise ValueError(
            f"expected x[B,P,D], mean[P,D], precision[P,D,D]; got {tuple(x.shape)}, "
            f"{tuple(mean.shape)}, {tuple(precision.shape)}"
        )
    b, p, d = x.shape
    if mean.shape != (p, d) or precision.shape != (p, d, d):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)} needs mean ({p}, {d}) and precision ({p}, {d}, {d}), "
            f"got {tuple(mean.shape)} and {tuple(precision.shape)}"
        )


def mahalanobis_torch(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Batched matmul per position: (P, B, D) @ (P, D, D), then a row-wise dot."""
    _check(x, mean, precision)
    diff = (x.float() - mean.float()).transpose(0, 1)  # (P, B, D)
    proj = torch.bmm(diff, precision.float())  # (P, B, D)
    d2 = (proj * diff).sum(dim=2).transpose(0, 1)  # (B, P)
    return d2.clamp_min_(0).sqrt_().contiguous()


def mahalanobis(
    x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Mahalanobis distance of every (image, position) feature to that position's Gaussian."""
    if use_triton(backend, x, mean, precision):
        raise NotImplementedError("the Triton Mahalanobis kernel is not built yet; use backend='torch'")
    return mahalanobis_torch(x, mean, precision)
