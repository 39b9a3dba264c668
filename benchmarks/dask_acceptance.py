"""Issue 5 acceptance on ../shared/data through the real command: `vade scan --workers 1` equals
`--workers 2`, and equals `--workers 2` with one worker process SIGKILLed mid-scan.

    PYTHONPATH=. python benchmarks/dask_acceptance.py --model MODEL_DIR [--source DIR] [--shard-size 16]

Runs the three commands as subprocesses (the kill: after --kill-after seconds, one of the scan
process's worker children, found by its parent pid, gets SIGKILL; Dask reruns its shard elsewhere and the
nanny restarts it), then compares scores.parquet and maps.zarr bitwise. Writes
benchmarks/results/dask_acceptance.json with commands, wall times, load average and the comparison.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _worker_children(pid: int) -> list[int]:
    """Dask worker processes started by the scan process `pid` (multiprocessing spawn children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _run(cmd: list[str], kill_after: float | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load = list(os.getloadavg())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    if kill_after is not None:
        time.sleep(kill_after)
        workers = _worker_children(proc.pid)
        if workers and proc.poll() is None:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
    out, err = proc.communicate(timeout=3600)
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": out.strip().splitlines()[-1] if out.strip() else "",
        "stderr_tail": err.strip().splitlines()[-3:],
        "killed_worker_pid": killed,
        "load_average_before": load,
    }


def _same(a: Path, b: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    rows_a, rows_b = pq.read_table(a / "scores.parquet"), pq.read_table(b / "scores.parquet")
    maps_a = zarr.open_group(a / "maps.zarr", mode="r")["maps"][:]
    maps_b = zarr.open_group(b / "maps.zarr", mode="r")["maps"][:]
    return {
        "rows": rows_a.num_rows,
        "rows_bitwise_equal": rows_a.equals(rows_b),
        "maps_bitwise_equal": bool(np.array_equal(maps_a, maps_b, equal_nan=True)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--source", default=str(REPO / ".." / "shared" / "data" / "mvtec_bottle" / "bottle"))
    parser.add_argument("--shard-size", default="16")
    parser.add_argument("--kill-after", type=float, default=15.0)
    args = parser.parse_args()
    from benchmarks._env import write_result

    work = Path(tempfile.mkdtemp(prefix="vade_dask_acceptance_"))
    base = [sys.executable, "-m", "engine.cli", "scan", args.model, str(Path(args.source).resolve())]
    flags = ["--device", "cpu", "--shard-size", args.shard_size, "--quiet"]
    runs = {
        "workers_1": _run([*base, "--out", str(work / "w1"), "--workers", "1", *flags], None),
        "workers_2": _run([*base, "--out", str(work / "w2"), "--workers", "2", *flags], None),
        "workers_2_one_killed": _run([*base, "--out", str(work / "w2k"), "--workers", "2", *flags], args.kill_after),
    }
    for name, run in runs.items():
        print(name, run, flush=True)
    comparison = {
        "workers_2_vs_workers_1": _same(work / "w2", work / "w1"),
        "workers_2_one_killed_vs_workers_1": _same(work / "w2k", work / "w1"),
    }
    print(comparison)
    path = write_result(
        "dask_acceptance.json", {"benchmark": "dask_acceptance", "runs": runs, "comparison": comparison}
    )
    print(f"written: {path} (outputs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
