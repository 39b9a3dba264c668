"""PatchCore's `loo_method: fold`: the calibration images fitted last, scored as an exact hold-out of
the bank selected without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.api import _raw_scores, fit, loo_subset
from engine.config import FitConfig
from engine.inputs.datasets import train_images
from engine.lifecycle import update
from engine.models.patchcore import PatchCore


@pytest.fixture(scope="module")
def demo_train(demo_root: Path) -> list[Path]:
    return train_images(demo_root, "weave")


def _fold_and_rest(cfg: FitConfig, paths: list[Path]) -> tuple[PatchCore, PatchCore, list[int]]:
    """A fit with its calibration fold, and a fit on the other images alone (no fold of its own)."""
    with_fold = fit(paths, cfg)
    assert isinstance(with_fold, PatchCore)
    fold = loo_subset(len(paths), min(cfg.loo_images, len(paths) // 2), cfg.seed)
    rest = fit([p for i, p in enumerate(paths) if i not in fold], FitConfig(**{**cfg.__dict__, "loo_method": "exclude"}))
    assert isinstance(rest, PatchCore)
    return with_fold, rest, fold


@pytest.mark.parametrize("tiled", [False, True], ids=["whole-image", "tiles-thinned"])
def test_fold_scores_are_a_hold_out_of_the_bank_without_the_fold(demo_train: list[Path], tiled: bool) -> None:
    if tiled:  # 25 tiles of 64 px per 256 px image (1,600 patches), candidates thinned to stride 2 in both fits
        cfg = FitConfig(tile_size=64, image_scale=1, coreset_ratio=0.1, device="cpu", layer_balance="none",
                        loo_images=6, coreset_candidates=8000, loo_method="fold", calibration="loo")
    else:
        cfg = FitConfig(input_size=64, coreset_ratio=0.25, device="cpu", layer_balance="none", loo_images=6,
                        loo_method="fold", calibration="loo")
    model, rest, fold = _fold_and_rest(cfg, demo_train)
    if tiled:
        assert model.fit_stats["coreset_candidate_stride"] == rest.fit_stats["coreset_candidate_stride"] == 2
    cal = model.calibration
    assert cal.source == "fold" and cal.n == len(fold) == 6
    assert model.fit_stats["calibration_fold_images"] == 6
    # The rows outside the fold are exactly the bank of a fit without the fold's images ...
    m = rest.bank.shape[0]
    assert bool((~torch.isin(model.bank_owner[:m], torch.tensor(fold, dtype=torch.int32))).all())
    torch.testing.assert_close(model.bank[:m], rest.bank, rtol=0, atol=0)
    # ... the greedy then added rows of the fold's images only ...
    added = model.bank_owner[m:]
    assert added.numel() == model.fit_stats["calibration_fold_rows"] > 0
    assert bool(torch.isin(added, torch.tensor(fold, dtype=torch.int32)).all())
    # ... and the fold's calibration scores are that fit's plain scores of those images.
    held = _raw_scores(rest, [demo_train[i] for i in fold], [], 30.0)
    np.testing.assert_allclose(np.asarray(cal.normal_scores), held, rtol=1e-5)
    # Scoring as a group leaves the model as it was: plain scores afterwards match a fresh load.
    after = _raw_scores(model, demo_train[:2], [], 30.0)
    model._index, model._support = None, None
    np.testing.assert_allclose(_raw_scores(model, demo_train[:2], [], 30.0), after, rtol=0)


def test_fold_is_at_most_half_and_other_methods_score_each_image(demo_train: list[Path]) -> None:
    cfg = FitConfig(input_size=64, coreset_ratio=0.25, device="cpu", loo_images=0, loo_method="fold",
                    calibration="loo")
    model = fit(demo_train, cfg)
    assert model.calibration.source == "fold" and model.calibration.n == len(demo_train) // 2
    plain = fit(demo_train, FitConfig(input_size=64, coreset_ratio=0.25, device="cpu", loo_method="exclude",
                                      calibration="loo"))
    assert plain.calibration.source == "loo" and plain.calibration.n == len(demo_train)
    assert "calibration_fold_images" not in plain.fit_stats
    padim = fit(demo_train, FitConfig(method="padim", input_size=64, device="cpu", loo_images=6, loo_method="fold",
                                      calibration="loo"))
    assert padim.calibration.source == "loo" and padim.calibration.n == 6  # PaDiM's leave-one-out is exact


def test_update_scores_new_images_against_the_bank_before_it(demo_train: list[Path], tmp_path: Path) -> None:
    cfg = FitConfig(input_size=64, coreset_ratio=0.1, device="cpu", loo_images=4, loo_method="fold", calibration="loo")
    first, second = demo_train[:8], demo_train[8:]
    old = fit(first, cfg)
    old.save(tmp_path / "half")
    listing = tmp_path / "new.txt"
    listing.write_text("".join(f"{p}\n" for p in second))
    new, _, info = update(tmp_path / "half", listing, out=tmp_path / "up", device="cpu")
    assert info["added"] > 0 and new.calibration.source == "fold+update"
    old_scores = old.calibration.normal_scores
    assert new.calibration.normal_scores[: len(old_scores)] == old_scores
    np.testing.assert_allclose(new.calibration.normal_scores[len(old_scores) :],
                               _raw_scores(old, second, [], 30.0), rtol=1e-5)
