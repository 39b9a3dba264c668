"""maps.zarr at scale: the sharded layout (one object per map shard) against the one-object-per-image
layout vade wrote before, on N synthetic maps written through the scan's own store and writer code.

    nice -n 10 python benchmarks/map_store.py --maps 100000 --size 64 --root /tmp/vade_map_store

Per layout: storage objects (files), bytes (apparent and on disk), write MB/s (uncompressed float16),
random single-map read latency (one open array, warm page cache), load average beside it (a shared machine). JSON to
benchmarks/results/map_store.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from _env import record, write_result
from zarr.codecs import BloscCodec

from engine.scan.store import ScanStore, encode_schema, map_shard_length, rows_schema
from engine.scan.writer import MapBuffer

BATCH = 32  # images the scan writes together (ScanOptions.batch_size)


def synthetic_maps(count: int, size: int, seed: int = 0) -> np.ndarray:
    """A pool of smooth anomaly-like maps (8x8 noise upsampled bilinearly, a few bright blobs), float16."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 9, 9), dtype=np.float32) * 0.4
    t = np.linspace(0, 8, size, dtype=np.float32)
    i, f = np.minimum(t.astype(int), 7), t - np.minimum(t.astype(int), 7)
    rows = coarse[:, i, :] * (1 - f)[None, :, None] + coarse[:, i + 1, :] * f[None, :, None]
    maps = rows[:, :, i] * (1 - f)[None, None, :] + rows[:, :, i + 1] * f[None, None, :]
    return maps.astype(np.float16)


def old_layout(out: Path, count: int, size: int) -> zarr.Array:
    """maps.zarr as vade wrote it before sharding: one chunk object per image."""
    group = zarr.open_group(out / "maps.zarr", mode="w")
    return group.create_array(
        "maps", shape=(count, size, size), chunks=(1, size, size), dtype="float16", fill_value=np.nan,
        compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), dimension_names=["image", "y", "x"],
    )  # fmt: skip


def write(layout: str, out: Path, pool: np.ndarray, count: int, shard_size: int) -> tuple[float, float]:
    """(wall s, process CPU s) to write `count` maps in `layout`."""
    size = pool.shape[1]
    t0, c0 = time.perf_counter(), time.process_time()
    if layout == "sharded":
        manifest = {"count": count, "map_size": size, "shard_size": shard_size,
                    "rows_schema": encode_schema(rows_schema(pa.schema([])))}  # fmt: skip
        store = ScanStore.create(out, manifest, {})
        for start in range(0, count, shard_size):  # scan shards in turn, batches through the writer's buffer
            buffer = MapBuffer(store, store.map_shard_images())
            for first in range(start, min(start + shard_size, count), BATCH):
                n = min(BATCH, start + shard_size - first, count - first)
                buffer.add(first, pool[np.arange(first, first + n) % len(pool)])
            buffer.flush()
    else:
        out.mkdir(parents=True)
        maps = old_layout(out, count, size)
        for first in range(0, count, BATCH):  # the writer wrote each batch at once
            n = min(BATCH, count - first)
            maps[first : first + n] = pool[np.arange(first, first + n) % len(pool)]
    return time.perf_counter() - t0, time.process_time() - c0


def footprint(folder: Path) -> tuple[int, int, int]:
    files = apparent = blocks = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files, apparent, blocks = files + 1, apparent + st.st_size, blocks + st.st_blocks * 512
    return files, apparent, blocks


def read_latency(out: Path, count: int, reads: int, pool: np.ndarray) -> dict:
    maps = zarr.open_array(out / "maps.zarr" / "maps", mode="r")
    picks = np.random.default_rng(1).integers(0, count, reads)
    times = []
    for index in picks:
        t0 = time.perf_counter()
        amap = maps[int(index)]
        times.append(time.perf_counter() - t0)
        assert np.array_equal(amap, pool[index % len(pool)])
    ms = np.asarray(times) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--root", default="/tmp/vade_map_store")
    ap.add_argument("--json", default="map_store.json")
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    pool = synthetic_maps(4096, args.size)
    raw_mb = args.maps * args.size * args.size * 2 / 1e6
    rows = []
    for layout in ("sharded", "per_image"):
        out = root / layout
        load_before = os.getloadavg()[0]
        wall, cpu = write(layout, out, pool, args.maps, args.shard_size)
        files, apparent, on_disk = footprint(out / "maps.zarr")
        latency = read_latency(out, args.maps, args.reads, pool)
        rows.append(record(
            "map_store", layout, wall, cpu, raw_mb, write_mb_s=round(raw_mb / wall, 1),
            write_mb_per_cpu_s=round(raw_mb / cpu, 1), load_average_1m=[load_before, os.getloadavg()[0]], files=files,
            bytes=apparent, bytes_on_disk=on_disk, read=latency,
            map_shard_images=map_shard_length(args.shard_size, args.size) if layout == "sharded" else 1,
        ))  # fmt: skip
        print(layout, rows[-1])
        shutil.rmtree(out)
    path = write_result(args.json, {"maps": args.maps, "map": f"{args.size}x{args.size} float16",
                                    "shard_size": args.shard_size, "raw_mb": raw_mb, "results": rows,
                                    "note": "rate = uncompressed MB/s of wall time; cpu_s = process CPU time; reads on a warm page cache; "
                                    "the 2-core machine was shared (see load_average_1m)"})  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
