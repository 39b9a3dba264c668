"""Patch embeddings built from backbone feature maps (components the models compose)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchcore_embedding(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore's locally aware patch features: (B, sum C, H0, W0) on the first (finest) map's grid.

    Each map is 3x3 average-pooled (stride 1) so a patch sees its neighbourhood; deeper maps are
    upsampled bilinearly to the finest grid; channels are concatenated.
    """
    grid = feature_maps[0].shape[-2:]
    parts = []
    for fmap in feature_maps:
        pooled = F.avg_pool2d(fmap, kernel_size=3, stride=1, padding=1)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        parts.append(pooled)
    return torch.cat(parts, dim=1)


def padim_embedding(feature_maps: list[torch.Tensor], channel_idx: torch.Tensor) -> torch.Tensor:
    """PaDiM's embedding: maps upsampled (nearest) to the finest grid, concatenated, then the fixed
    random channel subset kept. Returns (B, len(channel_idx), H0, W0)."""
    grid = feature_maps[0].shape[-2:]
    parts = [f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest") for f in feature_maps]
    return torch.cat(parts, dim=1).index_select(1, channel_idx.to(feature_maps[0].device))


def to_rows(embedding: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * H * W, C), row order image-major then row-major over the grid."""
    b, c, h, w = embedding.shape
    return embedding.permute(0, 2, 3, 1).reshape(b * h * w, c)
