"""`vade calibrate` (and the model history) as a user runs it: subprocesses, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_cli import vade


@pytest.fixture(scope="module")
def fitted(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("fitted") / "m"
    run = vade("fit", str(demo_root), "--category", "weave", "--out", str(model), "--input-size", "64",
               "--coreset-ratio", "0.25", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    # 16 images cannot certify 1%: the fit says so, and model.json records it.
    assert "cannot certify the target 1.00%" in run.stderr + run.stdout
    meta = json.loads((model / "model.json").read_text())
    cal = meta["calibration"]
    assert cal["source"] == "loo+holdout" and cal["n"] == 16 and cal["sufficient"] is False  # PatchCore: both
    assert cal["certified_rate"] == pytest.approx(1 / 17) and cal["target_rate"] == 0.01
    assert [e["event"] for e in meta["history"]] == ["fitted"] and meta["history"][0]["images"] == 16
    assert meta["tensors"]["bank_owner"]["dtype"] == "int32"
    return model


def test_calibrate_writes_a_new_threshold_and_keeps_the_bank(fitted: Path, demo_root: Path, tmp_path: Path) -> None:
    new = tmp_path / "site"
    images = demo_root / "weave" / "train" / "good"
    run = vade("calibrate", str(fitted), str(images), "--target-far", "0.1", "--out", str(new), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    before = json.loads((fitted / "model.json").read_text())
    after = json.loads((new / "model.json").read_text())
    assert (new / "model.safetensors").read_bytes() == (fitted / "model.safetensors").read_bytes()
    assert after["calibration"]["source"] == "calibrate" and after["calibration"]["n"] == 16
    assert after["calibration"]["target_rate"] == 0.1 and after["calibration"]["sufficient"] is True
    # In-sample scores of the bank's own images sit lower than their leave-one-out scores.
    assert after["threshold"] < before["threshold"]
    events = after["history"]
    assert [e["event"] for e in events] == ["fitted", "calibrated"] and events[1]["images"] == 16
    assert events[1]["vade_version"] and events[1]["when"]
    assert "certifies an expected false-alarm rate" in run.stderr + run.stdout
    # A glob and a list file name the same images as the folder: the same threshold.
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.iterdir())) + "\n")
    run = vade("calibrate", str(fitted), str(listing), "--target-far", "0.1", "--out", str(tmp_path / "l"))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "l" / "model.json").read_text())["threshold"] == after["threshold"]


def test_calibrate_refuses_with_one_line(fitted: Path, demo_root: Path, tmp_path: Path) -> None:
    images = demo_root / "weave" / "test" / "good"

    def refused(*args: str) -> str:
        run = vade("calibrate", *args)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        return lines[0]

    assert "--out NEW_DIR, or --force" in refused(str(fitted), str(images))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert "already exists" in refused(str(fitted), str(images), "--out", str(tmp_path / "taken"))
    assert "not a vade model directory" in refused(str(tmp_path / "taken"), str(images), "--out", str(tmp_path / "o"))
    damaged = tmp_path / "damaged"
    shutil.copytree(fitted, damaged)
    blob = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    assert "SHA-256" in refused(str(damaged), str(images), "--out", str(tmp_path / "o"))
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "zz_truncated.png").write_bytes((next(broken.iterdir())).read_bytes()[:200])
    assert "cannot read" in refused(str(fitted), str(broken), "--out", str(tmp_path / "o"))
    assert "--target-far" in refused(str(fitted), str(images), "--target-far", "0.9", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _halves(demo_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    images = sorted((demo_root / "weave" / "train" / "good").iterdir())
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, part in ((first, images[::2]), (second, images[1::2])):
        folder.mkdir()
        for p in part:
            shutil.copy(p, folder / p.name)
    return first, second


def test_update_grows_the_bank_to_the_covering_radius(demo_root: Path, tmp_path: Path) -> None:
    first, second = _halves(demo_root, tmp_path)
    half = tmp_path / "half"
    run = vade("fit", str(first), "--out", str(half), "--input-size", "64", "--coreset-ratio", "0.1", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    run = vade("update", str(half), str(second), "--out", str(tmp_path / "up"), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    before = json.loads((half / "model.json").read_text())
    after = json.loads((tmp_path / "up" / "model.json").read_text())
    event = after["history"][-1]
    assert [e["event"] for e in after["history"]] == ["fitted", "updated"] and event["images"] == 8
    assert after["bank_size"] == before["bank_size"] + event["added"] > before["bank_size"]
    assert event["new_rows_radius_after"] <= event["covering_radius_projected"] * (1 + 1e-4)
    assert after["tensors"]["bank_owner"]["shape"] == [after["bank_size"]]
    assert after["calibration"]["n"] == 16 and after["calibration"]["source"] == "loo+holdout+update"
    refused = vade("update", str(half), str(second), "--out", str(tmp_path / "up"))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    refused = vade("update", str(half), str(broken), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "cannot read" in refused.stderr and "Traceback" not in refused.stderr
    refused = vade("update", str(tmp_path / "first"), str(second), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "not a vade model directory" in refused.stderr


def test_padim_update_equals_a_fit_on_all_images(demo_root: Path, tmp_path: Path) -> None:
    import torch

    from engine.api import fit
    from engine.config import FitConfig
    from engine.lifecycle import update
    from engine.models.registry import load_model

    first, second = _halves(demo_root, tmp_path)
    cfg = FitConfig(method="padim", input_size=64, device="cpu", precision="fp32")
    fit(sorted(first.iterdir()), cfg).save(tmp_path / "half")
    updated, _, info = update(tmp_path / "half", second, out=tmp_path / "up", device="cpu")
    assert info["added"] == 8 and info["training_images"] == 16
    full = fit(sorted(first.iterdir()) + sorted(second.iterdir()), cfg)
    torch.testing.assert_close(updated.mean, full.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(updated.precision, full.precision, rtol=1e-3, atol=1e-3)
    assert load_model(tmp_path / "up").history[-1]["event"] == "updated"


def test_update_clears_the_false_alarms_it_adds(demo_root: Path, tmp_path: Path) -> None:
    """Good parts seen closer up (a camera moved in: 2x zoom): the half model flags all of them; after
    `vade update` with half of them, those score below the new threshold, and the others of the batch
    lower than before."""
    import numpy as np
    from PIL import Image

    from engine.api import _raw_scores, fit
    from engine.config import FitConfig
    from engine.lifecycle import update
    from engine.models.registry import load_model

    first, _ = _halves(demo_root, tmp_path)
    batch = tmp_path / "closer"
    batch.mkdir()
    for p in sorted(first.iterdir()):
        im = Image.open(p).convert("RGB")
        im.crop((0, 0, im.width // 2, im.height // 2)).resize(im.size, Image.BILINEAR).save(batch / p.name)
    new = sorted(batch.iterdir())
    cfg = FitConfig(input_size=64, coreset_ratio=0.25, device="cpu", calibration="loo")
    fit(sorted(first.iterdir()), cfg).save(tmp_path / "half")
    half = load_model(tmp_path / "half", device="cpu")
    before = np.asarray(_raw_scores(half, new, [], 30.0))
    assert (before >= half.calibration.threshold).all()  # every close-up is a false alarm
    cleared = tmp_path / "cleared.txt"
    cleared.write_text("".join(f"{p}\n" for p in new[:4]))
    updated, _, info = update(tmp_path / "half", cleared, out=tmp_path / "up", device="cpu")
    assert info["added"] > 0
    after = np.asarray(_raw_scores(updated, new, [], 30.0))
    assert (after[:4] < updated.calibration.threshold).all()  # the cleared ones pass now
    assert (after[4:] < before[4:]).all()  # and the batch's others come closer to normal
