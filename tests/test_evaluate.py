"""`evaluate` on the real bottle test split with a small real model that follows the model API.

MeanImageModel stands in for PatchCore/PaDiM: it learns the mean training image and scores a pixel by how
far its colour is from that mean (real computation on real images, nothing canned).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from engine.errors import DataError, DecodeError
from engine.evaluation import metrics
from engine.evaluation.evaluate import evaluate, format_table
from engine.inputs import (
    datasets,  # not `import test_items`: pytest would collect it as a test
)
from engine.inputs.decode import read_rgb, to_tensor

SIZE = 64


class ScoreOutput(NamedTuple):
    scores: torch.Tensor
    maps: torch.Tensor


class MeanImageModel:
    method = "mean-image"
    device = "cpu"

    def __init__(self, train_paths: list[Path], input_size: int = SIZE) -> None:
        self.input_size = input_size
        self.mean = to_tensor([read_rgb(p) for p in train_paths], input_size).mean(0)

    def score(self, images: torch.Tensor) -> ScoreOutput:
        distance = (images - self.mean).abs().mean(1, keepdim=True)
        maps = F.avg_pool2d(distance, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
        return ScoreOutput(maps.amax(dim=(1, 2)), maps)


@pytest.fixture(scope="module")
def mean_model(bottle_root: Path) -> MeanImageModel:
    return MeanImageModel(datasets.train_images(bottle_root, "bottle")[::7])


@pytest.fixture(scope="module")
def bottle_result(mean_model: MeanImageModel, bottle_root: Path) -> dict:
    calls: list[tuple[int, int]] = []
    result = evaluate(mean_model, bottle_root, "bottle", batch_size=16, progress=lambda d, t: calls.append((d, t)))
    result["_progress_calls"] = calls
    return result


def test_result_has_contract_keys_and_counts(bottle_result: dict) -> None:
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect", "n_images", "images_per_second"):
        assert key in bottle_result
    assert bottle_result["n_images"] == 83
    per_defect = bottle_result["per_defect"]
    assert {name: block["count"] for name, block in per_defect.items()} == {
        "broken_large": 20,
        "broken_small": 22,
        "contamination": 21,
    }
    for block in [bottle_result, *per_defect.values()]:
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= block[key] <= 1.0
    assert bottle_result["images_per_second"] > 0
    assert bottle_result["_progress_calls"][-1] == (83, 83)
    json.dumps({k: v for k, v in bottle_result.items() if not k.startswith("_")}, allow_nan=False)


def test_metrics_agree_with_independent_computation(
    bottle_result: dict, mean_model: MeanImageModel, bottle_root: Path
) -> None:
    items = datasets.test_items(bottle_root, "bottle")
    out = mean_model.score(to_tensor([read_rgb(i.path) for i in items], SIZE))
    labels = np.array([i.label for i in items])
    # Pixel metrics at the masks' own resolution (256 px here, the model's maps are 64 px): the maps
    # are resized bilinearly onto the images, the masks are never resized.
    native = 256
    masks = np.stack(
        [np.zeros((native, native), bool) if i.mask is None else np.asarray(Image.open(i.mask)) > 127 for i in items]
    )
    maps = F.interpolate(out.maps[:, None], size=(native, native), mode="bilinear", align_corners=False)[:, 0]
    assert bottle_result["image_auroc"] == pytest.approx(roc_auc_score(labels, out.scores.numpy()), abs=1e-6)
    expected_pixel = roc_auc_score(masks.ravel(), maps.numpy().ravel())
    assert bottle_result["pixel_auroc"] == pytest.approx(expected_pixel, abs=1.5 / metrics.DEFAULT_MAX_THRESHOLDS)
    # The stand-in sees real defects: far better than chance at the pixel level.
    assert bottle_result["pixel_auroc"] > 0.75


def test_format_table_lists_every_defect(bottle_result: dict) -> None:
    table = format_table(bottle_result)
    for name in ("all", "broken_large", "broken_small", "contamination", "img AUROC", "AUPRO"):
        assert name in table
    assert f"{bottle_result['image_auroc']:.3f}" in table
    assert "83 test images (20 good)" in table


def _tiny_layout(bottle_root: Path, tmp_path: Path) -> Path:
    """A copy of two real test images (one good, one defect with its mask) in MVTec layout."""
    src = bottle_root / "bottle"
    cat = tmp_path / "tiny"
    (cat / "test" / "good").mkdir(parents=True)
    (cat / "test" / "broken_large").mkdir(parents=True)
    (cat / "ground_truth" / "broken_large").mkdir(parents=True)
    shutil.copy(src / "test" / "good" / "000.png", cat / "test" / "good" / "000.png")
    shutil.copy(src / "test" / "broken_large" / "000.png", cat / "test" / "broken_large" / "000.png")
    shutil.copy(
        src / "ground_truth" / "broken_large" / "000_mask.png", cat / "ground_truth" / "broken_large" / "000_mask.png"
    )
    return cat


def test_unreadable_test_image_names_the_file(mean_model: MeanImageModel, bottle_root: Path, tmp_path: Path) -> None:
    cat = _tiny_layout(bottle_root, tmp_path)
    (cat / "test" / "good" / "001.png").write_bytes(b"")
    with pytest.raises(DecodeError, match="001.png.*empty file"):
        evaluate(mean_model, cat)


def test_one_good_image_only_gives_undefined_pixel_free_metrics(
    mean_model: MeanImageModel, bottle_root: Path, tmp_path: Path
) -> None:
    cat = _tiny_layout(bottle_root, tmp_path)
    shutil.rmtree(cat / "test" / "broken_large")
    result = evaluate(mean_model, cat)
    assert result["image_auroc"] is None and result["aupro"] is None and result["per_defect"] == {}
    assert "n/a" in format_table(result)


def test_mask_of_another_size_is_refused(mean_model: MeanImageModel, bottle_root: Path, tmp_path: Path) -> None:
    cat = _tiny_layout(bottle_root, tmp_path)
    mask_path = cat / "ground_truth" / "broken_large" / "000_mask.png"
    with Image.open(mask_path) as mask:
        mask.resize((mask.width // 2, mask.height)).save(mask_path)
    with pytest.raises(DataError, match=r"000_mask.png is \d+x\d+ but its image .*000.png is"):
        evaluate(mean_model, cat)


def test_not_an_mvtec_folder(mean_model: MeanImageModel, tmp_path: Path) -> None:
    with pytest.raises(DataError):
        evaluate(mean_model, tmp_path)


def test_wrong_map_shape_is_refused(mean_model: MeanImageModel, bottle_root: Path, tmp_path: Path) -> None:
    class HalfMaps(MeanImageModel):
        def score(self, images: torch.Tensor) -> ScoreOutput:
            out = super().score(images)
            return ScoreOutput(out.scores, out.maps[:, ::2, ::2])

    broken = HalfMaps.__new__(HalfMaps)
    broken.__dict__.update(mean_model.__dict__)
    with pytest.raises(ValueError, match="maps of shape"):
        evaluate(broken, _tiny_layout(bottle_root, tmp_path))


@pytest.mark.slow
def test_real_patchcore_on_bottle(scan_model_dir: Path, bottle_root: Path) -> None:
    """The real model API end to end: a small PatchCore (64 px, 14 training images) on the bottle test split."""
    from engine.models.registry import load_model

    result = evaluate(load_model(scan_model_dir, device="cpu"), bottle_root, "bottle")
    assert result["n_images"] == 83 and set(result["per_defect"]) == {"broken_large", "broken_small", "contamination"}
    # Even this small model separates bottle defects well; a broken label/score or mask/map pairing would not.
    assert result["image_auroc"] > 0.9
    assert result["pixel_auroc"] > 0.85
    assert result["aupro"] > 0.5
