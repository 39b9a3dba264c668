"""PatchCore layer balancing: per-layer weights so every layer carries the same share of a quantity."""

import pytest
import torch

from engine.config import ConfigError, config_from_dict, load_config
from engine.models.patchcore import PatchCore


def _model(balance: str, ratio: float = 0.1) -> PatchCore:
    overrides = {"device": "cpu", "layer_balance": balance, "coreset_ratio": ratio, "projection_dim": 0}
    return PatchCore(load_config(overrides=overrides), "cpu")


def _rows(c1: int, c2: int, scale1: float, scale2: float, n: int = 5000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(n, c1, generator=gen) * scale1, torch.randn(n, c2, generator=gen) * scale2], 1)


def test_variance_mode_equalises_layer_variances_in_place() -> None:
    model = _model("variance")
    c1, c2 = model.extractor.channels  # Lite0 blocks.2 + blocks.4: 40 + 112
    rows = _rows(c1, c2, 3.0, 0.5)
    original = rows.clone()
    model._weighted_coreset(rows)
    weights = model.column_weights
    var = rows.var(0)
    assert torch.allclose(var[:c1].sum(), var[c1:].sum(), rtol=1e-3)
    assert torch.allclose(rows, original * weights)  # applied in place, per column
    assert torch.equal(weights[:c1], weights[:1].expand(c1)) and weights[0] < 1 < weights[-1]
    assert model._layer_weights()[0] * model._layer_weights()[1] == pytest.approx(1.0, rel=1e-5)


def test_nearest_mode_weights_the_layer_with_larger_residuals_down() -> None:
    # Layer 1: few distinct patterns (a coreset covers them; tiny residuals) but a large spread
    # between them; layer 2: small isotropic noise everywhere (large residuals relative to its spread).
    model = _model("nearest")
    c1, c2 = model.extractor.channels
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randn(20, c1, generator=gen) * 5.0
    layer1 = patterns[torch.randint(20, (4000,), generator=gen)] + 0.01 * torch.randn(4000, c1, generator=gen)
    layer2 = torch.randn(4000, c2, generator=gen) * 0.3
    rows = torch.cat([layer1, layer2], 1)
    original = rows.clone()
    picks, radius = model._weighted_coreset(rows)
    w1, w2 = model._layer_weights()
    assert w1 > 1 > w2  # the spread-out but well-covered layer counts more than the noisy one
    assert w1 * w2 == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(rows, original * model.column_weights)
    assert picks.numel() == 400 and radius > 0
    # the variance rule would do the opposite here: layer 1 has far more variance
    variance = _model("variance")
    variance._weighted_coreset(original.clone())
    assert variance._layer_weights()[0] < 1


def test_none_means_unit_weights_and_old_files_load_unweighted() -> None:
    model = _model("none")
    rows = torch.randn(300, sum(model.extractor.channels))
    before = rows.clone()
    model._weighted_coreset(rows)
    assert torch.equal(model.column_weights, torch.ones(rows.shape[1])) and torch.equal(rows, before)
    model.load_tensors({"bank": torch.randn(50, rows.shape[1])})  # a file from before balancing
    assert torch.equal(model.column_weights, torch.ones(rows.shape[1]))


def test_config_key_and_its_old_spelling() -> None:
    assert load_config().layer_balance == "nearest"
    assert config_from_dict({"balance_layers": True}).layer_balance == "variance"
    assert config_from_dict({"balance_layers": False}).layer_balance == "none"
    with pytest.raises(ConfigError, match="layer_balance must be one of"):
        load_config(overrides={"layer_balance": "equal"})


def test_fitted_model_scores_with_its_weights(tiny_patchcore) -> None:
    from engine.features.embeddings import patchcore_embedding

    dim = sum(tiny_patchcore.extractor.channels)
    maps = tiny_patchcore.features(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    plain = patchcore_embedding(maps).float()
    weights = tiny_patchcore.column_weights
    assert weights.shape == (dim,) and not torch.equal(weights, torch.ones(dim))  # default: nearest
    assert torch.allclose(tiny_patchcore._embed(maps), plain * weights.view(1, -1, 1, 1))
    assert tiny_patchcore.meta["fit"]["layer_weights"] == pytest.approx(tiny_patchcore._layer_weights(), abs=1e-4)


def test_nearest_shares_come_from_whole_sampled_units_thinned_as_the_full_set(monkeypatch) -> None:
    from engine.models import patchcore

    model = _model("nearest", ratio=0.05)
    model.cfg.coreset_candidates = 500  # 12 units of 8 x 8 = 768 rows: the full set thins, stride 2
    model._fit_grid = (8, 8)
    monkeypatch.setattr(patchcore, "NEAREST_UNITS", 5)
    sample = model._share_sample(12 * 64)
    assert sample is not None and sample.numel() == 5 * 64
    units = sample.view(5, 64)
    assert torch.equal(units - units[:, :1], torch.arange(64).expand(5, 64))  # whole units, in order
    assert bool((units[:, 0] % 64 == 0).all()) and bool((units[1:, 0] > units[:-1, 0]).all())
    assert torch.equal(sample, model._share_sample(12 * 64))  # seeded
    assert model._share_sample(5 * 64) is None  # as few units as the sample: all rows
    assert model._coreset_candidates(5 * 64, 12 * 64).numel() == 5 * 16  # the full set's stride 2
    assert model._coreset_candidates(5 * 64, 5 * 64) is None  # alone, 320 rows would not thin
    rows = torch.randn(12 * 64, sum(model.extractor.channels), generator=torch.Generator().manual_seed(3))
    share = model.layer_shares(rows, "nearest")
    assert share.shape == (2,) and bool((share > 0).all())
