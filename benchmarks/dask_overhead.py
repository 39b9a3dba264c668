"""Dask scheduler overhead per task on this machine, and a distributed scan's fixed cost per shard.

    PYTHONPATH=. python benchmarks/dask_overhead.py [--tasks 1000,5000,10000] [--workers 2]

On a local cluster of `--workers` processes (one thread each, as `vade scan --workers N` makes):
  1. bulk: N no-op tasks submitted at once (client.map) and waited for: scheduler throughput;
  2. windowed: N no-op tasks with one in flight per worker thread, the next submitted when one
     finishes (as_completed) - the pattern engine.distributed.driver's driver uses; its per-task time is
     the gap a worker sits idle between two shards;
  3. windowed, each task carrying a 1,024-record shard as the driver ships it (PackedShard), and
     for comparison as a Shard of Record objects (300 tasks);
  4. a real shard task (engine.distributed.worker.scan_piece on a 64 px model) with 8 and with 32
     images per shard: the difference gives the fixed cost per shard (scheduler round trip, open the
     scan, build the decoder, start and drain the loader/writer threads, write a Parquet part and a
     marker) apart from per-image work;
  5. the driver's own work for a huge scan: plan a 1,000,000-row Parquet manifest, cut it into
     1,024-image shards and pack each one; peak memory at two sizes (the plan is streamed, never held).
Results go to benchmarks/results/dask_overhead.json with machine, date, versions, load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def noop(x: object) -> int:
    return 0


def _bulk(client, n: int) -> float:
    from distributed import wait

    t0 = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    wait(futures)
    seconds = time.perf_counter() - t0
    del futures
    return seconds


def _windowed(client, n: int, payload: object = None) -> float:
    from distributed import as_completed

    window = sum(client.nthreads().values())
    t0 = time.perf_counter()
    done = as_completed()
    submitted = 0
    while submitted < min(window, n):
        done.add(client.submit(noop, payload, pure=False))
        submitted += 1
    for future in done:
        future.release()
        if submitted < n:
            done.add(client.submit(noop, payload, pure=False))
            submitted += 1
    return time.perf_counter() - t0


def _shard_payload(size: int, packed: bool = True):
    """A shard of `size` records with archive-like paths, as the driver ships it (packed) or as Record objects."""
    import pyarrow as pa

    from engine.distributed.worker import PackedShard
    from engine.inputs.sources import Record, Shard

    base = "/data/archive/2024/site-0042/camera-07/frame_"
    shard = Shard(7, 7 * size, [Record(7 * size + i, f"{base}{i:08d}.jpg", f"{base}{i:08d}.jpg") for i in range(size)])
    return PackedShard.pack(shard, pa.schema([])) if packed else shard


def _real_shard_cost(client, work: Path, small: int = 8, large: int = 32, repeats: int = 7) -> dict:
    """Median seconds per real shard task of `small` and `large` images (64 px model, default decoder).

    Both sizes are whole micro-batches (8 images on CPU), so the difference is per-image work and
    fixed = t_small - small * (t_large - t_small) / (large - small) is what a shard costs beyond its images.
    """
    from engine.api import fit
    from engine.config import FitConfig
    from engine.distributed.driver import _absolute
    from engine.distributed.worker import PackedShard, scan_piece
    from engine.inputs.datasets import list_images
    from engine.inputs.sources import iter_shards
    from engine.scan.job import open_scan
    from engine.scan.options import ScanOptions

    bottle = REPO / ".." / "shared" / "data" / "mvtec_bottle" / "bottle"
    images = list_images(bottle / "test" / "good")[:16]
    fit(list_images(bottle / "train" / "good")[:14], FitConfig(input_size=64, coreset_ratio=0.1, device="cpu")).save(
        work / "m"
    )
    listing = work / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images * (large * (repeats + 1) // len(images) + 1)))
    seconds = {}
    for size in (small, large):
        options = ScanOptions(device="cpu", shard_size=size, batch_size=8)
        job = open_scan(work / "m", listing, work / f"scan{size}", options)
        shards = [PackedShard.pack(_absolute(s), job.source.extra_schema) for s in iter_shards(job.source, size)]
        args = (str(work / f"scan{size}"), str(work / "m"))
        client.submit(scan_piece, *args, shards[0], True, options, "warm", None, pure=False).result()  # model load
        times = []
        for shard in shards[1 : repeats + 1]:
            t0 = time.perf_counter()
            client.submit(scan_piece, *args, shard, True, options, f"s{size}-{shard.id}", None, pure=False).result()
            times.append(time.perf_counter() - t0)
        seconds[size] = sorted(times)[len(times) // 2]
        decoder = client.submit(
            lambda: __import__("engine.inputs.decoders").decoders.make_decoder("auto", __import__("torch").device("cpu")).name
        ).result()
    per_image = (seconds[large] - seconds[small]) / (large - small)
    return {
        f"median_seconds_per_task_{small}_images": round(seconds[small], 4),
        f"median_seconds_per_task_{large}_images": round(seconds[large], 4),
        "per_image_seconds": round(per_image, 4),
        "fixed_seconds_per_shard": round(seconds[small] - small * per_image, 4),
        "decoder": decoder,
        "note": "one task at a time, submit to result (scheduler round trip included); 64 px PatchCore on CPU",
    }


def _driver_plan_cost(work: Path, rows: int, shard_size: int = 1024) -> dict:
    """The driver's side of a huge scan: plan a `rows`-line Parquet manifest (one streaming pass), then cut
    it into shards and pack each as the driver ships it. Seconds on `rows`; peak Python memory
    (tracemalloc, which slows Python several times) on manifests of rows/10 and rows/5: the same peak
    at both sizes shows that nothing grows with the listing."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.distributed.driver import _absolute
    from engine.distributed.worker import PackedShard
    from engine.inputs.sources import iter_shards, open_source, plan

    def manifest(n: int) -> Path:
        path = work / f"manifest_{n}.parquet"
        base = "archive/2024/site-0042/camera-07/frame_"
        pq.write_table(pa.table({"path": [f"{base}{i:09d}.jpg" for i in range(n)], "site": ["s42"] * n}), path)
        return path

    def passes(path: Path) -> tuple[float, float, int]:
        source = open_source(path)
        t0 = time.perf_counter()
        count = plan(source).count
        t1 = time.perf_counter()
        for shard in iter_shards(source, shard_size):
            PackedShard.pack(_absolute(shard), source.extra_schema)
        return t1 - t0, time.perf_counter() - t1, count

    plan_s, cut_s, count = passes(manifest(rows))
    out = {
        "rows": rows,
        "shard_size": shard_size,
        "plan_seconds": round(plan_s, 2),
        "cut_and_pack_seconds": round(cut_s, 2),
        "us_per_row_plan": round(plan_s / count * 1e6, 2),
        "ms_per_shard_cut_and_pack": round(cut_s / (count / shard_size) * 1e3, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for n in (rows // 10, rows // 5):
        path = manifest(n)
        tracemalloc.start()
        passes(path)
        out[f"peak_python_mib_at_{n}_rows"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return out


def main() -> int:
    from benchmarks._env import write_result

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="1000,5000,10000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-real-shard", action="store_true", help="skip part 4 (needs ../shared/data)")
    parser.add_argument(
        "--manifest-rows", type=int, default=1_000_000, help="part 5: driver plan of a manifest this long"
    )
    args = parser.parse_args()
    from engine.distributed.cluster import ClusterRequest, connect

    counts = [int(n) for n in args.tasks.split(",")]
    load_before = list(os.getloadavg())
    results: dict = {"bulk": {}, "windowed": {}, "windowed_with_1024_record_shard": {}}
    work = Path(tempfile.mkdtemp(prefix="vade_dask_overhead_"))
    t0 = time.perf_counter()
    with connect(ClusterRequest(workers=args.workers)) as client:
        startup = time.perf_counter() - t0
        client.submit(noop, 0, pure=False).result()  # warm
        payload, unpacked = _shard_payload(1024), _shard_payload(1024, packed=False)
        import pickle

        payload_bytes = {"packed": len(pickle.dumps(payload)), "record_objects": len(pickle.dumps(unpacked))}
        results["windowed_with_1024_record_objects"] = {}
        for n in counts:
            for name, tasks, run in (
                ("bulk", n, lambda tasks: _bulk(client, tasks)),
                ("windowed", n, lambda tasks: _windowed(client, tasks)),
                ("windowed_with_1024_record_shard", min(n, 2000), lambda tasks: _windowed(client, tasks, payload)),
                ("windowed_with_1024_record_objects", min(n, 300), lambda tasks: _windowed(client, tasks, unpacked)),
            ):
                seconds = run(tasks)
                results[name][str(tasks)] = {
                    "seconds": round(seconds, 3),
                    "ms_per_task": round(seconds / tasks * 1e3, 3),
                    "tasks_per_second": round(tasks / seconds, 1),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
                print(name, tasks, results[name][str(tasks)], flush=True)
        if not args.no_real_shard:
            results["real_shard_task"] = _real_shard_cost(client, work)
            print("real shard", results["real_shard_task"], flush=True)
    if args.manifest_rows:
        results["driver_plan"] = _driver_plan_cost(work, args.manifest_rows)
        print("driver plan", results["driver_plan"], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    path = write_result(
        "dask_overhead.json",
        {
            "benchmark": "dask_overhead",
            "cluster": {"workers": args.workers, "threads_per_worker": 1, "startup_seconds": round(startup, 2)},
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "shard_payload_pickled_bytes_1024_records": payload_bytes,
            "results": results,
        },
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
