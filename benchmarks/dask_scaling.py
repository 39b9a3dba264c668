"""Distributed scan throughput at 1 and 2 local Dask workers on ../shared/data, and whether results agree.

    PYTHONPATH=. python benchmarks/dask_scaling.py [--model MODEL_DIR] [--images 96] [--shard-size 16]

Fits the default model (PatchCore, efficientnet_lite0, 256 px) on bottle train/good unless --model is
given, lists the first --images bottle images (train then test), and scans them:
  - in one process (engine.scan.job.scan, torch on all cores) for reference;
  - on local clusters of (workers x torch threads per worker): 1x1 (= `--workers 1`), 2x1
    (= `--workers 2`) and 1x2 (API torch_threads=2). Cluster start-up is timed apart; images/s is the scan itself.
Every configuration runs --rounds times, interleaved, since other work on the machine moves the
numbers; CPU seconds of the scanning processes are recorded too (images per CPU-second does not
depend on how much of the machine others take).
Agreement: 1x1 and 2x1 use the same thread count and must be bitwise equal (rows and maps); runs with
another thread count differ by float rounding only (torch's CPU sums depend on the thread split), and
the largest differences are reported. Shards are small (--shard-size 16) so that two workers share a
small set; on CPU workers a shard of 16 is still ~10 s of work against ~0.15 s overhead per shard
(benchmarks/dask_overhead.py). Result: benchmarks/results/dask_scaling.json (machine, versions, load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _outputs(out: Path):
    import pyarrow.parquet as pq
    import zarr

    return pq.read_table(out / "scores.parquet"), zarr.open_group(out / "maps.zarr", mode="r")["maps"][:]


def _compare(a: Path, b: Path) -> dict:
    import numpy as np

    (rows_a, maps_a), (rows_b, maps_b) = _outputs(a), _outputs(b)
    raw_a, raw_b = rows_a.column("raw_score").to_numpy(), rows_b.column("raw_score").to_numpy()
    finite = np.isfinite(maps_a) & np.isfinite(maps_b)
    return {
        "rows_bitwise_equal": rows_a.equals(rows_b),
        "maps_bitwise_equal": bool(np.array_equal(maps_a, maps_b, equal_nan=True)),
        "same_paths_status_flags": all(
            rows_a.column(c).equals(rows_b.column(c)) for c in ("path", "index", "status", "is_anomalous")
        ),
        "max_abs_raw_score_diff": float(np.max(np.abs(raw_a - raw_b))),
        "max_rel_raw_score_diff": float(np.max(np.abs(raw_a - raw_b) / np.maximum(np.abs(raw_a), 1e-12))),
        "max_abs_map_diff": float(
            np.max(np.abs(maps_a[finite].astype(np.float32) - maps_b[finite].astype(np.float32)))
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "mvtec_bottle" / "bottle"))
    parser.add_argument("--model", help="an existing model folder (default: fit the default model first)")
    parser.add_argument("--images", type=int, default=0, help="first N bottle images (0: all 292)")
    parser.add_argument("--rounds", type=int, default=2, help="run every configuration this many times, interleaved")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="workers x torch threads, comma-separated")
    parser.add_argument("--no-single", action="store_true", help="skip the one-process reference scan")
    args = parser.parse_args()

    import torch

    from benchmarks._env import write_result
    from engine.distributed.cluster import ClusterRequest, connect
    from engine.distributed.driver import scan_on_cluster
    from engine.inputs.datasets import list_images
    from engine.scan.job import scan

    work = Path(tempfile.mkdtemp(prefix="vade_dask_scaling_"))
    data = Path(args.data)
    fit_seconds = None
    model_dir = Path(args.model) if args.model else work / "model"
    if not args.model:
        from engine.api import fit
        from engine.config import FitConfig

        t0 = time.perf_counter()
        fit(list_images(data / "train" / "good"), FitConfig(device="cpu")).save(model_dir)
        fit_seconds = round(time.perf_counter() - t0, 1)
    meta = json.loads((model_dir / "model.json").read_text())
    files = list_images(data / "train") + list_images(data / "test")
    files = files[: args.images] if args.images else files
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in files), encoding="utf-8")
    settings = {"device": "cpu", "shard_size": args.shard_size}
    runs: dict = {}

    def record(name: str, entry: dict) -> None:
        entry["images_per_second"] = round(len(files) / entry["scan_seconds"], 3)
        entry["images_per_cpu_second"] = round(len(files) / entry["cpu_seconds"], 3)
        runs.setdefault(name, []).append(entry)
        print(name, entry, flush=True)

    for round_ in range(args.rounds):
        suffix = "" if round_ == 0 else f"_r{round_}"  # outputs of round 0 are compared below
        if not args.no_single:
            load = list(os.getloadavg())
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = scan(model_dir, listing, work / f"single{suffix}", **settings)
            record("single_process", {
                "torch_threads": torch.get_num_threads(),
                "scan_seconds": round(time.perf_counter() - t0, 2),
                "cpu_seconds": round(time.process_time() - cpu0, 2),
                "decoder": result.decoder,
                "load_average_before": load,
                "load_average_after": list(os.getloadavg()),
            })  # fmt: skip
        for config in args.configs.split(","):
            workers, threads = (int(x) for x in config.split("x"))
            load = list(os.getloadavg())
            t0 = time.perf_counter()
            with connect(ClusterRequest(workers=workers, torch_threads=threads)) as client:
                client.wait_for_workers(workers)
                startup = time.perf_counter() - t0
                cpu0 = sum(client.run(time.process_time).values())
                t1 = time.perf_counter()
                result = scan_on_cluster(model_dir, listing, work / f"{config}{suffix}", client=client, **settings)
                seconds = time.perf_counter() - t1
                cpu = sum(client.run(time.process_time).values()) - cpu0  # worker processes only
            times = result.times
            record(config, {
                "workers": workers,
                "torch_threads_per_worker": threads,
                "cluster_start_seconds": round(startup, 2),
                "scan_seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "worker_seconds_per_stage_summed": {
                    k: round(getattr(times, k), 2) for k in ("decode", "features", "scoring", "write")
                },
                "ok": result.counts.ok,
                "error": result.counts.error,
                "decoder": result.decoder,
                "load_average_before": load,
                "load_average_after": list(os.getloadavg()),
            })  # fmt: skip

    def median_rate(name: str) -> float:
        rates = sorted(entry["images_per_second"] for entry in runs[name])
        return rates[len(rates) // 2]

    agreement = {}
    names = list(args.configs.split(",")) + ([] if args.no_single else ["single"])
    base = "2x1" if "2x1" in names else names[0]
    for name in names:
        if name != base:
            agreement[f"{name}_vs_{base}"] = _compare(work / name, work / base)
    print(agreement, flush=True)
    path = write_result(
        "dask_scaling.json",
        {
            "benchmark": "dask_scaling",
            "data": {"images": len(files), "source": "bottle train then test", "shard_size": args.shard_size},
            "model": {
                "dir": str(model_dir),
                "fit_seconds": fit_seconds,
                **{k: meta.get(k) for k in ("method", "backbone", "layers", "input_size", "bank_size")},
            },
            "runs": runs,
            "median_images_per_second": {name: median_rate(name) for name in runs},
            "speedup_2x1_over_1x1": round(median_rate("2x1") / median_rate("1x1"), 3)
            if {"1x1", "2x1"} <= set(runs)
            else None,
            "agreement": agreement,
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
