"""The scan's loader stage: read, inspect, decode and resize one batch of records.

Each unreadable file becomes an error message for its row; the batch goes on. Full-size pixels are
held for at most DECODE_PIXEL_BUDGET pixels at a time (a big image alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine import timing
from engine.errors import DecodeError
from engine.inputs.decode import cut_tiles, resize_batch, scaled_image
from engine.inputs.decoders import Decoder
from engine.inputs.inspection import ImageInfo, inspect_bytes
from engine.inputs.reader import max_file_bytes, read_files
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.inputs.sources import Record, Shard
from engine.scan.batches import LoadedBatch, TileChunk
from engine.tiling import TileSpec

DECODE_PIXEL_BUDGET = 64_000_000  # decoded full-size pixels held at once by the loader (~200 MB as RGB)


def _read_and_inspect(
    records: list[Record], max_pixels: int, read_timeout: float
) -> tuple[list[tuple[bytes, ImageInfo]], list[int], dict[int, str]]:
    """(bytes and header of each readable file, its offset in records, offset -> error message).

    The files are read in parallel, regular files only, each within read_timeout seconds
    (engine.inputs.reader): a FIFO, a device or a hung read is an error row, never a stuck loader."""
    errors: dict[int, str] = {}
    items, offsets = [], []
    with timing.span("read"):
        reads = read_files([r.file if r.path else None for r in records], read_timeout, max_file_bytes(max_pixels))
    with timing.span("inspect"):
        for offset, record in enumerate(records):
            try:
                if not record.path:
                    raise DecodeError("no path given for this input")
                data = reads[offset]
                if isinstance(data, Exception):
                    raise data
                items.append((data, inspect_bytes(data, Path(record.file).suffix, max_pixels)))
                offsets.append(offset)
            except DecodeError as exc:
                errors[offset] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one file never stops a scan
                errors[offset] = _unexpected(exc)
    return items, offsets, errors


def _decode_items(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], group: list[int], size: int, tiles: TileSpec | None
) -> list[str | tuple[torch.Tensor, int, int]]:
    try:
        return _decode_group(decoder, [items[k] for k in group], size, tiles)
    except Exception:  # noqa: BLE001 - retry the files one by one to find the one that fails
        return [r for k in group for r in _decode_group_safely(decoder, [items[k]], size, tiles)]


def load_batch(
    shard: Shard, records: list[Record], decoder: Decoder, size: int, max_pixels: int, last: bool,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> LoadedBatch:  # fmt: skip
    """Read, inspect, decode and resize one batch; each unreadable file becomes an error message."""
    t0 = time.perf_counter()
    items, offsets, errors = _read_and_inspect(records, max_pixels, read_timeout)
    resized: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    for group in _pixel_groups(items):  # bounded: full-size pixels of one group at a time
        for k, result in zip(group, _decode_items(decoder, items, group, size, None), strict=True):
            if isinstance(result, str):
                errors[offsets[k]] = result
            else:
                tensor, width, height = result
                resized.append(tensor)
                ok.append(offsets[k])
                sizes[offsets[k]] = (width, height)
    images = torch.stack(resized) if resized else torch.empty((0, 3, size, size))
    return LoadedBatch(shard, records, images, ok, sizes, errors, last, time.perf_counter() - t0)


def load_tiled_batches(
    shard: Shard, records: list[Record], decoder: Decoder, max_pixels: int, last: bool, tiles: TileSpec,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> Iterator[LoadedBatch]:  # fmt: skip
    """The tiled form of load_batch: the records cut into consecutive batches that hold at most
    DECODE_PIXEL_BUDGET decoded pixels (a big image alone), each image at its layout's scaled size
    (batch.layouts, batch.scaled) for tile_chunks_of to cut."""
    t0 = time.perf_counter()
    items, offsets, errors = _read_and_inspect(records, max_pixels, read_timeout)
    groups = list(_pixel_groups(items)) or [[]]
    begin = 0
    for n, group in enumerate(groups):
        end = len(records) if n == len(groups) - 1 else offsets[group[-1]] + 1
        ok: list[int] = []
        sizes: dict[int, tuple[int, int]] = {}
        scaled: dict[int, torch.Tensor] = {}
        part_errors = {o - begin: message for o, message in errors.items() if begin <= o < end}
        for k, result in zip(group, _decode_items(decoder, items, group, tiles.tile, tiles), strict=True):
            offset = offsets[k] - begin
            if isinstance(result, str):
                part_errors[offset] = result
                continue
            scaled[offset], width, height = result
            ok.append(offset)
            sizes[offset] = (width, height)
        layouts = {offset: tiles.layout(sizes[offset][1], sizes[offset][0]) for offset in ok}
        empty = torch.empty((0, 3, tiles.tile, tiles.tile))
        seconds = time.perf_counter() - t0
        yield LoadedBatch(
            shard, records[begin:end], empty, ok, sizes, part_errors, last and end == len(records), seconds,
            layouts, scaled,
        )  # fmt: skip
        begin, t0 = end, time.perf_counter()


def tile_chunks_of(batch: LoadedBatch, chunk: int) -> Iterator[TileChunk]:
    """The tiles of every decoded image of a tiled batch, in order, `chunk` at a time; each image's
    scaled pixels are released once its tiles are cut."""
    for offset in batch.ok:
        layout, image = batch.layouts[offset], batch.scaled.pop(offset)
        for first in range(0, layout.n_tiles, chunk):
            yield TileChunk(batch, offset, first, cut_tiles(image, layout, first, min(chunk, layout.n_tiles - first)))


def _unexpected(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory while decoding this image; lower --max-pixels or add memory"
    return f"unexpected error while decoding: {type(exc).__name__}: {exc}"


def _decode_group(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int, tiles: TileSpec | None = None
) -> list[str | tuple[torch.Tensor, int, int]]:
    """Per item: an error message, or (resized image, width, height); with `tiles`, the image at its
    layout's scaled size (3, h, w)."""
    out: list[str | tuple[torch.Tensor, int, int]] = []
    pixels: list[torch.Tensor] = []
    with timing.span("decode"):
        decoded = decoder.decode(items)
    for result in decoded:
        if isinstance(result, DecodeError):
            out.append(str(result))
        else:
            pixels.append(result)
            out.append((result, int(result.shape[1]), int(result.shape[0])))
    with timing.span("resize"):
        if tiles is not None:
            return [r if isinstance(r, str) else (scaled_image(r[0], tiles.layout(r[2], r[1])), r[1], r[2]) for r in out]
        images = iter(resize_batch(pixels, size) if pixels else [])
    return [r if isinstance(r, str) else (next(images), r[1], r[2]) for r in out]


def _decode_group_safely(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int, tiles: TileSpec | None = None
) -> list[str | tuple[torch.Tensor, int, int]]:
    try:
        return _decode_group(decoder, items, size, tiles)
    except Exception as exc:  # noqa: BLE001 - one file never stops a scan
        return [_unexpected(exc)]


def _pixel_groups(items: list[tuple[bytes, ImageInfo]]) -> Iterator[list[int]]:
    """Consecutive item indices in groups of at most DECODE_PIXEL_BUDGET pixels (a big image alone)."""
    group: list[int] = []
    pixels = 0
    for k, (_, info) in enumerate(items):
        if group and pixels + info.width * info.height > DECODE_PIXEL_BUDGET:
            yield group
            group, pixels = [], 0
        group.append(k)
        pixels += info.width * info.height
    if group:
        yield group
