"""Compare two scan folders bitwise: scores.parquet (every column, every row) and maps.zarr (every value).

    python benchmarks/compare_scans.py OUT_A OUT_B [OUT_A2 OUT_B2 ...]

Exit 0 when every pair is identical, 1 otherwise; one line per pair says what differs. Used to check
that a refactor, a store layout or a distributed run changes nothing (NaN slots compare equal).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr


def compare(a: Path, b: Path) -> str | None:
    """None when the two scans hold the same rows and maps, else what differs."""
    rows_a, rows_b = pq.read_table(a / "scores.parquet"), pq.read_table(b / "scores.parquet")
    if rows_a.schema != rows_b.schema:
        return f"schemas differ: {rows_a.schema.names} vs {rows_b.schema.names}"
    if not rows_a.equals(rows_b):
        bad = [name for name in rows_a.schema.names if not rows_a[name].equals(rows_b[name])]
        return f"rows differ in columns {bad}"
    maps_a = zarr.open_group(a / "maps.zarr", mode="r")["maps"]
    maps_b = zarr.open_group(b / "maps.zarr", mode="r")["maps"]
    if maps_a.shape != maps_b.shape or maps_a.dtype != maps_b.dtype:
        return f"maps are {maps_a.dtype}{maps_a.shape} vs {maps_b.dtype}{maps_b.shape}"
    for start in range(0, maps_a.shape[0], 256):
        block_a, block_b = maps_a[start : start + 256], maps_b[start : start + 256]
        if block_a.tobytes() != block_b.tobytes() and not np.array_equal(block_a, block_b, equal_nan=True):
            return f"maps differ from image {start} on"
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    same = True
    for a, b in zip(argv[::2], argv[1::2], strict=True):
        problem = compare(Path(a), Path(b))
        rows = pq.read_metadata(Path(a) / "scores.parquet").num_rows
        print(f"{a} vs {b}: {'identical' if problem is None else problem} ({rows} rows)")
        same &= problem is None
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
