"""The trained methods (STFPM, feature AE) end to end on the demo data: real fits, files, scans, verbs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.api import fit, load, scan
from engine.config import FitConfig, load_config
from engine.errors import ConfigError, ModelFileError, VadeError
from engine.evaluation.evaluate import evaluate
from engine.inputs.datasets import train_images
from engine.lifecycle import recalibrate, update

METHODS = ("stfpm", "feature_ae")


def _cfg(method: str, **kw) -> FitConfig:
    return FitConfig(method=method, input_size=64, device="cpu", max_epochs=2, holdout_fraction=0.25, **kw)


@pytest.fixture(scope="module", params=METHODS)
def fitted(request: pytest.FixtureRequest, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    model = fit(train_images(demo_root, "weave"), _cfg(request.param))
    out = tmp_path_factory.mktemp(request.param) / "model"
    model.save(out)
    return model, out


@pytest.mark.parametrize("method", METHODS)
def test_two_seeded_fits_give_the_same_loss_curve_and_weights(method: str, demo_root: Path) -> None:
    a, b = (fit(train_images(demo_root, "weave"), _cfg(method)) for _ in range(2))
    ra, rb = a.fit_stats["training"], b.fit_stats["training"]
    assert ra["epochs"] == 2 and len(ra["train_loss"]) == 2 and ra["train_images"] == 12 and ra["holdout_images"] == 4
    assert ra["train_loss"] == rb["train_loss"] and ra["holdout_loss"] == rb["holdout_loss"]
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    # another seed is another network
    c = fit(train_images(demo_root, "weave"), _cfg(method, seed=1))
    assert c.fit_stats["training"]["train_loss"] != ra["train_loss"]


def test_model_json_records_the_training(fitted) -> None:
    model, out = fitted
    meta = json.loads((out / "model.json").read_text())
    rec = meta["fit"]["training"]
    assert rec["epochs"] == len(rec["train_loss"]) == len(rec["holdout_loss"]) == len(rec["seconds"]) == 2
    assert rec["stop_reason"].startswith("max_epochs") and 1 <= rec["best_epoch"] <= 2
    assert rec["precision"] == model.cfg.precision and rec["settings"]["seed"] == 0
    assert meta["calibration"]["source"] == "holdout" and meta["calibration"]["n"] == 4
    assert meta["method"] == model.method and meta["config"]["calibration"] == "holdout"


def test_save_load_round_trip_scores_the_same(fitted) -> None:
    model, out = fitted
    again = load(out)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = model.score(images), again.score(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (3, 64, 64) and torch.equal(a.scores, a.maps.amax(dim=(1, 2)))
    assert again.threshold == model.threshold


def test_damaged_files_are_refused(fitted, tmp_path: Path) -> None:
    from safetensors.torch import save

    model, out = fitted
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "model.json").write_bytes((out / "model.json").read_bytes())
    blob = (out / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load(bad)
    # Consistent files (hash and shapes agree with model.json) whose tensors do not fit the network.
    import hashlib

    tensors = model.tensors()
    name = next(k for k, v in tensors.items() if v.dim() == 4 and v.shape[0] > 1)
    tensors[name] = tensors[name][:-1].contiguous()
    blob = save(tensors, metadata={"format": "vade-model"})
    meta = json.loads((out / "model.json").read_text())
    meta["tensors"][name]["shape"] = list(tensors[name].shape)
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "model.safetensors").write_bytes(blob)
    (shapes / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="shape|the architecture needs"):
        load(shapes)


def test_scan_is_bitwise_the_same_for_any_batch_size(fitted, demo_root: Path, tmp_path: Path) -> None:
    import zarr

    _, out = fitted
    source = demo_root / "weave" / "test"
    outs = []
    for batch_size in (1, 5, 12):
        outs.append(tmp_path / f"scan{batch_size}")
        scan(out, source, outs[-1], device="cpu", batch_size=batch_size)
    first = pq.read_table(outs[0] / "scores.parquet")
    assert set(first.column("status").to_pylist()) == {"ok"} and first.num_rows == 10
    maps0 = zarr.open_group(outs[0] / "maps.zarr", mode="r")["maps"][:]
    for other in outs[1:]:
        table = pq.read_table(other / "scores.parquet")
        assert table.column("raw_score").equals(first.column("raw_score"))
        assert np.array_equal(zarr.open_group(other / "maps.zarr", mode="r")["maps"][:], maps0)
    from engine.report.page import build_report

    html = build_report(outs[0], top=4, contrast=2).read_text(encoding="utf-8")
    assert fitted[0].method in html and "<img" in html


def test_eval_and_calibrate_work_and_update_refuses(fitted, demo_root: Path, tmp_path: Path) -> None:
    model, out = fitted
    result = evaluate(load(out), demo_root, "weave")
    assert result["n_images"] == 10 and result["image_auroc"] is not None
    images = demo_root / "weave" / "train" / "good"
    new, where = recalibrate(out, images, target_far=0.1, out=tmp_path / "cal")
    assert new.calibration.source == "calibrate" and new.calibration.n == 16
    assert (where / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    with pytest.raises(VadeError, match="update would retrain"):
        update(out, images, out=tmp_path / "upd")


@pytest.mark.parametrize("method", METHODS)
def test_config_refuses_what_does_not_apply(method: str) -> None:
    assert load_config(overrides={"method": method}).calibration == "holdout"
    assert load_config(overrides={"method": method}).tile_size == 0
    with pytest.raises(ConfigError, match="does not apply"):
        load_config(overrides={"method": method, "calibration": "loo"})
    with pytest.raises(ConfigError, match="tile_size must be 0"):
        load_config(overrides={"method": method, "tile_size": 256})
    with pytest.raises(ConfigError, match="holdout_fraction"):
        load_config(overrides={"method": method, "holdout_fraction": 0.0})
    assert load_config(overrides={"method": "patchcore"}).calibration == "both"
    assert load_config(overrides={"method": "padim"}).calibration == "loo"


def test_presets_load(method_presets=("configs/stfpm_lite0.yaml", "configs/feature_ae_lite0.yaml")) -> None:
    root = Path(__file__).resolve().parents[1]
    for preset, method in zip(method_presets, METHODS):
        cfg = load_config(root / preset)
        assert cfg.method == method and cfg.input_size == 256 and cfg.calibration == "holdout"


def test_vade_fit_cli_trains_with_a_bar(demo_root: Path, tmp_path: Path) -> None:
    from tests.test_cli import vade

    run = vade("fit", str(demo_root), "--category", "weave", "--out", str(tmp_path / "m"), "--method", "stfpm",
               "--input-size", "64", "--max-epochs", "2", "--holdout-fraction", "0.25", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "train stfpm:" in run.stderr and "ETA" in run.stderr and "hold-out" in run.stderr
    assert "2 epochs" in run.stderr + run.stdout
    run = vade("update", str(tmp_path / "m"), str(demo_root / "weave" / "train" / "good"), "--out", str(tmp_path / "u"))
    assert run.returncode == 2 and "update would retrain" in run.stderr


def test_a_dask_scan_equals_one_process(demo_root: Path, tmp_path: Path) -> None:
    """Both trained methods on a real 2-worker LocalCluster: bitwise the one-thread, one-process scan."""
    import zarr

    from engine.distributed.cluster import ClusterRequest, connect
    from engine.distributed.driver import scan_on_cluster

    source = demo_root / "weave" / "test"
    models = {}
    for method in METHODS:
        models[method] = tmp_path / method
        fit(train_images(demo_root, "weave"), _cfg(method)).save(models[method])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, model_dir in models.items():
            scan(model_dir, source, tmp_path / f"ref_{method}", device="cpu", shard_size=4)
    finally:
        torch.set_num_threads(threads)
    with connect(ClusterRequest(workers=2, torch_threads=1)) as client:
        for method, model_dir in models.items():
            out = tmp_path / f"dask_{method}"
            remote = ClusterRequest(scheduler=client.scheduler.address)
            result = scan_on_cluster(model_dir, source, out, cluster=remote, shard_size=4, device="cpu")
            assert result.total == 10 and result.counts.ok == 10
            ref = tmp_path / f"ref_{method}"
            assert pq.read_table(out / "scores.parquet").equals(pq.read_table(ref / "scores.parquet"))
            assert np.array_equal(zarr.open_group(out / "maps.zarr", mode="r")["maps"][:],
                                  zarr.open_group(ref / "maps.zarr", mode="r")["maps"][:], equal_nan=True)
