"""Backbone precision: resolved once at fit, recorded in the model, used by every later scan."""

import json
from pathlib import Path

import pytest
import torch

from engine.artifact import save_model
from engine.config import load_config
from engine.errors import ConfigError
from engine.models.base import native_bf16, resolve_precision
from engine.models.patchcore import PatchCore
from engine.models.registry import load_model


def test_auto_resolves_by_hardware() -> None:
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config(overrides={"precision": "fp8"})


def test_bf16_features_track_fp32() -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fp32 = PatchCore(load_config(overrides={"precision": "fp32", "device": "cpu"}), "cpu").features(images)
    bf16 = PatchCore(load_config(overrides={"precision": "bf16", "device": "cpu"}), "cpu").features(images)
    for a, b in zip(fp32, bf16, strict=True):
        assert b.dtype == torch.float32 and not torch.equal(a, b)  # really computed in bf16
        cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min()
        assert cos > 0.99, float(cos)


def test_model_records_precision_and_old_files_mean_fp32(tiny_patchcore, tmp_path: Path) -> None:
    model_dir = save_model(tiny_patchcore, tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["config"]["precision"] in ("fp32", "bf16")  # resolved, never "auto"
    assert load_model(model_dir).cfg.precision == meta["config"]["precision"]
    # A file written before the key existed was fitted with fp32 features.
    del meta["config"]["precision"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    assert load_model(model_dir).cfg.precision == "fp32"
