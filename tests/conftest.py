"""Shared fixtures: the real evaluation data in ../shared/data, skipped with a reason where absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mvtec_bottle" / "bottle").is_dir():
        pytest.skip(f"real evaluation data not found at {SHARED_DATA} (only present in the team workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bottle_root(shared_data: Path) -> Path:
    return shared_data / "mvtec_bottle"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in synthetic MVTec-layout dataset (category 'weave'), generated once per session."""
    from engine.demo.dataset import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_test_good=4, n_per_defect=2)


@pytest.fixture(scope="session")
def tiny_patchcore(demo_root: Path):
    """A real PatchCore fit at 64 px on the synthetic data: seconds, for API and file-format tests."""
    from engine.api import fit
    from engine.config import FitConfig
    from engine.inputs.datasets import train_images

    return fit(train_images(demo_root, "weave"), FitConfig(input_size=64, coreset_ratio=0.25, device="cpu"))


pytest_plugins = ["conftest_scan"]  # scan fixtures (tests/conftest_scan.py, owned by the scan engineer)
