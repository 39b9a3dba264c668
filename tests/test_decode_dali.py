"""Decoders agree: the DALI CPU pipeline and Pillow give the same preprocessed tensors on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imagegen import jpeg_bytes, png_bytes, valid_files

from engine.errors import ConfigError, DecodeError
from engine.inputs.decode import DECODER_TOLERANCE, resize_batch
from engine.inputs.decoders import (
    DaliDecoder,
    PillowDecoder,
    dali_available,
    make_decoder,
)
from engine.inputs.inspection import ImageInfo, inspect_bytes

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
CPU = torch.device("cpu")


def _items(files: dict[str, bytes]) -> list[tuple[bytes, ImageInfo]]:
    return [(data, inspect_bytes(data, Path(name).suffix)) for name, data in files.items()]


def _assert_same_tensors(items: list[tuple[bytes, ImageInfo]], batch_size: int) -> None:
    dali = DaliDecoder(CPU, batch_size)
    dali_px = dali.decode(items)
    pillow_px = PillowDecoder(CPU).decode(items)
    assert all(isinstance(px, torch.Tensor) for px in dali_px + pillow_px)
    for a, b in zip(dali_px, pillow_px, strict=True):
        assert a.shape == b.shape and a.dtype == torch.uint8
    diff = (resize_batch(dali_px, 64) - resize_batch(pillow_px, 64)).abs().max()
    assert float(diff) <= DECODER_TOLERANCE


def test_dali_matches_pillow_on_unusual_valid_files() -> None:
    _assert_same_tensors(_items(valid_files()), batch_size=8)


def test_dali_matches_pillow_on_real_data(real_images: list[Path]) -> None:
    files = {p.name: p.read_bytes() for p in real_images}
    files.update({f"gen_{i}.jpg": jpeg_bytes(200, 150, seed=i, quality=75 + i) for i in range(4)})
    _assert_same_tensors(_items(files), batch_size=5)


def test_dali_batch_failure_falls_back_to_pillow_per_file() -> None:
    """A stream DALI cannot decode fails its whole batch; every file is then decided by Pillow."""
    good = png_bytes(40, 30, seed=1)
    broken = good[:60] + b"\x00" * 200 + good[260:]  # passed in as if inspected: DALI fails on it
    info = inspect_bytes(good, ".png")
    dali = DaliDecoder(CPU, batch_size=4)
    results = dali.decode([(good, info), (broken, info), (good, info)])
    assert isinstance(results[1], DecodeError)
    assert torch.equal(results[0], results[2]) and results[0].shape == (30, 40, 3)
    again = dali.decode([(good, info)])  # the pipeline is rebuilt after the failure
    assert torch.equal(again[0], results[0])


def test_make_decoder_choices() -> None:
    assert make_decoder("auto", CPU).name == "dali"
    assert make_decoder("pillow", CPU).name == "pillow"
    with pytest.raises(ConfigError, match="GPU"):
        make_decoder("nvjpeg", CPU)
    with pytest.raises(ConfigError, match="unknown decoder"):
        make_decoder("opencv", CPU)
