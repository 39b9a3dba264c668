"""The sharded map store: one storage object per map shard, each written once and whole; one map reads
alone; stores written before sharding (one object per image) still read and resume in their own layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from zarr.codecs import BloscCodec

from engine.scan.job import scan
from engine.scan.store import ScanStore, encode_schema, map_shard_length, rows_schema
from engine.scan.writer import MapBuffer

SETTINGS = {"device": "cpu", "batch_size": 5}


def _objects(out: Path) -> list[Path]:
    return [p for p in (out / "maps.zarr" / "maps" / "c").rglob("*") if p.is_file()]


@pytest.mark.parametrize("shard_size", [1, 7, 8, 1000, 1024, 3 * 1024, 600])
@pytest.mark.parametrize("map_size", [8, 64, 256, 1024, 4096])
def test_map_shard_length_divides_the_scan_shard_and_fits_the_budget(shard_size: int, map_size: int) -> None:
    length = map_shard_length(shard_size, map_size)
    assert shard_size % length == 0
    assert length == 1 or length * 2 * map_size * map_size <= 64 * 2**20
    if 2 * map_size * map_size * shard_size <= 64 * 2**20:
        assert length == shard_size  # small maps: one object per scan shard


def test_map_shard_length_is_the_largest_divisor_that_fits() -> None:
    assert map_shard_length(1024, 256) == 512  # 128 KiB maps: 512 of them in 64 MiB
    assert map_shard_length(1000, 256) == 500
    assert map_shard_length(97, 4096) == 1  # a prime shard size of 32 MiB maps: one image per object


class _Recording(ScanStore):
    def __init__(self, store: ScanStore):
        super().__init__(store.out_dir, store.manifest)
        self.writes: list[tuple[int, int]] = []

    def write_maps(self, start: int, block: np.ndarray) -> None:
        self.writes.append((start, len(block)))
        super().write_maps(start, block)


def test_the_buffer_writes_each_map_shard_once_and_whole(tmp_path: Path) -> None:
    manifest = {"count": 23, "map_size": 4, "shard_size": 8, "rows_schema": encode_schema(rows_schema(pa.schema([])))}
    store = _Recording(ScanStore.create(tmp_path / "out", manifest, {}))
    assert store.map_shard_images() == 8
    values = np.arange(23 * 16, dtype=np.float16).reshape(23, 4, 4)
    for shard_start in (0, 8, 16):  # three scan shards, batches of 3 that cross map-shard boundaries
        buffer = MapBuffer(store, 8)
        stop = min(shard_start + 8, 23)
        for first in range(shard_start, stop, 3):
            buffer.add(first, values[first : min(first + 3, stop)])
        buffer.flush()
    assert store.writes == [(0, 8), (8, 8), (16, 7)]  # whole objects only (the last is the array's edge)
    maps = zarr.open_array(tmp_path / "out" / "maps.zarr" / "maps", mode="r")
    assert np.array_equal(maps[:], values) and len(_objects(tmp_path / "out")) == 3


def test_a_scan_writes_one_object_per_shard_and_one_map_reads_alone(
    scan_model_dir: Path, many_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scan(scan_model_dir, many_images, out, shard_size=32, **SETTINGS)
    maps = zarr.open_group(out / "maps.zarr", mode="r")["maps"]
    assert maps.shards == (32, *maps.shape[1:]) and maps.chunks == (1, *maps.shape[1:])
    assert len(_objects(out)) == -(-maps.shape[0] // 32)  # 162 images: 6 objects, not 160 files
    whole = maps[:]
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    indices = [r["index"] for r in rows if r["index"] >= 0]
    for index in np.random.default_rng(0).choice(indices, 5, replace=False):
        assert np.array_equal(maps[int(index)], whole[int(index)])  # one inner chunk, read alone
        assert not np.isnan(maps[int(index)]).any()
    errors = [r["position"] for r in rows if r["status"] == "error"]
    assert errors and all(np.isnan(whole[i]).all() for i in errors)  # error slots read as the NaN fill


def _unshard(out: Path) -> None:
    """Rewrite OUT_DIR's maps.zarr the way vade wrote it before sharding: one object per image."""
    path = out / "maps.zarr"
    old = zarr.open_group(path, mode="r")["maps"]
    values, attrs = old[:], dict(old.attrs)
    shutil.rmtree(path)
    maps = zarr.open_group(path, mode="w").create_array(
        "maps", shape=values.shape, chunks=(1, *values.shape[1:]), dtype="float16", fill_value=np.nan,
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), dimension_names=["image", "y", "x"],
    )  # fmt: skip
    maps.attrs.update(attrs)
    maps[:] = values


def test_a_store_from_before_sharding_reads_and_resumes_in_its_own_layout(
    scan_model_dir: Path, many_images: Path, tmp_path: Path
) -> None:
    clean = tmp_path / "clean"
    scan(scan_model_dir, many_images, clean, shard_size=32, **SETTINGS)
    old = tmp_path / "old"
    shutil.copytree(clean, old)
    _unshard(old)
    # unfinish it: scores.parquet gone, shards 2.. not done, their maps gone
    scan_json = (old / "scan.json").read_text().replace('"state": "complete"', '"state": "running"')
    (old / "scan.json").write_text(scan_json)
    (old / "scores.parquet").unlink()
    (old / "_parts").mkdir()
    table = pq.read_table(clean / "scores.parquet")
    for shard in range(6):
        marker = old / "_done" / f"shard-{shard:08d}.json"
        if shard < 2:  # the done shards keep their parts, as a running scan does
            part = table.filter(np.asarray(table["shard"]) == shard)
            pq.write_table(part, old / "_parts" / f"shard-{shard:08d}.parquet")
        else:
            marker.unlink()
    maps = zarr.open_array(old / "maps.zarr" / "maps", mode="r+")
    maps[64:] = np.nan  # the slots of the shards still to do hold nothing
    ok_before = sum(1 for r in table.to_pylist() if r["index"] >= 0 and r["position"] < 64)
    assert maps.shards is None and len(_objects(old)) == ok_before  # one object per image with a map

    result = scan(scan_model_dir, many_images, old, shard_size=32, resume=True, **SETTINGS)
    assert result.shards_skipped == 2
    reread = zarr.open_group(old / "maps.zarr", mode="r")["maps"]
    assert reread.shards is None and reread.chunks == (1, *reread.shape[1:])  # layout kept
    assert np.array_equal(reread[:], zarr.open_group(clean / "maps.zarr", mode="r")["maps"][:], equal_nan=True)
    assert pq.read_table(old / "scores.parquet").equals(pq.read_table(clean / "scores.parquet"))
    ok = sum(1 for s in pq.read_table(old / "scores.parquet")["status"].to_pylist() if s == "ok")
    assert len(_objects(old)) == ok  # one object per image with a map (all-NaN error slots are not stored)
