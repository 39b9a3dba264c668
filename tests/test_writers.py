"""ScanStore on a real Zarr store and real Parquet files: create, refuse, shard parts, consolidate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from engine.errors import ConfigError
from engine.scan.store import (
    CONTRACT_SCHEMA,
    ScanStore,
    ShardCounts,
    encode_schema,
    rows_schema,
    shard_rows,
)

EXTRA = pa.schema([("site", pa.string()), ("score", pa.float64())])  # "score" clashes with ours


def _manifest(count: int = 5, **changes) -> dict:
    manifest = {
        "model_fingerprint": "m1", "count": count, "source_fingerprint": "s1", "shard_size": 2, "map_size": 8,
        "max_pixels": 100, "rows_schema": encode_schema(rows_schema(EXTRA)), "source_columns": EXTRA.names,
    }  # fmt: skip
    return {**manifest, **changes}


def _rows(store: ScanStore, positions: list[int], shard: int) -> pa.Table:
    n = len(positions)
    columns = {
        "path": [f"img{p}.png" for p in positions], "index": positions, "score": [0.1] * n,
        "is_anomalous": [False] * n, "status": ["ok"] * n, "error": [None] * n, "raw_score": [1.0] * n,
        "width": [8] * n, "height": [8] * n, "position": positions, "shard": [shard] * n, "site": ["a"] * n,
        "source_score": [7.0] * n,
    }  # fmt: skip
    columns["path_bytes"] = [None] * n  # every name here is UTF-8
    return shard_rows(store.schema, columns)


def test_rows_schema_prefixes_clashing_source_columns() -> None:
    schema = rows_schema(EXTRA)
    assert schema.names[: len(CONTRACT_SCHEMA)] == CONTRACT_SCHEMA.names
    assert schema.names[len(CONTRACT_SCHEMA) :] == ["site", "source_score"]


def test_create_makes_a_chunked_float16_maps_array(tmp_path: Path) -> None:
    store = ScanStore.create(tmp_path / "out", _manifest(), {"map_size": [8, 8]})
    maps = zarr.open_group(tmp_path / "out" / "maps.zarr", mode="r")["maps"]
    assert maps.shape == (5, 8, 8) and maps.chunks == (1, 8, 8) and maps.dtype == np.float16
    assert maps.attrs["_ARRAY_DIMENSIONS"] == ["image", "y", "x"] and maps.metadata.dimension_names == ("image", "y", "x")
    assert np.isnan(maps[0]).all()  # nothing written yet reads as the NaN fill
    assert json.loads((tmp_path / "out" / "scan.json").read_text())["state"] == "running"
    assert not store.is_complete()


def test_create_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    ScanStore.create(tmp_path / "out", _manifest(), {})  # an empty folder is fine
    with pytest.raises(ConfigError, match="already exists and is not empty.*--resume"):
        ScanStore.create(tmp_path / "out", _manifest(), {})


def test_reopen_refuses_a_different_scan(tmp_path: Path) -> None:
    ScanStore.create(tmp_path / "out", _manifest(), {})
    assert ScanStore.reopen(tmp_path / "out", _manifest()).manifest["count"] == 5
    with pytest.raises(ConfigError, match="shard_size=2 but this run has shard_size=3"):
        ScanStore.reopen(tmp_path / "out", _manifest(shard_size=3))
    with pytest.raises(ConfigError, match="model_fingerprint"):
        ScanStore.reopen(tmp_path / "out", _manifest(model_fingerprint="other"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(ConfigError, match="holds no scan"):
        ScanStore.reopen(tmp_path / "other", _manifest())


def test_shards_then_consolidate_in_shard_order(tmp_path: Path) -> None:
    store = ScanStore.create(tmp_path / "out", _manifest(), {})
    for shard_id, positions in [(2, [4]), (0, [0, 1]), (1, [2, 3])]:  # finish out of order
        assert not store.is_done(shard_id)
        store.finish_shard(shard_id, positions[0], _rows(store, positions, shard_id), ShardCounts(len(positions), 0, 0))
        assert store.is_done(shard_id)
    assert store.done_shards() == [0, 1, 2] and store.done_counts(1) == ShardCounts(2, 0, 0)
    assert not list((tmp_path / "out").rglob("*.tmp"))
    store.consolidate(range(3))
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert table.column("position").to_pylist() == [0, 1, 2, 3, 4]
    assert table.schema == store.schema and "source_score" in table.schema.names
    assert store.is_complete() and ScanStore.open(tmp_path / "out").is_complete()
    assert not (tmp_path / "out" / "_parts").exists() and store.done_shards() == [0, 1, 2]
