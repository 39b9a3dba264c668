"""Resume after SIGKILL: a scan killed mid-way and resumed equals an uninterrupted scan, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from engine.scan.job import scan

REPO = Path(__file__).resolve().parents[1]


def _markers(out: Path) -> int:
    return len(list((out / "_done").glob("shard-*.json"))) if (out / "_done").is_dir() else 0


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Every scan of this test on one torch thread: CPU kernels split sums by thread count, and other
    tests in the same process may have changed it; the subprocess gets OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_sigkill_then_resume_equals_a_clean_run(
    scan_model_dir: Path, many_images: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    settings = ["--shard-size", "8", "--batch-size", "8", "--device", "cpu"]
    clean = tmp_path / "clean"
    scan(scan_model_dir, many_images, clean, device="cpu", shard_size=8, batch_size=8)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "engine.cli", "scan", str(scan_model_dir), str(many_images), "--out", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, *settings, "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _markers(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_when_killed = _markers(killed)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert 3 <= done_when_killed < 21 and not (killed / "scores.parquet").exists()

    result = scan(scan_model_dir, many_images, killed, device="cpu", shard_size=8, batch_size=8, resume=True)
    assert result.shards_skipped >= done_when_killed and result.shards == 21
    clean_rows, resumed_rows = pq.read_table(clean / "scores.parquet"), pq.read_table(killed / "scores.parquet")
    assert resumed_rows.num_rows == 162 and resumed_rows.equals(clean_rows)
    assert resumed_rows.column("status").to_pylist().count("error") == 2
    clean_maps = zarr.open_group(clean / "maps.zarr", mode="r")["maps"][:]
    resumed_maps = zarr.open_group(killed / "maps.zarr", mode="r")["maps"][:]
    assert np.array_equal(clean_maps, resumed_maps, equal_nan=True)
    assert (result.counts.ok, result.counts.error) == (160, 2)
