"""Distributed scans on a real 2-worker LocalCluster (CPU): same result as one process, with a worker
killed mid-scan, and with an input that crashes its worker every time.

Workers run torch with one thread and so does the reference scan here: on a CPU, float results move
by rounding with the thread count (not with the worker count), so equal settings give bitwise-equal output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from distributed import WorkerPlugin

from engine.distributed.cluster import ClusterRequest, connect
from engine.distributed.driver import SPLIT_WAYS, scan_on_cluster
from engine.scan.job import scan

SETTINGS = {"device": "cpu", "batch_size": 1, "decoder": "pillow"}
POISON_MARK = "_poison"


def _rows(out: Path):
    return pq.read_table(out / "scores.parquet")


def _maps(out: Path) -> np.ndarray:
    return zarr.open_group(out / "maps.zarr", mode="r")["maps"][:]


def _reference(model_dir: Path, source: Path, out: Path, shard_size: int) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (ClusterRequest torch_threads=1)
    try:
        scan(model_dir, source, out, shard_size=shard_size, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def client() -> Iterator:
    # allowed_failures=1: a task is given up (and split) after 2 worker deaths, to keep the poison test short
    with connect(ClusterRequest(workers=2, torch_threads=1, allowed_failures=1)) as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def inputs(real_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dist_inputs")
    for path in real_images:
        shutil.copyfile(path, folder / path.name)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def reference(scan_model_dir: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(scan_model_dir, inputs, tmp_path_factory.mktemp("dist_ref") / "out", shard_size=2)


def test_two_workers_equal_one_process_and_load_the_model_once(
    client, scan_model_dir: Path, inputs: Path, reference: Path, tmp_path: Path
) -> None:
    # through --scheduler ADDRESS, as a user with a running cluster would
    remote = ClusterRequest(scheduler=client.scheduler.address)
    result = scan_on_cluster(scan_model_dir, inputs, tmp_path / "out", cluster=remote, shard_size=2, **SETTINGS)
    assert set(client.run(torch.get_num_threads).values()) == {1}
    assert result.shards == 7 and result.total == 13 and (result.counts.ok, result.counts.error) == (12, 1)
    assert _rows(tmp_path / "out").equals(_rows(reference))  # rows, scores, order: bitwise
    assert np.array_equal(_maps(tmp_path / "out"), _maps(reference), equal_nan=True)
    loads = client.run(lambda: __import__("engine.distributed.worker").distributed.worker.models_loaded)
    assert max(loads.values()) == 1, loads  # once per worker for 7 shards, not once per task


def _markers(out: Path) -> int:
    return len(list((out / "_done").glob("*.json"))) if (out / "_done").is_dir() else 0


def _shard_done(out: Path, key: str) -> bool:
    """Whether task `key` is not a shard's (`vade-shard-TOKEN-ID`) or its shard wrote its marker."""
    found = re.fullmatch(r"vade-shard-.+-(\d+)", str(key))
    return found is None or (out / "_done" / f"shard-{int(found.group(1)):08d}.json").is_file()


def test_a_worker_killed_mid_shard_changes_nothing(
    client, scan_model_dir: Path, inputs: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    pids_before = client.run(os.getpid)
    killed: dict = {}

    def kill_one_mid_shard() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # shards are under way (maps are written whole per shard, so wait for a first marker):
            # kill the worker of a shard that has no marker yet (the scheduler's view lags a finished one)
            busy = [w for w, keys in client.processing().items() if any(not _shard_done(out, k) for k in keys)]
            if busy and 1 <= _markers(out) < 5:
                killed.update(worker=busy[0], pid=pids_before[busy[0]], markers=_markers(out))
                os.kill(pids_before[busy[0]], signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_mid_shard, daemon=True)
    killer.start()
    result = scan_on_cluster(scan_model_dir, inputs, out, client=client, shard_size=2, **SETTINGS)
    killer.join()
    assert killed, "no worker was killed: the scan finished before a shard was half written"
    assert killed["markers"] < result.shards
    suspicious = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.task_prefixes["vade-shard"].suspicious)
    assert suspicious >= 1  # the scheduler saw a task lost with its worker, and reran it
    assert _rows(out).equals(_rows(reference))
    assert np.array_equal(_maps(out), _maps(reference), equal_nan=True)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed one
    assert killed["pid"] not in client.run(os.getpid).values()


class PoisonDecoder(WorkerPlugin):
    """Test-only: in the worker process, reading a file named *_poison* ends the process, as a segfault would
    (leaving a file in `deaths` first, so a test can count the deaths)."""

    name = "test-poison-decoder"

    def __init__(self, deaths: Path):
        self.deaths = str(deaths)

    def setup(self, worker) -> None:
        import engine.scan.loader as scan_loader

        self.original = scan_loader.read_files

        def read_files(paths, *args, **kwargs):
            if any(p is not None and POISON_MARK in Path(p).name for p in paths):
                Path(self.deaths, f"{os.getpid()}-{time.monotonic_ns()}").touch()
                os._exit(70)
            return self.original(paths, *args, **kwargs)

        scan_loader.read_files = read_files

    def teardown(self, worker) -> None:
        import engine.scan.loader as scan_loader

        scan_loader.read_files = self.original


class DriverDied(Exception):
    """Stands for the driver process dying at the moment it reported a poison input."""


def test_a_poison_input_becomes_one_error_row_and_a_resumed_driver_does_not_crash_on_it_again(
    client, scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    """The driver dies right after isolating the poison input (shard 0 unfinished); the resumed scan reads
    the finding from OUT_DIR, kills no worker, and its result is an uninterrupted scan's."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in real_images[:6]:
        shutil.copyfile(path, folder / path.name)
    poison = folder / (real_images[1].stem + POISON_MARK + ".png")  # sorts third: inside shard 0 of 4
    shutil.copyfile(real_images[1], poison)
    reference = _reference(scan_model_dir, folder, tmp_path / "ref", shard_size=4)
    messages: list[str] = []

    def say_then_die(message: str) -> None:
        messages.append(message)
        if "killed the worker each time" in message:
            raise DriverDied(message)

    resumed: list[str] = []
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    client.register_plugin(PoisonDecoder(deaths), name=PoisonDecoder.name)
    try:
        with pytest.raises(DriverDied):
            scan_on_cluster(
                scan_model_dir, folder, tmp_path / "out", client=client, shard_size=4, say=say_then_die, **SETTINGS
            )
        assert not (tmp_path / "out" / "_done" / "shard-00000000.json").exists()  # shard 0 was not finished
        died = len(list(deaths.iterdir()))
        assert died >= 2  # the poison input killed workers (how many: as Dask counts tasks lost with a worker)
        result = scan_on_cluster(
            scan_model_dir, folder, tmp_path / "out", client=client, shard_size=4, say=resumed.append, resume=True,
            **SETTINGS,
        )  # fmt: skip
        assert len(list(deaths.iterdir())) == died  # no worker died again
    finally:
        client.unregister_worker_plugin(PoisonDecoder.name)
    assert any("known to kill workers (recorded by an earlier run)" in m for m in resumed)
    assert not any("workers died" in m or "killed the worker" in m for m in resumed)
    rows, expected = _rows(tmp_path / "out"), _rows(reference)
    assert (result.counts.ok, result.counts.error) == (6, 1) and rows.num_rows == 7
    position = [Path(p).name for p in expected.column("path").to_pylist()].index(poison.name)
    bad = rows.slice(position, 1).to_pylist()[0]
    assert bad["path"] == str(poison) and bad["status"] == "error" and bad["index"] == -1 and bad["shard"] == 0
    assert "worker process died" in bad["error"] and bad["score"] is None
    keep = [i for i in range(7) if i != position]
    assert rows.take(keep).equals(expected.take(keep))  # every other row as in a clean scan
    maps, expected_maps = _maps(tmp_path / "out"), _maps(reference)
    assert np.isnan(maps[position]).all() and np.array_equal(maps[keep], expected_maps[keep])
    assert any(f"in {SPLIT_WAYS} pieces" in m for m in messages) and any(poison.name in m for m in messages)
    assert not (tmp_path / "out" / "_parts").exists()


def test_manifest_columns_travel_to_the_workers(
    client, scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    import pyarrow as pa

    manifest = tmp_path / "inputs.parquet"
    paths = [str(real_images[0]), "missing.png", real_images[2].name]  # relative: opened beside the manifest
    shutil.copyfile(real_images[2], tmp_path / real_images[2].name)
    pq.write_table(
        pa.table({"path": paths, "site": ["a", "b", None], "taken": pa.array([1, 2, 3], pa.int64())}), manifest
    )
    reference = _reference(scan_model_dir, manifest, tmp_path / "ref", shard_size=2)
    scan_on_cluster(scan_model_dir, manifest, tmp_path / "out", client=client, shard_size=2, **SETTINGS)
    rows = _rows(tmp_path / "out")
    assert rows.equals(_rows(reference))
    assert rows.column("site").to_pylist() == ["a", "b", None] and rows.column("status").to_pylist() == [
        "ok",
        "error",
        "ok",
    ]


def test_one_progress_bar_counts_every_image_once(client, scan_model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    import io

    from engine.scan.progress import Progress

    stream = io.StringIO()
    progress = Progress(0, stream=stream, tty=False, line_every_s=0.0)
    scan_on_cluster(
        scan_model_dir, inputs, tmp_path / "out", client=client, shard_size=4, progress=progress, **SETTINGS
    )
    assert progress.done == progress.total == 13
    counts = [int(line.split(": ")[1].split("/")[0]) for line in stream.getvalue().splitlines()]
    assert counts[-1] == 13 and max(counts) == 13 and len(counts) >= 2


def test_the_automatic_shard_size_spreads_the_work_and_changes_no_result(
    client, scan_model_dir: Path, many_images: Path, tmp_path: Path
) -> None:
    reference = _reference(scan_model_dir, many_images, tmp_path / "ref", shard_size=50)  # one process, other shards
    result = scan_on_cluster(scan_model_dir, many_images, tmp_path / "out", client=client, **SETTINGS)
    assert result.shards == 6  # 162 images on 2 workers: shards of 32, not one of 1,024
    rows = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert set(rows["shard"].to_pylist()) == set(range(6))
    assert rows.drop_columns(["shard"]).equals(_rows(reference).drop_columns(["shard"]))
    assert np.array_equal(_maps(tmp_path / "out"), _maps(reference), equal_nan=True)
