"""`vade bench` as a user runs it: subprocesses, real files, a real scan, a real Dask LocalCluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def vade(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One bench of 12 synthetic 128 px images with the default model, its work folder kept."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench.json"
    run = vade("bench", "--images", "12", "--image-size", "128", "--device", "cpu", "--json", str(out),
               "--keep", str(root / "work"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), root / "work", run.stdout


def test_bench_reports_every_stage_end_to_end_and_a_baseline(bench: tuple[dict, Path, str]) -> None:
    result, _, stdout = bench
    assert {"date", "command", "machine", "versions"} <= set(result) and result["command"].startswith("vade bench")
    scan = result["scan"]
    assert scan["images"] == scan["ok"] == 12 and scan["errors"] == 0
    assert set(scan["stages"]) == set(STAGES)
    assert all(scan["stages"][name]["seconds"] > 0 for name in STAGES)  # every stage was timed in the real loop
    for key in ("share", "cpu_share"):
        shares = sum(row[key] for row in scan["stages"].values())
        assert 0.99 <= shares <= 1.0 + 1e-3
    assert all(scan["stages"][name]["cpu_seconds"] > 0 for name in ("backbone", "scoring", "resize"))
    e2e = scan["end_to_end"]
    assert e2e["images_per_s"] > 0 and e2e["usage"]["process_cpu"] > 0
    base = result["baseline"]
    assert result["model"]["tiled"]  # the default model is vade fit's: 512 px tiles, baseline tile by tile
    assert base["status"] == "ok" and base["ratio_end_to_end"] > 0
    assert base["agreement"]["images"] == 12
    assert {"fp32_gflops", "bf16_gflops"} <= set(result["ceilings"]["gemm"])
    assert result["ceilings"]["copy"]["memory_gb_s"] > 0
    assert "per stage" in stdout and "baseline" in stdout and "ceilings" in stdout


def test_baseline_scores_agree_with_the_scan(bench: tuple[dict, Path, str]) -> None:
    base = bench[0]["baseline"]
    # the same features through torch.cdist: vade's pruned kNN search and scoring are exact up to fp32 rounding
    assert base["agreement_same_features"]["images"] == 12
    assert base["agreement_same_features"]["max_rel_diff"] < 1e-4
    # the peers' whole pipeline (Pillow resize, an fp32 backbone for a bf16 model): close, not equal
    assert base["agreement"]["max_rel_diff"] < 0.1


def test_bench_errors_are_one_clear_line(tmp_path: Path, bench: tuple[dict, Path, str]) -> None:
    run = vade("bench", str(tmp_path / "missing"), "--images", "4")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"vade bench: error: model directory not found: {tmp_path / 'missing'} "
                                               "(create one with `vade fit`)"]  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    run = vade("bench", str(bench[1] / "model"), str(empty))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vade bench: error:") and str(empty) in lines[0]


def test_bench_on_a_local_cluster_reports_per_worker(tmp_path: Path, bench: tuple[dict, Path, str]) -> None:
    out = tmp_path / "cluster.json"
    run = vade("bench", str(bench[1] / "model"), "--images", "64", "--image-size", "96", "--workers", "2",
               "--device", "cpu", "--no-baseline", "--json", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    scan = json.loads(out.read_text())["scan"]
    assert scan["ok"] == 64 and scan["shards"] >= 2
    workers = scan["workers"]
    assert workers and sum(w["images"] for w in workers.values()) == 64
    assert all(w["images_per_s"] > 0 and w["tasks"] >= 1 for w in workers.values())
    assert all(set(w["stages"]) == set(STAGES) for w in workers.values())
    assert sum(row["seconds"] for row in scan["stages"].values()) > 0  # the workers' stage times came back
    assert "worker tcp://" in run.stdout


def test_sweep_only_quick(tmp_path: Path, bench: tuple[dict, Path, str]) -> None:
    out = tmp_path / "sweep.json"
    run = vade("bench", str(bench[1] / "model"), "--sweep-only", "--sweep-max", "10000", "--images", "8",
               "--image-size", "96", "--device", "cpu", "--json", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = json.loads(out.read_text())["sweep"]
    assert [row["bank_rows"] for row in sweep["bank"]] == [1_000, 10_000]
    assert all(row["status"] == "ok" and row["scoring_images_per_s"] > 0 for row in sweep["bank"])
    assert sweep["coreset"] == []  # 100 k training patches is over --sweep-max
    assert "bank rows" in run.stdout
