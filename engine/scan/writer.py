"""The scan's writer stage: scored batches -> maps into Zarr at once, rows into the shard's Parquet part.

A shard's rows are collected across its batches and written whole, with its completion marker, after
its last batch (engine.scan.store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

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


class ShardWriter:
    """Writes scored batches: maps into Zarr at once, rows collected and written when a shard ends."""

    def __init__(self, store: ScanStore, on_shard_done: Callable[[Shard, ShardCounts], None] | None = None):
        self.store = store
        self.maps = store.maps_array()
        self.extra_names = {name: output_name(name) for name in store.manifest.get("source_columns", [])}
        self.on_shard_done = on_shard_done
        self.map_shapes = "map_height" in store.schema.names
        self.seconds = 0.0
        self._columns: dict[str, list[Any]] = {}
        self._counts = ShardCounts()

    def write(self, scored: ScoredBatch) -> None:
        """Store one scored batch (all from one shard); finish the shard after its last batch."""
        t0 = time.perf_counter()
        loaded = scored.loaded
        first = loaded.records[0].position
        block = np.full((len(loaded.records), *self.maps.shape[1:]), np.nan, dtype=np.float16)
        if isinstance(scored.maps, list):  # tiled: each map at its own shape, NaN around it
            for offset, amap in zip(loaded.ok, scored.maps, strict=True):
                block[offset, : amap.shape[0], : amap.shape[1]] = amap
        elif loaded.ok:
            block[loaded.ok] = scored.maps
        self.maps[first : first + len(loaded.records)] = block  # error slots stay empty (NaN fill)
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
            table = shard_rows(self.store.schema, cols)
            self.store.finish_shard(loaded.shard.id, loaded.shard.start, table, self._counts)
            if self.on_shard_done:
                self.on_shard_done(loaded.shard, self._counts)
            self._columns, self._counts = {}, ShardCounts()
        self.seconds += time.perf_counter() - t0
