"""Scans with a tiled model: maps that keep the image's shape, determinism, resume, Dask, a 100 MP image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.compare_scans import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiled_model_dir(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.api import fit
    from engine.config import FitConfig
    from engine.inputs.datasets import train_images

    cfg = FitConfig(tile_size=64, image_scale=0.5, coreset_ratio=0.1, map_size=96, device="cpu", batch_size=8)
    out = tmp_path_factory.mktemp("tiled") / "model"
    fit(train_images(demo_root, "weave"), cfg).save(out)
    return out


@pytest.fixture(scope="module")
def odd_shapes(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo test images cropped to other shapes (wide, tall, tiny), plus a broken file."""
    folder = tmp_path_factory.mktemp("odd_shapes")
    sources = sorted((demo_root / "weave" / "test").rglob("*.png"))
    boxes = [(0, 0, 256, 256), (0, 0, 256, 60), (0, 0, 40, 256), (10, 10, 30, 25), (0, 0, 200, 120)]
    for i, src in enumerate(sources[:10]):
        with Image.open(src) as img:
            img.crop(boxes[i % len(boxes)]).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def _scan(model: Path, source: Path, out: Path, **options) -> None:
    from engine.api import scan

    scan(model, str(source), out, device="cpu", **options)


def test_maps_keep_the_image_shape_and_batch_size_changes_nothing(
    tiled_model_dir: Path, odd_shapes: Path, tmp_path: Path
) -> None:
    from engine.api import load
    from engine.inputs.decode import read_rgb
    from engine.models.tiled import image_output

    _scan(tiled_model_dir, odd_shapes, tmp_path / "a", batch_size=1)
    _scan(tiled_model_dir, odd_shapes, tmp_path / "b", batch_size=7)
    assert compare(tmp_path / "a", tmp_path / "b") is None
    rows = pq.read_table(tmp_path / "a" / "scores.parquet").to_pylist()
    maps = zarr.open_group(tmp_path / "a" / "maps.zarr", mode="r")["maps"]
    assert maps.shape == (11, 96, 96)
    model = load(tiled_model_dir)
    for row in rows:
        if row["status"] == "error":
            assert row["map_height"] is None and row["index"] == -1
            continue
        h, w = row["map_height"], row["map_width"]
        assert max(h, w) <= 96 and abs(h / w - row["height"] / row["width"]) < 0.1  # aspect kept
        slot = maps[row["index"]]
        assert not np.isnan(slot[:h, :w]).any() and np.isnan(slot[h:, :]).all() and np.isnan(slot[:, w:]).all()
        expected = image_output(model, read_rgb(row["path"]))
        assert row["raw_score"] == float(expected.score)
        assert expected.map.shape == (h, w)
    attrs = json.loads((tmp_path / "a" / "maps.zarr" / "maps" / "zarr.json").read_text())["attributes"]
    assert "map_height" in attrs["resize"]["to_image"]


def test_resume_of_a_tiled_scan_equals_an_uninterrupted_one(
    tiled_model_dir: Path, odd_shapes: Path, tmp_path: Path
) -> None:
    from engine.scan.job import open_scan, run_shard, scan
    from engine.scan.options import ScanOptions

    options = ScanOptions(device="cpu", shard_size=3, batch_size=2)
    _scan(tiled_model_dir, odd_shapes, tmp_path / "clean", shard_size=3, batch_size=2)
    with open_scan(tiled_model_dir, str(odd_shapes), tmp_path / "resumed", options) as job:
        shards = list(job.pending_shards())
        run_shard(job.model, shards[1], tmp_path / "resumed", options)  # one shard done, then "killed"
    result = scan(tiled_model_dir, str(odd_shapes), tmp_path / "resumed", options, resume=True)
    assert result.shards_skipped == 1
    assert compare(tmp_path / "clean", tmp_path / "resumed") is None


def test_dask_workers_give_the_same_tiled_scan(tiled_model_dir: Path, odd_shapes: Path, tmp_path: Path) -> None:
    from engine.distributed.cluster import ClusterRequest
    from engine.distributed.driver import scan_on_cluster

    _scan(tiled_model_dir, odd_shapes, tmp_path / "one", shard_size=4)
    scan_on_cluster(
        tiled_model_dir, str(odd_shapes), tmp_path / "dask", cluster=ClusterRequest(workers=2), device="cpu",
        shard_size=4,
    )  # fmt: skip
    assert compare(tmp_path / "one", tmp_path / "dask") is None


# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec on Linux.
_PEAK = """
import sys
from engine.api import scan
r = scan(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", decoder="pillow", quiet=True)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(r.counts.ok, peak)
"""


def test_a_100_megapixel_image_scans_in_bounded_memory(demo_root: Path, tmp_path: Path) -> None:
    """10,000 x 10,000 pixels decode to 300 MB; tiles stream, so the peak stays near that."""
    from engine.api import fit
    from engine.config import FitConfig
    from engine.inputs.datasets import train_images

    cfg = FitConfig(tile_size=64, image_scale=0.02, coreset_ratio=0.1, map_size=128, device="cpu")
    fit(train_images(demo_root, "weave")[:6], cfg).save(tmp_path / "model")
    side = 10_000
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    big = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))], 2)
    (tmp_path / "in").mkdir()
    Image.fromarray(big.astype(np.uint8)).save(tmp_path / "in" / "big.jpg", quality=80)
    del big
    code = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path / "model"), str(tmp_path / "in"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr[-2000:]
    ok, peak_kib = map(int, code.stdout.split()[-2:])
    assert ok == 1
    # Decoding takes ~860 MiB (the pixels and Pillow's export of them); the runtime ~300 MiB.
    assert peak_kib < 1_500_000, f"peak RSS {peak_kib / 1024:.0f} MiB"
    row = pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()[0]
    assert (row["map_height"], row["map_width"], row["width"]) == (128, 128, side)


def test_eval_of_a_tiled_model_scores_pixels_at_the_masks_resolution(tiled_model_dir: Path, demo_root: Path) -> None:
    """The demo masks are 256 px; the tiled model's maps are 96 px (map_size): metrics are at 256 px."""
    from engine.api import load
    from engine.evaluation import evaluate as ev

    model = load(tiled_model_dir)
    items = ev.test_items(demo_root, "weave")
    scores, maps, sizes, _ = ev.score_items(model, items, batch_size=4)
    assert {m.shape for m in maps} == {(96, 96)} and set(sizes) == {(256, 256)}
    masks = ev.MaskSequence(items, sizes)
    assert masks[len(items) - 1].shape == (256, 256)
    assert ev.MapsAtImageSize(maps, sizes)[0].shape == (256, 256)
    result = ev.evaluate(model, demo_root, "weave")
    assert result["image_auroc"] > 0.8 and result["pixel_auroc"] > 0.8
