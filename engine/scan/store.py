"""Scan outputs: OUT_DIR/maps.zarr, OUT_DIR/scores.parquet and the bookkeeping that makes them resumable
(engine.scan.writer turns scored batches into both).

    OUT_DIR/scan.json             what this scan is (model, source, counts, settings) and its state
    OUT_DIR/scan.lock             while a scan runs: its lock and holder (engine.scan.lock)
    OUT_DIR/_listing.parquet      until the scan is complete: SOURCE as listed, the shards' records (engine.inputs.listing)
    OUT_DIR/maps.zarr             group; array `maps` (N, H, W) float16, Zarr v3 sharding codec: one storage object
                                  (maps.zarr/maps/c/K/0/0) per map shard of L images, inner chunk = one image (Blosc
                                  byte shuffle + zstd level 1), so one map still reads alone; stores written before
                                  sharding have one object per image and are read (and resumed) as they are
    OUT_DIR/_parts/shard-K.parquet  rows of shard K, written whole (temp file + rename)
    OUT_DIR/_done/shard-K.json      shard K's completion marker, written after its maps and rows
    OUT_DIR/scores.parquet        every part in shard order, written once all shards are done

Zarr has no locks, and writing part of a sharded object is a read-modify-write. So a scan shard
covers a whole number of map shards (shard_size is a multiple of L, see map_shard_length) and the
writer (engine.scan.writer) buffers each map shard and writes it once, whole: scan shards never share
a storage object, and rerunning a shard rewrites the same objects with the same values. Each object is
written atomically (zarr's LocalStore: temporary file + rename).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from engine.errors import ConfigError
from engine.inputs.listing import LISTING_NAME
from engine.scan.lock import LOCK_NAME

SCAN_FORMAT = "vade-scan/1"
MAP_SHARD_BYTES = 64 * 2**20  # uncompressed bytes of one map shard: what a writer buffers per scan shard in flight
CONTRACT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # as given; a name that is not UTF-8 shows its bytes as \xNN here
        ("path_bytes", pa.binary()),  # the path's raw bytes (os.fsencode) when it is not UTF-8, else null
        ("index", pa.int64()),  # position in maps.zarr; -1 when the row has no map
        ("score", pa.float32()),  # normalised: 0.5 == the model's calibrated threshold
        ("is_anomalous", pa.bool_()),  # raw_score >= threshold; False for error rows
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),  # what is wrong with the file; null when ok
        ("raw_score", pa.float32()),
        ("width", pa.int32()),  # of the image as displayed (EXIF orientation applied); null on error
        ("height", pa.int32()),
        ("position", pa.int64()),  # position of the input in the source enumeration
        ("shard", pa.int32()),
    ]
)
# Tiled models' maps keep the image's shape: maps[index][:map_height, :map_width] is the map.
MAP_SHAPE_COLUMNS = [("map_height", pa.int32()), ("map_width", pa.int32())]
SOURCE_PREFIX = "source_"  # carried manifest columns whose names clash with ours get this prefix


def encode_schema(schema: pa.Schema) -> str:
    """An Arrow schema as text for scan.json (so a worker process can rebuild it)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _tmp_name(path: Path) -> Path:
    """A temporary sibling unique to this process and call: two attempts at the same shard (a Dask
    task retried while the first is still running) never write into one file."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)  # a full disk keeps no half-written temporary file
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def is_bookkeeping(name: str) -> bool:
    """A file a scan writes into OUT_DIR before its store exists (its lock, its listing being written)."""
    return name == LOCK_NAME or name.startswith(LISTING_NAME)


def check_new_out_dir(out_dir: Path) -> None:
    """Refuse an existing non-empty OUT_DIR: a scan is never overwritten."""
    if out_dir.exists() and (not out_dir.is_dir() or any(not is_bookkeeping(p.name) for p in out_dir.iterdir())):
        raise ConfigError(
            f"output folder {out_dir} already exists and is not empty; pass --resume to finish the scan "
            "written there, or choose a new --out (vade never overwrites a scan)"
        )


@dataclass
class ShardCounts:
    ok: int = 0
    error: int = 0
    anomalous: int = 0

    def __iadd__(self, other: ShardCounts) -> ShardCounts:
        self.ok, self.error, self.anomalous = self.ok + other.ok, self.error + other.error, self.anomalous + other.anomalous
        return self

    @property
    def total(self) -> int:
        return self.ok + self.error


class ScanStore:
    """One scan's output folder: create or reopen it, write shards, consolidate."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.schema = decode_schema(manifest["rows_schema"])
        self.maps_path = self.out_dir / "maps.zarr"
        self.scores_path = self.out_dir / "scores.parquet"
        self.parts_dir = self.out_dir / "_parts"
        self.done_dir = self.out_dir / "_done"

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: Path, manifest: dict[str, Any], maps_attrs: dict[str, Any]) -> ScanStore:
        """A fresh output folder; refuses an existing non-empty one (never overwrites a scan)."""
        out_dir = Path(out_dir)
        check_new_out_dir(out_dir)
        store = cls(out_dir, {**manifest, "format": SCAN_FORMAT, "state": "running"})
        for folder in (out_dir, store.parts_dir, store.done_dir):
            folder.mkdir(parents=True, exist_ok=True)
        count, size = manifest["count"], manifest["map_size"]
        length = map_shard_length(manifest["shard_size"], size)
        group = zarr.open_group(store.maps_path, mode="w")
        maps = group.create_array(
            "maps",
            shape=(count, size, size),
            shards=(length, size, size),
            chunks=(1, size, size),
            dtype="float16",
            fill_value=np.nan,
            # byte shuffle + zstd 1: smaller and 25% less CPU than plain zstd 3 on float16 maps
            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
            dimension_names=["image", "y", "x"],
        )
        maps.attrs.update({"_ARRAY_DIMENSIONS": ["image", "y", "x"], **maps_attrs})
        store._write_manifest()  # last: a folder with scan.json is a complete starting point
        return store

    @classmethod
    def reopen(cls, out_dir: Path, manifest: dict[str, Any]) -> ScanStore:
        """An existing scan to resume; refuses one made with a different model, input or settings."""
        out_dir = Path(out_dir)
        path = out_dir / "scan.json"
        if not path.is_file():
            raise ConfigError(
                f"--resume: {out_dir} holds no scan (no scan.json); run without --resume to start one"
            )
        found = json.loads(path.read_text(encoding="utf-8"))
        for key, value in manifest.items():
            if key in RESUME_MUST_MATCH and found.get(key) != value:
                raise ConfigError(
                    f"--resume: {out_dir} was scanned with {key}={found.get(key)!r} but this run has "
                    f"{key}={value!r}; resume with the same model, SOURCE and settings, or use a new --out"
                )
        store = cls(out_dir, found)
        store.parts_dir.mkdir(exist_ok=True)
        store.done_dir.mkdir(exist_ok=True)
        return store

    @classmethod
    def open(cls, out_dir: Path) -> ScanStore:
        """An existing scan folder as written by `create` (for a worker running one shard)."""
        path = Path(out_dir) / "scan.json"
        if not path.is_file():
            raise ConfigError(f"{out_dir} holds no scan (no scan.json)")
        return cls(Path(out_dir), json.loads(path.read_text(encoding="utf-8")))

    def done_shards(self) -> list[int]:
        """Ids of the shards with a completion marker (and their part, unless already consolidated)."""
        if not self.done_dir.is_dir():
            return []
        ids = sorted(int(p.stem.split("-")[1]) for p in self.done_dir.glob("shard-*.json"))
        return ids if self.is_complete() else [i for i in ids if self._part(i).is_file()]

    def _write_manifest(self) -> None:
        _write_atomic(self.out_dir / "scan.json", json.dumps(self.manifest, indent=2).encode())

    # -- shards ----------------------------------------------------------------------------------
    def maps_array(self) -> zarr.Array:
        return zarr.open_array(self.maps_path / "maps", mode="r+")

    def map_shard_images(self) -> int:
        """L: images per storage object of maps.zarr (1 for a store written before sharding)."""
        shards = self.maps_array().shards
        return int(shards[0]) if shards else 1

    def write_maps(self, start: int, block: np.ndarray) -> None:
        """Maps of positions [start, start + len(block)); whole map shards (or the array's last, shorter one)."""
        if getattr(self, "_maps", None) is None:
            self._maps = self.maps_array()
        self._maps[start : start + len(block)] = block

    def _marker(self, shard_id: int) -> Path:
        return self.done_dir / f"shard-{shard_id:08d}.json"

    def _part(self, shard_id: int) -> Path:
        return self.parts_dir / f"shard-{shard_id:08d}.parquet"

    def is_done(self, shard_id: int) -> bool:
        return self._marker(shard_id).is_file() and self._part(shard_id).is_file()

    def done_counts(self, shard_id: int) -> ShardCounts:
        data = json.loads(self._marker(shard_id).read_text(encoding="utf-8"))
        return ShardCounts(data["ok"], data["error"], data["anomalous"])

    def finish_shard(self, shard_id: int, start: int, rows: pa.Table, counts: ShardCounts) -> None:
        """Rows then marker, each written atomically; call after the shard's maps are written."""
        tmp = _tmp_name(self._part(shard_id))
        try:
            pq.write_table(rows, tmp, compression="zstd")
            os.replace(tmp, self._part(shard_id))
        except BaseException:
            _discard(tmp)
            raise
        marker = {"shard": shard_id, "start": start, "stop": start + rows.num_rows, **counts.__dict__}
        _write_atomic(self._marker(shard_id), json.dumps(marker).encode())

    # -- the end ---------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.manifest.get("state") == "complete" and self.scores_path.is_file()

    def consolidate(self, shard_ids: range) -> None:
        """Concatenate the parts in shard order into scores.parquet (streaming), then mark the scan complete."""
        for stale in self.out_dir.glob(self.scores_path.name + ".tmp-*"):  # left by a killed consolidation
            stale.unlink(missing_ok=True)
        tmp = _tmp_name(self.scores_path)
        with pq.ParquetWriter(tmp, self.schema, compression="zstd") as out:
            for shard_id in shard_ids:
                out.write_table(pq.read_table(self._part(shard_id), schema=self.schema))
        os.replace(tmp, self.scores_path)
        self.manifest["state"] = "complete"
        self._write_manifest()
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def map_shard_length(shard_size: int, map_size: int, budget: int = MAP_SHARD_BYTES) -> int:
    """Images per storage object: the largest divisor of shard_size whose maps fit in `budget` bytes
    (float16, map_size x map_size), so each scan shard is a whole number of map shards."""
    fits = max(1, budget // (2 * map_size * map_size))
    best = 1
    for d in range(1, int(shard_size**0.5) + 1):
        if shard_size % d == 0:
            for divisor in (d, shard_size // d):
                if best < divisor <= fits:
                    best = divisor
    return best


# Settings that change the result: resuming with a different value would mix two scans.
RESUME_MUST_MATCH = (
    "model_fingerprint", "count", "source_fingerprint", "shard_size", "map_size", "max_pixels", "rows_schema",
    "model_batch", "device_type",
)  # fmt: skip


def utf8_path(path: str) -> str:
    """A path as Parquet can store it: bytes that are not UTF-8 (os.fsdecode's surrogates) become \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def raw_path(path: str) -> bytes | None:
    """The path's bytes as on disk (os.fsencode) when it is not valid UTF-8 (the `path_bytes` column), else None."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(path)


def output_name(source_column: str) -> str:
    """The scores.parquet name of a carried source column (prefixed when it clashes with ours)."""
    ours = CONTRACT_SCHEMA.names + [name for name, _ in MAP_SHAPE_COLUMNS]
    return SOURCE_PREFIX + source_column if source_column in ours else source_column


def rows_schema(extra: pa.Schema, map_shapes: bool = False) -> pa.Schema:
    """The scores.parquet schema: contract columns, map_height/map_width for maps that keep the
    image's shape, then the source's carried columns."""
    shape_fields = [pa.field(name, kind) for name, kind in MAP_SHAPE_COLUMNS] if map_shapes else []
    return pa.schema([*CONTRACT_SCHEMA, *shape_fields, *(f.with_name(output_name(f.name)) for f in extra)])


def shard_rows(schema: pa.Schema, columns: dict[str, list[Any]]) -> pa.Table:
    """A shard's rows, `columns` keyed by output column name, as a table in `schema`."""
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
