"""The first GPU run's scripts stay runnable: shell syntax, and the probe steps that need no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["device_all.sh", "device_kernels.sh", "compile_sm90.sh"])
def test_shell_syntax(script: str) -> None:
    out = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_probe_versions_and_decoders_without_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU dry-run path")
    result = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for step in ("versions", "decoders", "kernels"):
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_probe.py"), "--json", str(result),
                              "--work", str(tmp_path / "work"), step], env={**env, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(result.read_text())
    assert data["versions"]["decoder_auto"] in ("dali", "pillow") and data["versions"]["cuda"] is False
    assert data["decoders"]["status"] == "ok"
    rows = next(v for k, v in data["decoders"].items() if k.startswith("nvjpeg"))
    assert rows["exif_6.jpg"]["shape"] == [96, 64, 3] and all(r["ok"] for r in rows.values())
    assert data["kernels"]["status"].startswith("skipped: no CUDA")


def test_device_all_bench_steps_dry_run(tmp_path: Path) -> None:
    """`device_all.sh --dry-run --bench`: steps 1, 6 (vade bench) and 7 (a Dask bench) run small on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU dry-run path")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "device_all.sh"), "--dry-run", "--bench"],
                         env={**env, "OUT": str(tmp_path), "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    summary = (tmp_path / "device_all_summary.txt").read_text()
    assert out.returncode == 0, summary + out.stdout[-3000:] + (tmp_path / "device_all_log.txt").read_text()[-3000:]
    assert "6 vade bench (CPU, small)" in summary and "7 vade bench --gpus 1 (CPU: --workers 1)" in summary
    assert "FAILED" not in summary and "TIMED OUT" not in summary
    bench = json.loads((tmp_path / "bench_cpu_dryrun.json").read_text())
    assert bench["scan"]["ok"] == 16 and bench["baseline"]["status"] == "ok"
    assert [row["bank_rows"] for row in bench["sweep"]["bank"]] == [1_000, 10_000]
    dask = json.loads((tmp_path / "bench_workers1_dryrun.json").read_text())
    assert len(dask["scan"]["workers"]) == 1 and dask["scan"]["ok"] == 16


def test_device_all_refuses_unknown_flags(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "device_all.sh"), "--fast"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path)}, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "usage:" in out.stderr
