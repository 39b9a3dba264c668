"""What the deadline reader costs: reading real image files through engine.inputs.reader vs a plain read.

    PYTHONPATH=. python benchmarks/read_files.py [--repeat 7] [--batch 32]

Reads every image of ../shared/data/mvtec_bottle/bottle (train + test, warm page cache) three ways:
  - plain:      Path.read_bytes() one file after another (what the loader did before);
  - read_file:  engine.inputs.reader.read_file one after another (stat, non-blocking open, fstat,
                read, fstat, on the reader pool, waited for with a deadline);
  - read_files: engine.inputs.reader.read_files a batch at a time (the scan loader's way: the pool's
                threads read a batch in parallel).
Reports the median over --repeat passes of microseconds per file and MB/s. Local page-cache reads
show the overhead only; on network storage the parallel batch read also hides latency (not measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._env import write_result  # noqa: E402
from engine.inputs.datasets import list_images  # noqa: E402
from engine.inputs.reader import read_file, read_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    bottle = REPO / ".." / "shared" / "data" / "mvtec_bottle" / "bottle"
    files = [str(p) for p in list_images(bottle)]
    total = sum(len(Path(f).read_bytes()) for f in files)  # also warms the page cache

    def plain() -> None:
        for f in files:
            Path(f).read_bytes()

    def one_by_one() -> None:
        for f in files:
            read_file(f)

    def batched() -> None:
        for start in range(0, len(files), args.batch):
            read_files(files[start : start + args.batch])

    results = {}
    for name, fn in (("plain", plain), ("read_file", one_by_one), ("read_files", batched)):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        results[name] = {"us_per_file": round(median / len(files) * 1e6, 1), "MB_per_s": round(total / median / 1e6, 1)}
        print(f"{name:>10}: {results[name]['us_per_file']:8.1f} us/file  {results[name]['MB_per_s']:8.1f} MB/s")
    import os

    out = write_result(
        "read_files.json",
        {"files": len(files), "bytes": total, "batch": args.batch, "repeat": args.repeat,
         "load_average": os.getloadavg(), "results": results},
    )  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
