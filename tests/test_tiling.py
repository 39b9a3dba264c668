"""Tile geometry, cutting, stitching, and tiled scoring against whole-image scoring where they must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.features.stitch import GridStitcher, tent
from engine.inputs.decode import cut_tiles, resize_batch, scaled_image, tile_chunks
from engine.tiling import TileSpec

LITE0 = {"align": 16, "stride": 8}


def spec(tile: int = 64, overlap: float = 0.25, scale: float = 1.0, map_size: int = 1024) -> TileSpec:
    return TileSpec(tile, overlap, scale, LITE0["align"], LITE0["stride"], map_size)


@pytest.mark.parametrize(
    ("height", "width"),
    [(64, 64), (65, 64), (100, 300), (500, 1250), (16, 2048), (2048, 16), (7, 5), (1, 1), (1000, 64)],
)
def test_tiles_cover_the_image_on_one_grid(height: int, width: int) -> None:
    s = spec(64, 0.25)
    layout = s.layout(height, width)
    for origins, length in ((layout.ys, layout.scaled_h), (layout.xs, layout.scaled_w)):
        assert origins[0] == 0 and all(o % 16 == 0 for o in origins)
        assert list(origins) == sorted(set(origins))
        assert origins[-1] + 64 >= length  # the last tile reaches the end (padded beyond it)
        steps = np.diff(origins)
        assert (steps <= 64 * 0.75 + 16).all()  # overlap of about a quarter tile, rounded to the grid
    gh, gw = layout.grid_shape
    assert gh * 8 == layout.ys[-1] + 64 and gw * 8 == layout.xs[-1] + 64
    vh, vw = layout.valid_cells
    assert 1 <= vh <= gh and 1 <= vw <= gw
    assert (vh - 0.5) * 8 < max(layout.scaled_h, 4) + 8


def test_an_image_smaller_than_a_tile_is_one_padded_tile() -> None:
    layout = spec(64).layout(20, 30)
    assert layout.n_tiles == 1 and layout.grid_shape == (8, 8)
    assert layout.valid_cells == (2, 4)  # cells whose centre (4, 12, 20, ...) is inside 20 x 30 pixels
    pixels = torch.arange(20 * 30 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(20, 30, 3)
    tile = cut_tiles(scaled_image(pixels, layout), layout, 0, 1)[0]
    assert tile.shape == (3, 64, 64)
    assert torch.equal(tile[:, :20, :30], pixels.permute(2, 0, 1).float() / 255.0)
    assert torch.equal(tile[:, 20:39, :30], tile[:, :19, :30].flip(1))  # mirrored at the last row
    assert torch.equal(tile[:, :20, 30:59], tile[:, :20, :29].flip(2))


def test_mirrored_indices_fold_any_length() -> None:
    from engine.inputs.decode import mirrored

    assert mirrored(torch.arange(9), 3).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert mirrored(torch.arange(4), 1).tolist() == [0, 0, 0, 0]


def test_auto_scale_puts_the_short_side_on_the_tile() -> None:
    layout = spec(512, scale=0.0).layout(500, 1250)
    assert (layout.scaled_h, layout.scaled_w) == (512, 1280)
    assert len(layout.ys) == 1 and len(layout.xs) == 3
    assert (layout.map_h, layout.map_w) == (410, 1024)  # aspect kept, long side map_size
    square = spec(512, scale=0.0).layout(256, 256)
    assert square.n_tiles == 1 and (square.scaled_h, square.map_h) == (512, 512)


def test_extreme_aspect_ratios() -> None:
    strip = spec(64, scale=1.0, map_size=256).layout(40, 5000)
    assert len(strip.ys) == 1 and len(strip.xs) >= 5000 // 48
    assert (strip.map_h, strip.map_w) == (2, 256)
    assert strip.patches == strip.n_tiles * 64


def test_one_tile_covering_the_image_equals_the_whole_image_resize() -> None:
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    layout = spec(128, scale=128 / 300).layout(300, 300)
    assert layout.n_tiles == 1 and layout.scaled_h == 128
    ((first, tiles),) = list(tile_chunks(pixels, layout, 8))
    assert first == 0 and torch.equal(tiles, resize_batch([pixels], 128))


def test_tile_chunks_stream_the_chosen_tiles() -> None:
    pixels = torch.zeros((200, 200, 3), dtype=torch.uint8)
    layout = spec(64).layout(200, 200)
    chunks = list(tile_chunks(pixels, layout, 3, tiles=[0, 1, 2, 3, 7, 8]))
    assert [(first, t.shape[0]) for first, t in chunks] == [(0, 3), (3, 1), (7, 2)]


def test_stitching_blends_overlaps_and_keeps_constant_grids() -> None:
    layout = spec(64).layout(100, 200)
    assert layout.n_tiles > 1
    stitcher = GridStitcher(layout)
    for index in range(layout.n_tiles):
        stitcher.add(index, torch.full((2, 8, 8), 3.0))
    assert torch.allclose(stitcher.result(), torch.full((2, *layout.grid_shape), 3.0))
    weights = tent(8)
    assert weights[0, 0] == 1 and weights[3, 3] == weights.max() and torch.equal(weights, weights.T)
    with pytest.raises(RuntimeError, match="of"):
        GridStitcher(layout).result()


def test_a_cell_seen_by_two_tiles_is_their_weighted_mean() -> None:
    layout = spec(64, overlap=0.5).layout(64, 96)  # two tiles side by side, origins 0 and 32
    assert layout.xs == (0, 32)
    stitcher = GridStitcher(layout)
    stitcher.add(0, torch.full((1, 8, 8), 1.0))
    stitcher.add(1, torch.full((1, 8, 8), 5.0))
    grid = stitcher.result()[0]
    assert grid[0, 0] == 1.0 and grid[0, -1] == 5.0
    w0, w1 = tent(8)[0, 6], tent(8)[0, 2]  # cell (0, 6): tile 0 column 6, tile 1 column 2
    assert float(grid[0, 6]) == pytest.approx((w0 * 1 + w1 * 5) / (w0 + w1))


@pytest.fixture(scope="module")
def demo_paths(demo_root: Path) -> list[Path]:
    from engine.inputs.datasets import train_images

    return train_images(demo_root, "weave")


def test_tiled_model_with_one_tile_equals_the_whole_image_model(demo_paths: list[Path], demo_root: Path) -> None:
    from engine.api import fit
    from engine.config import FitConfig
    from engine.inputs.datasets import test_items
    from engine.inputs.decode import read_rgb, to_tensor
    from engine.models.tiled import image_output

    common = {"coreset_ratio": 0.25, "device": "cpu", "precision": "fp32"}
    tiled = fit(demo_paths, FitConfig(tile_size=64, image_scale=0.25, **common))  # 256 px -> one 64 px tile
    whole = fit(demo_paths, FitConfig(tile_size=0, input_size=64, **common))
    assert torch.equal(tiled.bank, whole.bank) and tiled.threshold == whole.threshold
    for item in test_items(demo_root, "weave")[:4]:
        pixels = read_rgb(item.path)
        one = image_output(tiled, pixels)
        ref = whole.score(to_tensor([pixels], 64))
        assert torch.equal(one.score, ref.scores[0]) and torch.equal(one.map, ref.maps[0])


def test_tiled_fit_samples_tiles_beyond_the_patch_cap(demo_paths: list[Path]) -> None:
    from engine.api import fit
    from engine.config import FitConfig

    cfg = FitConfig(tile_size=64, image_scale=0.5, coreset_ratio=0.5, max_train_patches=1000, device="cpu")
    model = fit(demo_paths, cfg)
    stats = model.fit_stats
    assert stats["tiles_total"] == 9 * stats["train_images"]  # 128 px images: 3 x 3 tiles of 64
    assert stats["training_tiles"] == 1000 // 64 and stats["training_patches"] == 15 * 64
    again = fit(demo_paths, cfg)
    assert torch.equal(again.bank, model.bank)  # the sample is seeded


def test_padim_refuses_tiles() -> None:
    from engine.config import FitConfig
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="padim"):
        FitConfig(method="padim", tile_size=256).resolved()
