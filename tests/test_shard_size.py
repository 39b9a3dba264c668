"""Shard sizes: chosen from the input count and the worker count unless set, and never part of the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from engine.errors import ConfigError
from engine.inputs.sources import shard_count
from engine.scan.job import scan
from engine.scan.options import MAX_AUTO_SHARD, SHARD_STEP, ScanOptions, auto_shard_size

SETTINGS = {"device": "cpu", "batch_size": 5}


@pytest.mark.parametrize("count", [1, 13, 162, 600, 5_000, 100_000, 10_000_000])
@pytest.mark.parametrize("workers", [1, 2, 3, 16, 64])
def test_auto_shard_size_keeps_every_worker_busy_within_bounds(count: int, workers: int) -> None:
    size = auto_shard_size(count, workers)
    assert SHARD_STEP <= size <= MAX_AUTO_SHARD and size % SHARD_STEP == 0
    if count >= workers * SHARD_STEP:
        assert shard_count(count, size) >= workers  # no worker idles for want of a shard


def test_600_images_on_two_workers_make_several_shards() -> None:
    assert auto_shard_size(600, 2) == 96 and shard_count(600, 96) == 7  # was one shard of 1,024
    assert auto_shard_size(10_000_000, 8) == 1024


def test_a_negative_shard_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="shard_size"):
        ScanOptions(shard_size=-1).validate()


def _without_shard(out: Path):
    table = pq.read_table(out / "scores.parquet")
    return table.drop_columns(["shard"])


@pytest.fixture()
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_scores_and_maps_do_not_depend_on_the_shard_size(
    scan_model_dir: Path, many_images: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    outs = {}
    for size in (0, 7, 32):  # auto (64 for 162 images), one shard size that cuts batches oddly, another
        outs[size] = tmp_path / f"s{size}"
        scan(scan_model_dir, many_images, outs[size], shard_size=size, **SETTINGS)
    manifest = json.loads((outs[0] / "scan.json").read_text())
    assert manifest["shard_size"] == auto_shard_size(162, 1) == 64 and manifest["shards"] == 3
    maps = {size: zarr.open_group(out / "maps.zarr", mode="r")["maps"] for size, out in outs.items()}
    assert [maps[s].shards[0] for s in (0, 7, 32)] == [64, 7, 32]  # map shards follow the scan shards
    for size in (0, 7):
        assert _without_shard(outs[size]).equals(_without_shard(outs[32]))
        assert np.array_equal(maps[size][:], maps[32][:], equal_nan=True)


def test_resume_with_the_automatic_size_keeps_the_stored_one(
    scan_model_dir: Path, many_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scan(scan_model_dir, many_images, out, shard_size=32, **SETTINGS)
    result = scan(scan_model_dir, many_images, out, resume=True, **SETTINGS)  # shard_size 0: the stored 32
    assert result.shards == 6 and result.total == 162
