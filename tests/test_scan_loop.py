"""The loader's per-file isolation: bounded pixel groups, and any failure becomes one error row."""

from __future__ import annotations

from pathlib import Path

import torch
from imagegen import png_bytes, write_files

from engine.inputs.decoders import PillowDecoder
from engine.inputs.inspection import ImageInfo
from engine.inputs.sources import Record, Shard
from engine.scan.loader import DECODE_PIXEL_BUDGET, _pixel_groups, load_batch


def test_pixel_groups_bound_the_pixels_decoded_at_once() -> None:
    def info(pixels: int) -> tuple[bytes, ImageInfo]:
        return b"", ImageInfo("PNG", "RGB", pixels, 1)

    half = DECODE_PIXEL_BUDGET // 2
    items = [info(half), info(half), info(1), info(3 * DECODE_PIXEL_BUDGET), info(10), info(10)]
    assert list(_pixel_groups(items)) == [[0, 1], [2], [3], [4, 5]]


class ExplodingDecoder(PillowDecoder):
    """Pillow, except that any batch holding a 50-pixel-wide image raises (a decoder bug, say)."""

    def decode(self, items):  # noqa: ANN001, ANN201
        if any(info.width == 50 for _, info in items):
            raise ValueError("decoder bug")
        return super().decode(items)


def test_an_unexpected_decoder_failure_costs_only_its_file(tmp_path: Path) -> None:
    paths = write_files(tmp_path, {"a.png": png_bytes(40, 30), "b.png": png_bytes(50, 30), "c.png": png_bytes(60, 30)})
    records = [Record(i, str(p), str(p)) for i, p in enumerate(paths)]
    shard = Shard(0, 0, records)
    batch = load_batch(shard, records, ExplodingDecoder(torch.device("cpu")), 32, 10**6, last=True)
    assert batch.ok == [0, 2] and batch.images.shape == (2, 3, 32, 32)
    assert batch.errors == {1: "unexpected error while decoding: ValueError: decoder bug"}
    assert batch.sizes == {0: (40, 30), 2: (60, 30)}
