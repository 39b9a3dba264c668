"""Scoring tiled images in sequence: tiles gathered across images into batches, stitched, finished.

The scan runs the same steps spread over its threads (engine/scan/tiles.py); this is the plain form
used by the fit's calibration and by `vade eval`. Tiles of consecutive images share batches (a batch
of one tile runs the backbone several times slower per image on CPUs than a full one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from engine.features.stitch import GridStitcher
from engine.inputs.decode import pixels_tensor, tile_chunks
from engine.models.base import AnomalyModel, ImageOutput


@torch.inference_mode()
def score_images_tiled(
    model: AnomalyModel, images: Iterable[tuple[Any, np.ndarray | torch.Tensor]], batch: int | None = None,
    loo: bool = False,
) -> Iterator[tuple[Any, ImageOutput]]:
    """(key, raw score and map) for each (key, decoded RGB uint8 (H, W, 3) image), in order.

    loo: the images are training images and each key is the image's owner id (its index in the fit's
    image list): every tile is scored leave-one-out, without its own image's contribution."""
    spec = model.tile_spec
    if spec is None:
        raise ValueError("a whole-image model scores batches with model.score")
    batch = batch or model.cfg.batch_size
    open_images: deque[tuple[Any, GridStitcher]] = deque()
    tiles: list[torch.Tensor] = []
    owners: list[tuple[GridStitcher, int]] = []
    tile_owner: list[int] = []

    def run(count: int) -> None:
        nonlocal tiles, owners, tile_owner
        stacked = torch.cat(tiles)
        if loo:
            grids = model.score_tiles(stacked[:count].to(model.device), torch.tensor(tile_owner[:count]))
            tile_owner = tile_owner[count:]
        else:
            grids = model.score_tiles(stacked[:count].to(model.device))
        for k, (stitcher, index) in enumerate(owners[:count]):
            stitcher.add(index, grids[k])
        tiles, owners = ([stacked[count:]] if count < stacked.shape[0] else []), owners[count:]

    def finished() -> Iterator[tuple[Any, ImageOutput]]:
        while open_images and open_images[0][1].complete:
            key, stitcher = open_images.popleft()
            yield key, model.finish_tiled(stitcher.result(), stitcher.layout)

    for key, pixels in images:
        tensor = pixels if isinstance(pixels, torch.Tensor) else pixels_tensor(pixels)
        layout = spec.layout(int(tensor.shape[0]), int(tensor.shape[1]))
        stitcher = GridStitcher(layout)
        open_images.append((key, stitcher))
        for first, chunk in tile_chunks(tensor, layout, batch):
            tiles.append(chunk)
            owners += [(stitcher, first + k) for k in range(chunk.shape[0])]
            if loo:
                tile_owner += [int(key)] * chunk.shape[0]
            while len(owners) >= batch:
                run(batch)
        yield from finished()
    while owners:
        run(min(batch, len(owners)))
    yield from finished()


def image_output(model: AnomalyModel, pixels: np.ndarray | torch.Tensor) -> ImageOutput:
    """Raw score and map of one decoded RGB uint8 (H, W, 3) image, tiled as the model tiles."""
    ((_, out),) = list(score_images_tiled(model, [(None, pixels)]))
    return out
