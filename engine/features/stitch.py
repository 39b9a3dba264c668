"""Stitching tiles' patch grids into one grid per image (engine/tiling.py gives the geometry).

Overlapping tiles are blended on the patch grid, not as finished maps: each tile's cells are weighted
by a tent that is 1 at the tile's border cells and grows by 1 per cell inward (features near a tile's
border see its padding, those in the middle see real context), and every global cell is the weighted
mean of the tiles that cover it. One tile covering the image is taken as it is (no arithmetic), so
stitching then equals whole-image scoring.
"""

from __future__ import annotations

import torch

from engine.tiling import TileLayout


def tent(cells: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(cells, cells) weights: min(distance to the nearest tile edge) + 1 per axis, multiplied."""
    ramp = torch.arange(cells, dtype=torch.float32, device=device)
    one = torch.minimum(ramp + 1, cells - ramp)
    return one[:, None] * one[None, :]


class GridStitcher:
    """Accumulates one image's tiles (any order), then gives its stitched grids."""

    def __init__(self, layout: TileLayout):
        self.layout = layout
        self.seen = 0
        self._single: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None

    def add(self, index: int, grids: torch.Tensor) -> None:
        """Tile `index`'s grids, (channels, tile_cells, tile_cells), on any one device."""
        self.seen += 1
        if self.layout.n_tiles == 1:
            self._single = grids
            return
        if self._sum is None:
            gh, gw = self.layout.grid_shape
            self._sum = grids.new_zeros((grids.shape[0], gh, gw))
            self._weight = grids.new_zeros((gh, gw))
            self._tent = tent(self.layout.tile_cells, grids.device)
        y0, x0 = self.layout.origin(index)
        stride, cells = self.layout.spec.stride, self.layout.tile_cells
        cy, cx = y0 // stride, x0 // stride
        self._sum[:, cy : cy + cells, cx : cx + cells] += grids * self._tent
        self._weight[cy : cy + cells, cx : cx + cells] += self._tent

    @property
    def complete(self) -> bool:
        return self.seen == self.layout.n_tiles

    def result(self) -> torch.Tensor:
        """(channels, gh, gw) stitched grids over the padded image."""
        if not self.complete:
            raise RuntimeError(f"{self.seen} of {self.layout.n_tiles} tiles stitched")
        if self._single is not None:
            return self._single
        assert self._sum is not None
        return self._sum / self._weight
