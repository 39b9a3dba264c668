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
