"""The scan's loader stage: read, inspect, decode and resize one batch of records.

Each unreadable file becomes an error message for its row; the batch goes on. Full-size pixels are
held for at most DECODE_PIXEL_BUDGET pixels at a time (a big image alone).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.errors import DecodeError
from engine.inputs.decode import resize_batch
from engine.inputs.decoders import Decoder
from engine.inputs.inspection import ImageInfo, inspect_bytes
from engine.inputs.reader import max_file_bytes, read_files
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.inputs.sources import Record, Shard
from engine.scan.batches import LoadedBatch

DECODE_PIXEL_BUDGET = 64_000_000  # decoded full-size pixels held at once by the loader (~200 MB as RGB)


def load_batch(
    shard: Shard, records: list[Record], decoder: Decoder, size: int, max_pixels: int, last: bool,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
) -> LoadedBatch:  # fmt: skip
    """Read, inspect, decode and resize one batch; each unreadable file becomes an error message.

    The batch's files are read in parallel, regular files only, each within read_timeout seconds
    (engine.inputs.reader): a FIFO, a device or a hung read is an error row, never a stuck loader."""
    t0 = time.perf_counter()
    errors: dict[int, str] = {}
    items, offsets = [], []
    reads = read_files([r.file if r.path else None for r in records], read_timeout, max_file_bytes(max_pixels))
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
    resized: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    for group in _pixel_groups(items):  # bounded: full-size pixels of one group at a time
        try:
            done = _decode_group(decoder, [items[k] for k in group], size)
        except Exception:  # noqa: BLE001 - retry the files one by one to find the one that fails
            done = [r for k in group for r in _decode_group_safely(decoder, [items[k]], size)]
        for k, result in zip(group, done, strict=True):
            if isinstance(result, str):
                errors[offsets[k]] = result
            else:
                tensor, width, height = result
                resized.append(tensor)
                ok.append(offsets[k])
                sizes[offsets[k]] = (width, height)
    images = torch.stack(resized) if resized else torch.empty((0, 3, size, size))
    return LoadedBatch(shard, records, images, ok, sizes, errors, last, time.perf_counter() - t0)


def _unexpected(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory while decoding this image; lower --max-pixels or add memory"
    return f"unexpected error while decoding: {type(exc).__name__}: {exc}"


def _decode_group(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int
) -> list[str | tuple[torch.Tensor, int, int]]:
    """Per item: an error message, or (resized image, width, height)."""
    out: list[str | tuple[torch.Tensor, int, int]] = []
    pixels: list[torch.Tensor] = []
    for result in decoder.decode(items):
        if isinstance(result, DecodeError):
            out.append(str(result))
        else:
            pixels.append(result)
            out.append((result, int(result.shape[1]), int(result.shape[0])))
    images = iter(resize_batch(pixels, size) if pixels else [])
    return [r if isinstance(r, str) else (next(images), r[1], r[2]) for r in out]


def _decode_group_safely(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int
) -> list[str | tuple[torch.Tensor, int, int]]:
    try:
        return _decode_group(decoder, items, size)
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
