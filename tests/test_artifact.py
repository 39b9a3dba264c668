"""Model files: round trip, and each way a model directory can be wrong is refused by name."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.artifact import save_model
from engine.errors import ModelFileError
from engine.models.registry import load_model


@pytest.fixture()
def model_dir(tiny_patchcore, tmp_path: Path) -> Path:
    return save_model(tiny_patchcore, tmp_path / "model")


def test_round_trip_scores_identically(tiny_patchcore, model_dir: Path) -> None:
    loaded = load_model(model_dir)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a, b = tiny_patchcore.score(images), loaded.score(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert loaded.threshold == tiny_patchcore.threshold
    meta = json.loads((model_dir / "model.json").read_text())
    for key in ("method", "backbone", "layers", "input_size", "normalization", "bank_size", "threshold",
                "vade_version", "weights_sha256"):
        assert key in meta, key


def test_truncated_tensors_are_refused(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated, tampered"):
        load_model(model_dir)


def test_tampered_tensors_are_refused(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model(model_dir)


def test_pickle_is_refused_before_anything_is_unpickled(model_dir: Path) -> None:
    torch.save({"bank": torch.zeros(3, 3)}, model_dir / "model.safetensors")
    with pytest.raises(ModelFileError, match="never loads pickles"):
        load_model(model_dir)


def test_tensors_from_another_model_are_refused(tiny_patchcore, model_dir: Path, tmp_path: Path) -> None:
    """Consistent hash but shapes that disagree with model.json: a mismatched pair of files."""
    from safetensors.torch import save

    blob = save({"bank": torch.zeros(5, 7)}, metadata={"format": "vade-model"})
    (model_dir / "model.safetensors").write_bytes(blob)
    meta = json.loads((model_dir / "model.json").read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="model.json expects"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: (d / "model.json").unlink(), "model.json is missing"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "model.json").write_text('{"format": "vade-mod'), "not valid JSON"),
        (lambda d: (d / "model.json").write_text('{"format": "onnx"}'), "not a vade model description"),
        (lambda d: shutil.rmtree(d), "model directory not found"),
    ],
)
def test_broken_directories_are_refused_by_name(model_dir: Path, edit, message: str) -> None:
    edit(model_dir)
    with pytest.raises(ModelFileError, match=message):
        load_model(model_dir)


def test_json_edits_are_checked(model_dir: Path) -> None:
    meta = json.loads((model_dir / "model.json").read_text())
    meta["method"] = "fastflow"
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="unknown method 'fastflow'"):
        load_model(model_dir)
    meta["method"] = "patchcore"
    meta["config"]["layers"] = ["nope"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="invalid config"):
        load_model(model_dir)
