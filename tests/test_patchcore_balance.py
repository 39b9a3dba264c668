"""PatchCore layer balancing: every layer carries the same share of the training variance."""

import torch

from engine.config import load_config
from engine.models.patchcore import PatchCore


def _model(balance: bool) -> PatchCore:
    return PatchCore(load_config(overrides={"device": "cpu", "balance_layers": balance}), "cpu")


def test_layers_end_with_equal_variance_and_weights_apply_in_place() -> None:
    model = _model(True)
    c1, c2 = model.extractor.channels  # Lite0 blocks.2 + blocks.4: 40 + 112
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(5000, c1, generator=gen) * 3.0, torch.randn(5000, c2, generator=gen) * 0.5], 1)
    original = rows.clone()
    weights = model._balance(rows)
    var = rows.var(0)
    assert torch.allclose(var[:c1].sum(), var[c1:].sum(), rtol=1e-3)
    assert torch.allclose(rows, original * weights)  # applied in place, per column
    assert torch.equal(weights[:c1], weights[:1].expand(c1)) and weights[0] < 1 < weights[-1]


def test_off_means_unit_weights_and_old_files_load_unweighted() -> None:
    model = _model(False)
    rows = torch.randn(100, sum(model.extractor.channels))
    before = rows.clone()
    assert torch.equal(model._balance(rows), torch.ones(rows.shape[1])) and torch.equal(rows, before)
    model.load_tensors({"bank": torch.randn(50, rows.shape[1])})  # a file from before balancing
    assert torch.equal(model.column_weights, torch.ones(rows.shape[1]))


def test_fitted_model_scores_with_its_weights(tiny_patchcore) -> None:
    from engine.features import patchcore_embedding

    dim = sum(tiny_patchcore.extractor.channels)
    assert torch.equal(tiny_patchcore.column_weights, torch.ones(dim))  # default: off
    maps = tiny_patchcore.features(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    plain = patchcore_embedding(maps).float()
    assert torch.equal(tiny_patchcore._embed(maps), plain)
    weights = torch.linspace(0.5, 2.0, dim)
    balanced = _model(True)
    balanced._set_column_weights(weights)
    assert torch.allclose(balanced._embed(maps), plain * weights.view(1, -1, 1, 1))
