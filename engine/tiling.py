"""Tile geometry: where the tiles of an image lie, how their patch grids join, what the map covers.

An image (height x width as decoded, EXIF orientation applied) is resized by `scale` (auto: its short
side to the tile size), then cut into tile x tile windows whose origins are multiples of `align` (the
deepest backbone stride, so every tile's patch cells fall on one global grid of `stride`-pixel cells).
Neighbouring windows overlap by about `overlap` of a tile (origins are spread evenly, then rounded).
Where the scaled image is smaller than a tile, or not a multiple of `align`, it is padded by mirroring
its last rows and columns, so an image smaller than a tile is padded, never refused.

    global cell (i, j) covers scaled-image pixels [i*stride, (i+1)*stride) x [j*stride, (j+1)*stride);
    tile t covers cells [cy, cy + tile/stride) x [cx, cx + tile/stride), cy = origin_y / stride.

The map keeps the image's aspect ratio: long side min(map_size, long side of the scaled image); map
pixel (y, x) covers image rows [y*height/map_h, (y+1)*height/map_h) and columns likewise, so resizing
the map to (height, width) overlays the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TileSpec:
    """How a model tiles images (from its config and backbone)."""

    tile: int  # model input side per tile, pixels
    overlap: float  # minimum overlap of neighbouring tiles, fraction of a tile
    scale: float  # image resize factor before tiling; 0 = auto (short side -> tile)
    align: int  # tile origins and padded extents are multiples of this (deepest stride)
    stride: int  # patch-grid stride of the finest layer
    map_size: int  # long side of stored maps at most

    def resolved_scale(self, height: int, width: int) -> float:
        return self.scale if self.scale > 0 else self.tile / min(height, width)

    def layout(self, height: int, width: int) -> TileLayout:
        """The tiles, grid and map of one image of `height` x `width` pixels."""
        scale = self.resolved_scale(height, width)
        scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
        ys = _origins(scaled_h, self.tile, self.overlap, self.align)
        xs = _origins(scaled_w, self.tile, self.overlap, self.align)
        long_side = max(scaled_h, scaled_w)
        shrink = min(1.0, self.map_size / long_side)
        map_h, map_w = max(1, round(scaled_h * shrink)), max(1, round(scaled_w * shrink))
        return TileLayout(self, height, width, scale, scaled_h, scaled_w, ys, xs, map_h, map_w)


def _origins(length: int, tile: int, overlap: float, align: int) -> tuple[int, ...]:
    """Tile origins along one axis: evenly spread over the padded extent, multiples of `align`."""
    padded = max(tile, -(-length // align) * align)
    if padded == tile:
        return (0,)
    step = tile * (1.0 - overlap)
    count = math.ceil((padded - tile) / step - 1e-9) + 1
    span = padded - tile  # a multiple of align: tile and padded both are
    return tuple(round(i * span / (count - 1) / align) * align for i in range(count))


@dataclass(frozen=True)
class TileLayout:
    spec: TileSpec
    height: int
    width: int
    scale: float
    scaled_h: int
    scaled_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    map_h: int
    map_w: int

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, index: int) -> tuple[int, int]:
        """(y, x) of tile `index` in the scaled image, row-major over the tiles."""
        row, col = divmod(index, len(self.xs))
        return self.ys[row], self.xs[col]

    @property
    def tile_cells(self) -> int:
        return self.spec.tile // self.spec.stride

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Cells of the global grid over the padded image."""
        return (self.ys[-1] + self.spec.tile) // self.spec.stride, (self.xs[-1] + self.spec.tile) // self.spec.stride

    @property
    def valid_cells(self) -> tuple[int, int]:
        """Cells whose centre lies inside the scaled image (the others see only padding)."""
        stride = self.spec.stride
        rows = -(-(2 * self.scaled_h - stride) // (2 * stride))
        cols = -(-(2 * self.scaled_w - stride) // (2 * stride))
        return max(1, rows), max(1, cols)

    @property
    def patches(self) -> int:
        return self.n_tiles * self.tile_cells**2
