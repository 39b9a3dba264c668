"""Scan fixtures: one small real model per session, and real images to scan.

The model is a real PatchCore fit (efficientnet_lite0, 64 px input so scans take milliseconds per
image) on MVTec bottle train/good from ../shared/data, or on generated images where that is absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.inputs.datasets import list_images

SHARED_BOTTLE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mvtec_bottle" / "bottle").resolve()


def _normal_images(folder: Path, count: int) -> list[Path]:
    if (SHARED_BOTTLE / "train" / "good").is_dir():
        return list_images(SHARED_BOTTLE / "train" / "good")[:count]
    from imagegen import jpeg_bytes, write_files

    return write_files(folder, {f"normal_{i:03d}.jpg": jpeg_bytes(128, 128, seed=i % 3) for i in range(count)})


@pytest.fixture(scope="session")
def scan_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved PatchCore model directory (fit once per test session)."""
    from engine.api import fit
    from engine.config import FitConfig

    work = tmp_path_factory.mktemp("scan_model")
    cfg = FitConfig(input_size=64, coreset_ratio=0.1, holdout_fraction=0.3, device="cpu", batch_size=8)
    model = fit(_normal_images(work / "normal", 14), cfg)
    model.save(work / "model")
    return work / "model"


@pytest.fixture(scope="session")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A dozen real test images (bottle good and defective) copied to a temporary folder, or generated ones."""
    folder = tmp_path_factory.mktemp("real_images")
    test_dir = SHARED_BOTTLE / "test"
    if test_dir.is_dir():
        picked = [*list_images(test_dir / "good")[:6], *list_images(test_dir / "broken_large")[:6]]
        out = []
        for i, src in enumerate(picked):
            out.append(folder / f"{i:02d}_{src.parent.name}.png")
            shutil.copyfile(src, out[-1])
        return out
    from imagegen import jpeg_bytes, png_bytes, write_files

    files = {f"{i:02d}.png": png_bytes(96, 96, seed=i) for i in range(6)}
    files.update({f"{i:02d}.jpg": jpeg_bytes(96, 96, seed=i) for i in range(6, 12)})
    return write_files(folder, files)


@pytest.fixture(scope="session")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """162 small generated images in nested folders, two of them broken (for the kill-and-resume test)."""
    from imagegen import broken_files, jpeg_bytes, png_bytes, write_files

    folder = tmp_path_factory.mktemp("many_images")
    for sub in range(4):
        files = {f"img_{i:03d}.png": png_bytes(80, 80, seed=sub * 40 + i) for i in range(20)}
        files.update({f"img_{i:03d}.JPG": jpeg_bytes(80, 80, seed=sub * 40 + i) for i in range(20, 40)})
        write_files(folder / f"part{sub}", files)
    broken = broken_files()
    write_files(folder / "part1", {"truncated.jpg": broken["truncated.jpg"][0], "empty.png": b""})
    return folder
