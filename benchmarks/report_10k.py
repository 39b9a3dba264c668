"""Time `vade report` on a 10,000-row scan output folder.

The folder is synthesised to look like a real scan of 256 px images: paths of real images from
../shared/data (MVTec layout, so labels are known), 1% error rows with a few kinds of message, scores
from a normal-plus-anomalies mixture with two drifted shards, and maps.zarr with one zstd float16
chunk per image holding smooth blob-shaped anomaly maps. Then `vade report` runs as a subprocess
(`python -m engine.cli report OUT_DIR`) several times, and engine.report.page alone in a fresh interpreter
(import and build timed apart); wall times and peak memory are kept.

    PYTHONPATH=. python benchmarks/report_10k.py [--rows 10000] [--repeats 3] [--work DIR]

Writes benchmarks/results/report_10k.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from scipy import ndimage
from zarr.codecs import ZstdCodec

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
SIZE = 256
SHARD_SIZE = 256


def real_images() -> list[tuple[str, str | None]]:
    """(path, defect or None) for every real image of ../shared/data."""
    from engine.inputs.datasets import list_images

    out = []
    for category in (SHARED / "mvtec_bottle" / "bottle", SHARED / "deeppcb" / "pcb"):
        for path in list_images(category / "train" / "good"):
            out.append((str(path), None))
        for path in list_images(category / "test"):
            out.append((str(path), path.parent.name))
    if not out:
        sys.exit(f"no images under {SHARED}: this benchmark reads real image paths from there")
    return out


def blob_map(rng: np.random.Generator, score: float) -> np.ndarray:
    """A smooth map: low-level texture everywhere, one blob whose peak is the image score."""
    small = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (32, 32)), 2.0)
    base = np.kron(small, np.ones((8, 8))) * 0.05
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.integers(30, SIZE - 30, 2)
    radius = rng.uniform(8, 30)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return (base + blob * max(score, 0.05)).astype(np.float16)


def synthesise(out_dir: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = real_images()
    picks = [images[i % len(images)] for i in rng.permutation(rows)]
    shards = np.arange(rows) // SHARD_SIZE
    anomalous = np.array([d not in (None, "good") for _, d in picks])
    scores = rng.normal(0.0, 0.2, rows) + anomalous * rng.gamma(3.0, 0.5, rows)
    scores[np.isin(shards, (11, 29))] += 0.35  # two shards under new lighting
    errors = rng.random(rows) < 0.01
    messages = np.array([
        "not a readable image: UnidentifiedImageError: cannot identify image file",
        "empty file (0 bytes)",
        "image is 30000x30000 = 900000000 pixels, over the limit of 400000000",
    ])
    error_text = messages[rng.integers(0, len(messages), rows)]
    index = np.where(errors, -1, np.arange(rows))

    out_dir.mkdir(parents=True)
    maps = zarr.open_group(out_dir / "maps.zarr", mode="w").create_array(
        "maps", shape=(rows, SIZE, SIZE), chunks=(1, SIZE, SIZE), dtype="float16", fill_value=np.nan,
        compressors=ZstdCodec(level=3), dimension_names=["image", "y", "x"],
    )
    block = 64
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        maps[start:stop] = np.stack([blob_map(rng, float(scores[i])) for i in range(start, stop)])
    table = pa.table({
        "path": [p for p, _ in picks],
        "index": index.astype(np.int64),
        "score": pa.array(np.where(errors, np.nan, scores).astype(np.float32), mask=errors),
        "is_anomalous": (scores >= 0.5) & ~errors,
        "status": np.where(errors, "error", "ok"),
        "error": pa.array([f"{error_text[i]} '{picks[i][0]}'" if errors[i] else None for i in range(rows)]),
        "raw_score": pa.array((scores * 0.8 + 2.0).astype(np.float32), mask=errors),
        "width": pa.array(np.full(rows, SIZE, np.int32), mask=errors),
        "height": pa.array(np.full(rows, SIZE, np.int32), mask=errors),
        "position": np.arange(rows, dtype=np.int64),
        "shard": shards.astype(np.int32),
    })
    pq.write_table(table, out_dir / "scores.parquet", compression="zstd")
    normal = rng.normal(0.0, 0.2, 40)
    meta = {
        "method": "patchcore", "backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "input_size": SIZE,
        "bank_size": 19_251, "threshold": 2.4, "config": {"target_false_alarm_rate": 0.01},
        "calibration": {"source": "holdout", "normal_scores_normalized": normal.tolist()},
    }
    (out_dir / "model.json").write_text(json.dumps(meta))
    (out_dir / "scan.json").write_text(json.dumps({"source": str(SHARED), "count": rows, "images_per_second": 14.0}))


_IN_PROCESS = """
import json, resource, sys, time
t0 = time.perf_counter()
from engine.report.page import build_report
t1 = time.perf_counter()
build_report(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_cli(out_dir: Path) -> float:
    """Wall seconds of `python -m engine.cli report OUT_DIR`, as a user runs it."""
    command = [sys.executable, "-m", "engine.cli", "report", str(out_dir)]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, check=True)
    return time.perf_counter() - started


def run_in_process(out_dir: Path) -> dict:
    """engine.report.page alone in a fresh interpreter: import seconds, build seconds, peak RSS."""
    command = [sys.executable, "-c", _IN_PROCESS, str(out_dir)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vade_report_10k"))
    args = parser.parse_args()
    out_dir = args.work / f"scan_{args.rows}"
    if not (out_dir / "scores.parquet").is_file():
        started = time.perf_counter()
        synthesise(out_dir, args.rows)
        print(f"synthesised {out_dir} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    cli_seconds = [run_cli(out_dir) for _ in range(args.repeats)]
    in_process = [run_in_process(out_dir) for _ in range(args.repeats)]
    import matplotlib
    import sklearn

    result = {
        "benchmark": "vade report on a synthesised scan folder",
        "command": f"PYTHONPATH=. python benchmarks/report_10k.py --rows {args.rows} --repeats {args.repeats}",
        "timed": {
            "cli_seconds": "python -m engine.cli report OUT_DIR as a subprocess: interpreter start, the CLI's "
            "imports and the report",
            "build_seconds": "engine.report.page.build_report(OUT_DIR) alone, after its imports, in a fresh interpreter",
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"numpy": np.__version__, "pyarrow": pa.__version__, "zarr": zarr.__version__,
                     "matplotlib": matplotlib.__version__, "scikit-learn": sklearn.__version__},
        "rows": args.rows,
        "maps_zarr_mb": round(sum(f.stat().st_size for f in (out_dir / "maps.zarr").rglob("*") if f.is_file()) / 1e6, 1),
        "report_mb": round((out_dir / "report.html").stat().st_size / 1e6, 2),
        "cli_seconds": [round(x, 3) for x in cli_seconds],
        "cli_seconds_median": round(float(np.median(cli_seconds)), 3),
        "cli_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "import_seconds": [round(r["import_s"], 3) for r in in_process],
        "build_seconds": [round(r["build_s"], 3) for r in in_process],
        "build_seconds_median": round(float(np.median([r["build_s"] for r in in_process])), 3),
        "report_only_peak_rss_mb": round(max(r["peak_rss_mb"] for r in in_process), 1),
    }
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "report_10k.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
