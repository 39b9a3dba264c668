"""Cluster plumbing: --workers/--gpus/--scheduler options, GPU pinning of local workers (checked on CPU
workers: their environment, not CUDA), and `vade scan --workers 2 --resume` as a real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from engine.cli.main import main as cli_main
from engine.distributed.cluster import (
    ClusterRequest,
    connect,
    default_torch_threads,
    visible_gpus,
)
from engine.distributed.driver import _workers_device
from engine.errors import ConfigError
from engine.scan.job import open_scan, run_shard, scan
from engine.scan.options import ScanOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("spec", "visible", "count", "expected"),
    [
        ("all", None, 8, [str(i) for i in range(8)]),
        ("2", None, 8, ["0", "1"]),
        ("all", "3,5", 8, ["3", "5"]),  # CUDA_VISIBLE_DEVICES wins over the count
        ("1", "GPU-uuid-a,GPU-uuid-b", 0, ["GPU-uuid-a"]),
    ],
)
def test_visible_gpus(spec: str, visible: str | None, count: int, expected: list[str]) -> None:
    assert visible_gpus(spec, visible, count) == expected


@pytest.mark.parametrize(
    ("spec", "visible", "count", "words"),
    [("all", None, 0, "no GPU"), ("all", "", 4, "no GPU"), ("3", "0,1", 2, "only 2")],
)
def test_visible_gpus_refuses(spec: str, visible: str | None, count: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        visible_gpus(spec, visible, count)


def test_cluster_request_is_validated_and_threads_share_the_cores() -> None:
    for bad in (
        ClusterRequest(),
        ClusterRequest(workers=0),
        ClusterRequest(gpus="two"),
        ClusterRequest(workers=2, gpus="all"),
    ):
        with pytest.raises(ConfigError):
            bad.validate()
    ClusterRequest(scheduler="tcp://10.0.0.1:8786").validate()
    assert ClusterRequest(gpus="all").worker_device == "cuda" and ClusterRequest(workers=2).worker_device is None
    assert [default_torch_threads(n, cores=16) for n in (1, 2, 8, 32)] == [16, 8, 2, 1]


def test_cli_options_are_exclusive_and_reach_the_request(scan_model_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["scan", "m", "s", "--out", "o", "--workers", "2", "--gpus", "all"])
    assert "not allowed with argument" in capsys.readouterr().err
    args = [str(scan_model_dir), str(tmp_path), "--out", str(tmp_path / "o")]
    assert cli_main(["scan", *args, "--workers", "0"]) == 2
    assert "--workers must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(["scan", *args, "--gpus", "all", "--device", "cpu"]) == 2  # refused before any cluster starts
    assert "contradicts" in capsys.readouterr().err


def test_unreachable_scheduler_is_a_clear_error(scan_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
        with connect(ClusterRequest(scheduler="tcp://127.0.0.1:9", connect_timeout_s=1)):
            pass


def test_gpu_workers_are_pinned_one_gpu_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dask-cuda, --gpus all starts one worker per visible GPU with CUDA_VISIBLE_DEVICES=<that GPU>."""
    pytest.importorskip("distributed")
    if torch.cuda.is_available():
        pytest.skip("checks the pinning with CPU workers; on a GPU machine the real scan covers it")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with connect(ClusterRequest(gpus="all")) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["3", "5"]
        assert set(client.run(torch.get_num_threads).values()) == {default_torch_threads(2)}
        with pytest.raises(ConfigError, match=r"no usable GPU .*CUDA_VISIBLE_DEVICES=[35],"):
            _workers_device(client, ScanOptions(), "cuda")


def test_vade_scan_workers_resumes_a_one_process_scan(
    scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    """A scan begun in one process (shard 0 done) is finished by `vade scan --workers 2 --resume`."""
    folder = real_images[0].parent
    settings = {"device": "cpu", "shard_size": 4, "batch_size": 2, "decoder": "pillow"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `--workers N` runs torch in each worker: then results are bitwise equal
    try:
        scan(scan_model_dir, folder, tmp_path / "ref", **settings)
        out = tmp_path / "out"
        with open_scan(scan_model_dir, folder, out, ScanOptions(**settings)) as job:  # holds OUT_DIR's lock
            run_shard(job.model, next(job.pending_shards()), out, job.options)
    finally:
        torch.set_num_threads(threads)
    marker = next((out / "_done").glob("*.json"))
    written = marker.stat().st_mtime_ns

    cmd = [sys.executable, "-m", "engine.cli", "scan", str(scan_model_dir), str(folder), "--out", str(out), "--resume"]
    flags = ["--workers", "2", "--device", "cpu", "--shard-size", "4", "--batch-size", "2", "--decoder", "pillow"]
    done = subprocess.run(
        [*cmd, *flags], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "resuming: 1 of 3 shards" in done.stderr and "on 2 Dask workers" in done.stderr
    assert f"scanned {len(real_images)} images: {len(real_images)} ok, 0 error" in done.stdout
    assert marker.stat().st_mtime_ns == written  # the finished shard was skipped, not redone
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(tmp_path / "ref" / "scores.parquet"))


def test_a_packed_shard_unpacks_to_the_same_records() -> None:
    import datetime

    import pyarrow as pa

    from engine.distributed.worker import PackedShard
    from engine.inputs.sources import Record, Shard

    schema = pa.schema([("site", pa.string()), ("taken", pa.timestamp("us")), ("altitude", pa.float64())])
    when = datetime.datetime(2024, 5, 1, 12, 30)
    records = [
        Record(8, "a b/ü.jpg", "/abs/a b/ü.jpg", {"site": "x", "taken": when, "altitude": 1.5}),
        Record(9, "", "", {"site": None, "taken": None, "altitude": None}),
    ]
    shard = Shard(4, 8, records)
    assert PackedShard.pack(shard, schema).unpack() == shard
    plain = Shard(0, 0, [Record(0, "p.png", "p.png"), Record(1, "q.png", "/abs/q.png")])
    assert PackedShard.pack(plain, pa.schema([])).unpack() == plain


def test_progress_tally_is_exact_when_tasks_end_whatever_the_events_said() -> None:
    import io

    from engine.distributed.driver import _Tally
    from engine.scan.progress import Progress

    progress = Progress(10, stream=io.StringIO(), quiet=True)
    tally = _Tally(progress)
    tally.on_event((0.0, ["a", 3]))
    tally.on_event((0.0, ["b", 2]))
    tally.forget("b")  # its worker died: its provisional images are taken back
    tally.on_event((0.0, ["c", 4]))
    tally.finish("a", 5)  # a task's own count replaces what its events said
    tally.on_event((0.0, ["a", 2]))  # a late event of a finished task is ignored
    assert progress.done == 5 + 4
    tally.finish("c", 5)
    assert progress.done == 10
