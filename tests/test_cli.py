"""The command line as a user runs it: subprocesses, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def vade(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    run = vade("demo", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.95
    assert (tmp_path / "demo" / "model" / "model.json").is_file()
    assert "demo outputs:" in run.stdout


def test_fit_then_eval_on_a_folder(demo_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    run = vade("fit", str(demo_root), "--category", "weave", "--out", str(model), "--input-size", "64",
               "--method", "padim", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "fit features: " in run.stderr and " images (100.0%)" in run.stderr  # the feature pass's progress
    assert json.loads((model / "model.json").read_text())["method"] == "padim"
    core = vade("fit", str(demo_root), "--category", "weave", "--out", str(tmp_path / "pc"), "--input-size", "64",
                "--device", "cpu")
    assert core.returncode == 0, core.stderr
    assert "coreset: " in core.stderr and " picks (100.0%)" in core.stderr  # the coreset's progress
    again = vade("fit", str(demo_root), "--category", "weave", "--out", str(model))
    assert again.returncode == 2 and "--force" in again.stderr
    out = tmp_path / "metrics.json"
    run = vade("eval", str(model), str(demo_root), "--category", "weave", "--json", str(out), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect"} <= set(result)
    assert "img AUROC" in run.stdout


def test_fit_layer_balance_flag_reaches_the_model(demo_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    run = vade("fit", str(demo_root), "--category", "weave", "--out", str(model), "--input-size", "64",
               "--coreset-ratio", "0.25", "--layer-balance", "variance", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    meta = json.loads((model / "model.json").read_text())
    assert meta["config"]["layer_balance"] == "variance"
    weights = meta["fit"]["layer_weights"]
    assert len(weights) == 2 and weights[0] != 1.0 and weights[0] * weights[1] == pytest.approx(1.0, rel=1e-3)


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    run = vade("eval", str(tmp_path / "missing"), str(tmp_path))
    assert run.returncode == 2
    assert "model directory not found" in run.stderr and "Traceback" not in run.stderr
    run = vade("fit", str(tmp_path), "--out", str(tmp_path / "m"), "--backbone", "wide_resnet50_2")
    assert run.returncode == 2 and "--weights PATH" in run.stderr
