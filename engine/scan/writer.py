"""The scan's writer stage: scored batches -> maps into Zarr, rows into the shard's Parquet part.

Maps are buffered until they fill a map shard (L images, one storage object) and each map shard is
written once, whole; a shard's rows are collected across its batches and written whole, with its
completion marker, after its last batch, when the rest of its maps are flushed (engine.scan.store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine import timing
from engine.inputs.sources import Shard
from engine.scan.batches import ScoredBatch
from engine.scan.store import (
    ScanStore,
    ShardCounts,
    output_name,
    raw_path,
    shard_rows,
    utf8_path,
)


class MapBuffer:
    """Consecutive maps of one shard, written out in whole map shards of `length` images.

    Holds at most one map shard plus one batch; `flush` writes what is left (the scan shard's end)."""

    def __init__(self, store: ScanStore, length: int):
        self.store, self.length = store, length
        self.start = 0
        self.blocks: list[np.ndarray] = []
        self.size = 0

    def add(self, first: int, block: np.ndarray) -> None:
        if not self.blocks:
            self.start = first
        elif first != self.start + self.size:
            raise AssertionError(f"maps out of order: position {first} after {self.start + self.size}")
        self.blocks.append(block)
        self.size += len(block)
        whole = (self.start + self.size) // self.length * self.length - self.start  # up to the last boundary
        if whole > 0:
            self._write(whole)

    def flush(self) -> None:
        if self.size:
            self._write(self.size)

    def _write(self, count: int) -> None:
        data = self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks)
        self.store.write_maps(self.start, data[:count])
        rest = data[count:]
        self.start += count
        self.blocks, self.size = ([rest] if len(rest) else []), len(rest)


class ShardWriter:
    """Writes scored batches: maps in whole map shards, rows collected and written when a shard ends."""

    def __init__(self, store: ScanStore, on_shard_done: Callable[[Shard, ShardCounts], None] | None = None):
        self.store = store
        self.map_shape = (int(store.manifest["map_size"]),) * 2
        self.buffer = MapBuffer(store, store.map_shard_images())
        self.extra_names = {name: output_name(name) for name in store.manifest.get("source_columns", [])}
        self.on_shard_done = on_shard_done
        self.map_shapes = "map_height" in store.schema.names
        self.seconds = 0.0
        self._columns: dict[str, list[Any]] = {}
        self._counts = ShardCounts()

    def write(self, scored: ScoredBatch) -> None:
        """Store one scored batch (all from one shard); finish the shard after its last batch."""
        with timing.span("write"):
            self._write(scored)

    def _write(self, scored: ScoredBatch) -> None:
        t0 = time.perf_counter()
        loaded = scored.loaded
        first = loaded.records[0].position
        block = np.full((len(loaded.records), *self.map_shape), np.nan, dtype=np.float16)
        if isinstance(scored.maps, list):  # tiled: each map at its own shape, NaN around it
            for offset, amap in zip(loaded.ok, scored.maps, strict=True):
                block[offset, : amap.shape[0], : amap.shape[1]] = amap
        elif loaded.ok:
            block[loaded.ok] = scored.maps
        self.buffer.add(first, block)  # error slots stay empty (NaN)
        result_of = {offset: i for i, offset in enumerate(loaded.ok)}
        cols = self._columns or {name: [] for name in self.store.schema.names}
        self._columns = cols
        for offset, record in enumerate(loaded.records):
            i = result_of.get(offset)
            width, height = loaded.sizes.get(offset, (None, None))
            cols["path"].append(utf8_path(record.path))
            cols["path_bytes"].append(raw_path(record.path))
            cols["index"].append(record.position if i is not None else -1)
            cols["score"].append(float(scored.scores[i]) if i is not None else None)
            cols["is_anomalous"].append(bool(scored.anomalous[i]) if i is not None else False)
            cols["status"].append("ok" if i is not None else "error")
            cols["error"].append(None if i is not None else loaded.errors[offset])
            cols["raw_score"].append(float(scored.raw_scores[i]) if i is not None else None)
            cols["width"].append(width)
            cols["height"].append(height)
            cols["position"].append(record.position)
            cols["shard"].append(loaded.shard.id)
            if self.map_shapes:
                layout = loaded.layouts.get(offset) if i is not None else None
                cols["map_height"].append(layout.map_h if layout else None)
                cols["map_width"].append(layout.map_w if layout else None)
            for name, out_name in self.extra_names.items():
                cols[out_name].append(record.extra.get(name))
        self._counts += ShardCounts(len(loaded.ok), len(loaded.errors), int(scored.anomalous.sum()))
        if loaded.last_in_shard:
            self.buffer.flush()
            table = shard_rows(self.store.schema, cols)
            self.store.finish_shard(loaded.shard.id, loaded.shard.start, table, self._counts)
            if self.on_shard_done:
                self.on_shard_done(loaded.shard, self._counts)
            self._columns, self._counts = {}, ShardCounts()
        self.seconds += time.perf_counter() - t0
