"""SIGINT and SIGTERM stop a scan at a clean point, exit 130 / 143 with one line, and --resume then gives
the same bytes as an uninterrupted scan (as tests/test_scan_resume.py does for SIGKILL)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.cli.main import main as cli_main
from engine.scan.job import scan
from engine.scan.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"device": "cpu", "shard_size": 8, "batch_size": 8, "decoder": "pillow"}
FLAGS = ["--device", "cpu", "--shard-size", "8", "--batch-size", "8", "--decoder", "pillow", "--quiet"]

_spec = importlib.util.spec_from_file_location("compare_scans", REPO / "benchmarks" / "compare_scans.py")
compare_scans = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_scans)


def _markers(out: Path) -> int:
    return len(list((out / "_done").glob("shard-*.json"))) if (out / "_done").is_dir() else 0


def _wait_for_markers(out: Path, count: int, alive=lambda: True) -> None:
    deadline = time.monotonic() + 300
    while _markers(out) < count and alive() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clean(scan_model_dir: Path, many_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("signals_clean") / "out"
        scan(scan_model_dir, many_images, out, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return out


def _resume_equals_clean(model_dir: Path, source: Path, out: Path, clean: Path, stopped_at: int) -> None:
    assert not (out / "scores.parquet").exists() and not (out / LOCK_NAME).exists()
    result = scan(model_dir, source, out, resume=True, **SETTINGS)
    assert result.shards_skipped >= stopped_at and result.shards == 21
    assert compare_scans.compare(clean, out) is None


def test_sigterm_stops_with_143_and_resume_equals_a_clean_run(
    scan_model_dir: Path, many_images: Path, clean: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "engine.cli", "scan", str(scan_model_dir), str(many_images), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, *FLAGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_markers(out, 3, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vade scan: stopped by SIGTERM; "), stderr
    assert "shards are finished and kept" in lines[0] and "--resume to continue from the last finished shard" in lines[0]
    assert stdout == ""  # no summary: the scan did not complete
    stopped_at = _markers(out)
    assert 3 <= stopped_at < 21
    _resume_equals_clean(scan_model_dir, many_images, out, clean, stopped_at)


def test_sigint_stops_with_130_and_resume_equals_a_clean_run(
    scan_model_dir: Path, many_images: Path, clean: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"

    def interrupt_after_three_shards() -> None:
        _wait_for_markers(out, 3)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: delivered to the main thread, running the scan

    threading.Thread(target=interrupt_after_three_shards, daemon=True).start()
    handler = signal.getsignal(signal.SIGINT)
    code = cli_main(["scan", str(scan_model_dir), str(many_images), "--out", str(out), *FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("vade scan: stopped by SIGINT; "), err
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    stopped_at = _markers(out)
    assert 3 <= stopped_at < 21
    _resume_equals_clean(scan_model_dir, many_images, out, clean, stopped_at)
