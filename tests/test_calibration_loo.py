"""Leave-one-out scores and the conformal threshold: real fits on the synthetic demo data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.api import fit, loo_scores
from engine.artifact import read_meta
from engine.calibration import calibrate, clopper_pearson, conformal_rank
from engine.config import FitConfig
from engine.inputs.datasets import train_images
from engine.models.padim import PaDiM, loo_distance
from engine.models.registry import load_model


def test_conformal_rank_and_certified_rate() -> None:
    assert conformal_rank(99, 0.01) == 99  # 99 images certify 1% with their maximum
    assert conformal_rank(98, 0.01) == 99  # > n: too few
    assert conformal_rank(199, 0.05) == 190
    cal = calibrate(np.arange(21.0), 0.01, "holdout")
    assert cal.threshold == 20.0 and cal.rank == 21 and not cal.sufficient
    assert math.isclose(cal.certified_rate, 1 / 22)
    assert "cannot certify" in cal.statement() and "need >= 99" in cal.statement()
    cal = calibrate(np.arange(200.0), 0.05, "loo")
    assert cal.rank == math.ceil(201 * 0.95) and cal.threshold == cal.rank - 1.0 and cal.sufficient
    assert cal.certified_rate <= 0.05 and cal.normalize(cal.threshold) == 0.5
    assert cal.normalize(float(np.median(np.arange(200.0)))) == 0.0


def test_conformal_threshold_keeps_its_promise_on_exchangeable_scores() -> None:
    # Mean false-alarm rate over many calibration draws is at most the target (the guarantee).
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(2000):
        scores = rng.gamma(2.0, size=40)
        cal = calibrate(scores, 0.1, "holdout")
        rates.append(float(np.mean(rng.gamma(2.0, size=400) > cal.threshold)))
    assert abs(np.mean(rates) - cal.certified_rate) < 0.006 and np.mean(rates) <= 0.1


def test_clopper_pearson() -> None:
    lo, hi = clopper_pearson(16, 300)
    assert 0.030 < lo < 0.031 and 0.085 < hi < 0.086
    assert clopper_pearson(0, 20)[0] == 0.0 and clopper_pearson(20, 20)[1] == 1.0


@pytest.fixture(scope="module")
def demo_train(demo_root: Path) -> list[Path]:
    return train_images(demo_root, "weave")


def test_patchcore_loo_excludes_own_bank_rows_and_is_saved(demo_train: list[Path], tmp_path: Path) -> None:
    cfg = FitConfig(input_size=64, coreset_ratio=0.5, device="cpu", calibration="loo", loo_images=0,
                    loo_method="exclude")
    model = fit(demo_train, cfg)
    assert model.bank_owner is not None and model.bank_owner.shape == (model.bank.shape[0],)
    assert set(model.bank_owner.tolist()) <= set(range(len(demo_train)))
    cal = model.calibration
    assert cal.source == "loo" and cal.n == len(demo_train) and model.fit_stats["holdout_images"] == 0
    # Every training image's own rows are in the bank: in-sample scores are lower than LOO ones.
    skipped: list = []
    loo = loo_scores(model, demo_train, list(range(len(demo_train))), skipped)
    np.testing.assert_allclose(np.sort(loo), np.sort(cal.normal_scores), rtol=1e-5)
    from engine.api import _raw_scores

    plain = _raw_scores(model, demo_train, skipped, 30.0)
    assert (loo >= plain - 1e-6).all() and (loo > plain).mean() > 0.9
    # Owner exclusion = scoring against the bank without that image's rows: the same patch maps.
    from engine.inputs.decode import read_rgb, to_tensor
    from engine.models.patchcore import PatchCore

    image = to_tensor([read_rgb(demo_train[3])], 64)
    reduced = PatchCore(model.cfg, "cpu", model.extractor)
    reduced.load_tensors({"bank": model.bank[model.bank_owner != 3], "column_weights": model.column_weights})
    torch.testing.assert_close(model.score(image, torch.tensor([3])).maps, reduced.score(image).maps)
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.equal(again.bank_owner, model.bank_owner)
    assert read_meta(tmp_path / "m")["tensors"]["bank_owner"]["dtype"] == "int32"
    assert read_meta(tmp_path / "m")["calibration"]["n"] == len(demo_train)


def test_patchcore_file_without_owners_loads_and_refuses_loo(demo_train: list[Path], tmp_path: Path) -> None:
    from engine.api import _raw_scores

    model = fit(demo_train, FitConfig(input_size=64, coreset_ratio=0.5, device="cpu", calibration="holdout"))
    assert model.calibration.source == "holdout"
    model.bank_owner = None
    model.save(tmp_path / "old")
    old = load_model(tmp_path / "old")
    assert old.bank_owner is None
    assert _raw_scores(old, demo_train[:2], [], 30.0).shape == (2,)
    with pytest.raises(ValueError, match="cannot score leave-one-out"):
        loo_scores(old, demo_train[:2], [0, 1], [])


def test_padim_loo_matches_an_explicit_refit_without_the_image() -> None:
    torch.manual_seed(0)
    n, p, d, eps = 12, 5, 4, 0.5
    x = torch.randn(n, p, d, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)

    def gaussians(rows: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean = rows.mean(0)
        cov = torch.einsum("npi,npj->pij", rows - mean, rows - mean) / (rows.shape[0] - 1)
        return mean, torch.linalg.inv(cov + reg * torch.eye(d, dtype=torch.float64))

    def maha(v: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
        u = v - mean
        return torch.einsum("pi,pij,pj->p", u, prec, u).sqrt()

    mean, prec = gaussians(x, eps)
    for i in (0, 7):
        inside = maha(x[i], mean, prec)
        rest = torch.cat([x[:i], x[i + 1 :]])
        # The downdate regularises with eps scaled like the covariance: (n-1)/(n-2) of it.
        ref = maha(x[i], *gaussians(rest, eps * (n - 1) / (n - 2)))
        torch.testing.assert_close(loo_distance(inside, n), ref, rtol=1e-9, atol=1e-9)
        assert (loo_distance(inside, n) > inside).all()


def test_padim_fit_calibrates_leave_one_out(demo_train: list[Path]) -> None:
    model = fit(demo_train, FitConfig(method="padim", input_size=64, device="cpu", loo_images=10))
    assert isinstance(model, PaDiM)
    assert model.calibration.source == "loo" and model.calibration.n == 10
    assert model.fit_stats["training_images"] == len(demo_train)


def test_report_eval_and_scan_say_how_sure_the_threshold_is() -> None:
    from engine.evaluation.evaluate import false_alarms, format_table
    from engine.report.page import false_alarm_note
    from engine.scan.job import threshold_note

    few = calibrate(np.arange(40.0), 0.01, "loo")  # vade demo: 40 training images
    note = false_alarm_note(5, 10, few.to_dict())
    assert "5 (50.0%" in note and "40 calibration images cannot certify 1.0%" in note
    assert "above what the threshold promises" in note  # 50%, interval 18.7-81.3%, far above 2.4%
    enough = calibrate(np.arange(300.0), 0.05, "loo")
    assert "above what" not in false_alarm_note(16, 300, enough.to_dict())
    assert "no certified rate" in false_alarm_note(1, 20, {"source": "holdout", "threshold": 1.0})
    far = false_alarms(np.array([1.0, 500.0, 2.0]), enough)
    assert far["flagged"] == 1 and far["good"] == 3 and far["certified_rate"] == enough.certified_rate
    table = format_table({"n_images": 3, "n_good": 3, "false_alarms": far})
    assert "false alarms on good images: 1 of 3" in table and "certified 4.98% by 300 loo images" in table
    assert "certifies an expected false-alarm rate <= 4.98%" in threshold_note({"calibration": enough.to_dict()})
    assert "no certified" in threshold_note({"calibration": {"source": "holdout", "normal_scores": [1, 2]}})
