"""PatchCore's default `loo_method: repair`: a calibration image scored against the bank without its
rows plus the rows a fit without it would pick (engine/models/loo_repair.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.api import fit
from engine.config import FitConfig
from engine.features.embeddings import to_rows
from engine.inputs.datasets import train_images
from engine.inputs.decode import read_rgb, to_tensor
from engine.models.patchcore import PatchCore, projection_matrix


@pytest.fixture(scope="module")
def kept(demo_root: Path) -> tuple[PatchCore, list[Path]]:
    """A repair fit whose calibration state is kept (end_calibration skipped) to look inside."""
    paths = train_images(demo_root, "weave")
    mp = pytest.MonkeyPatch()
    mp.setattr(PatchCore, "end_calibration", lambda self: None)
    try:
        model = fit(paths, FitConfig(input_size=64, coreset_ratio=0.1, device="cpu", loo_images=6))
    finally:
        mp.undo()
    assert isinstance(model, PatchCore) and model._repair is not None
    return model, paths


def _rows(model: PatchCore, path: Path) -> torch.Tensor:
    return to_rows(model._embed(model.features(to_tensor([read_rgb(path)], 64)))).float()


def test_repair_covers_what_the_image_alone_covered(kept: tuple[PatchCore, list[Path]]) -> None:
    model, paths = kept
    repair = model._repair
    stats = model.fit_stats
    assert stats["loo_repair_rows"] == repair.rows.shape[0] > 0 and stats["loo_repair_images"] == len(repair.spans)
    matrix = projection_matrix(model.bank.shape[1], model.cfg.projection_dim, torch.Generator().manual_seed(0))
    proj = (lambda x: x @ matrix) if matrix is not None else (lambda x: x)  # noqa: E731
    radius = stats["coreset_covering_radius_projected"]
    rows = {i: proj(_rows(model, p)) for i, p in enumerate(paths)}
    for owner, (start, stop) in repair.spans.items():
        centres = proj(torch.cat([model.bank[model.bank_owner != owner], repair.rows[start:stop]]))
        others = torch.cat([r for i, r in rows.items() if i != owner])
        assert float(torch.cdist(others, centres).amin(1).max()) <= radius * (1 + 1e-3)
        # without the repair rows some of the other images' patches lose their cover
        rest = proj(model.bank[model.bank_owner != owner])
        assert float(torch.cdist(others, rest).amin(1).max()) > radius


def test_repaired_maps_are_a_bank_without_the_image_plus_its_repair(kept: tuple[PatchCore, list[Path]]) -> None:
    model, paths = kept
    repair = model._repair
    lower = 0
    for owner, (start, stop) in repair.spans.items():
        image = to_tensor([read_rgb(paths[owner])], 64)
        repaired = model.score(image, torch.tensor([owner])).maps
        reduced = PatchCore(model.cfg, "cpu", model.extractor)
        reduced.load_tensors({"bank": torch.cat([model.bank[model.bank_owner != owner], repair.rows[start:stop]]),
                              "column_weights": model.column_weights})
        torch.testing.assert_close(repaired, reduced.score(image).maps, rtol=1e-5, atol=1e-5)
        kept_repair, model._repair = model._repair, None
        try:
            holes = model.score(image, torch.tensor([owner])).maps
        finally:
            model._repair = kept_repair
        assert bool((repaired <= holes + 1e-5).all())
        lower += int(bool((repaired < holes - 1e-4).any()))
    assert lower > 0


def test_repair_changes_only_the_threshold(demo_root: Path) -> None:
    paths = train_images(demo_root, "weave")
    cfg = dict(input_size=64, coreset_ratio=0.1, device="cpu", loo_images=6)
    repaired = fit(paths, FitConfig(**cfg))
    holes = fit(paths, FitConfig(**cfg, loo_method="exclude"))
    assert torch.equal(repaired.bank, holes.bank) and torch.equal(repaired.bank_owner, holes.bank_owner)
    assert repaired._repair is None and repaired.calibration.source == "loo"  # dropped after the calibration
    assert max(repaired.calibration.normal_scores) <= max(holes.calibration.normal_scores) + 1e-5


def test_repair_on_thinned_tiles(demo_root: Path) -> None:
    from engine.models.tiled import image_output, score_images_tiled

    paths = train_images(demo_root, "weave")
    mp = pytest.MonkeyPatch()
    mp.setattr(PatchCore, "end_calibration", lambda self: None)
    try:  # 25 tiles of 64 px per image, candidates on the stride-2 grid
        model = fit(paths, FitConfig(tile_size=64, image_scale=1, coreset_ratio=0.1, device="cpu", loo_images=4,
                                     coreset_candidates=8000))
    finally:
        mp.undo()
    assert model.fit_stats["coreset_candidate_stride"] == 2 and model._repair is not None
    for owner, (start, stop) in model._repair.spans.items():
        pixels = read_rgb(paths[owner])
        ((_, out),) = list(score_images_tiled(model, [(owner, pixels)], loo=True))
        reduced = PatchCore(model.cfg, "cpu", model.extractor)
        reduced.load_tensors({"bank": torch.cat([model.bank[model.bank_owner != owner],
                                                 model._repair.rows[start:stop]]),
                              "column_weights": model.column_weights})
        torch.testing.assert_close(out.map, image_output(reduced, pixels).map, rtol=1e-4, atol=1e-4)  # cdist vs index
