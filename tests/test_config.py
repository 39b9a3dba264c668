from pathlib import Path

import pytest

from engine.config import FitConfig, config_from_dict, load_config
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_load_and_validate(preset: Path, tmp_path: Path) -> None:
    cfg = load_config(preset, {"weights": str(tmp_path / "w.pth")} if "wrn50" in preset.stem else None)
    method, backbone = preset.stem.rsplit("_", 1)
    assert cfg.method == method
    assert cfg.backbone.startswith({"lite0": "efficientnet", "wrn50": "wide_resnet"}[backbone])
    assert cfg.layers


def test_defaults_resolve_layers_per_method() -> None:
    assert load_config().layers == ["blocks.2", "blocks.4"]
    assert load_config(overrides={"method": "padim"}).layers == ["blocks.1", "blocks.2", "blocks.4"]
    assert load_config(overrides={"method": "padim"}).padim_features == 176


def test_cli_overrides_beat_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("fit:\n  method: padim\n  seed: 3\n")
    cfg = load_config(f, {"seed": 7, "method": None})
    assert (cfg.method, cfg.seed) == ("padim", 7)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"methd": "padim"}, "unknown config key 'methd'"),
        ({"method": "knn"}, "method must be one of"),
        ({"coreset_ratio": 2.0}, "coreset_ratio must be a number in"),
        ({"layers": ["blocks.9"]}, "has no layer(s) ['blocks.9']"),
        ({"backbone": "resnet999"}, "unknown backbone 'resnet999'"),
        ({"input_size": 250}, "multiple of 32"),
    ],
)
def test_bad_values_are_named(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config_from_dict(values, FitConfig()).resolved()
    assert message in str(info.value)


def test_bad_yaml_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_wrn50_preset_without_weights_says_how_to_supply_them() -> None:
    from engine.errors import WeightsError

    with pytest.raises(WeightsError, match="--weights PATH"):
        load_config(REPO / "configs" / "patchcore_wrn50.yaml")
