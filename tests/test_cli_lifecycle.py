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
    assert cal["source"] == "loo" and cal["n"] == 16 and cal["sufficient"] is False
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
