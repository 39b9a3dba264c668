"""Inspection and Pillow decoding on real generated files: unusual-but-valid decode, broken ones say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from imagegen import (
    broken_files,
    encode,
    exif_rotated_jpeg,
    pattern,
    valid_files,
    write_files,
)
from PIL import Image

from engine.errors import DecodeError
from engine.inputs.decode import (
    _box_reduce,
    decode_pillow,
    read_rgb,
    resize_batch,
    to_tensor,
)
from engine.inputs.inspection import inspect_bytes


@pytest.mark.parametrize("name", sorted(valid_files()))
def test_valid_unusual_files_decode_to_rgb(name: str, tmp_path: Path) -> None:
    (path,) = write_files(tmp_path, {name: valid_files()[name]})
    info = inspect_bytes(path.read_bytes(), path.suffix)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    if name != "exif_rotated.jpg":
        assert rgb.shape[:2] == (info.height, info.width)
    assert rgb.flags.writeable


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_broken_files_raise_decode_error_saying_why(name: str, tmp_path: Path) -> None:
    data, word = broken_files()[name]
    (path,) = write_files(tmp_path, {name: data})
    with pytest.raises(DecodeError, match=word):
        read_rgb(path)


def test_exif_orientation_is_applied() -> None:
    rgb = decode_pillow(exif_rotated_jpeg(96, 64, orientation=6))
    assert rgb.shape == (96, 64, 3)  # stored 96 wide x 64 high, displayed rotated by 90 degrees


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits() -> None:
    grey16 = np.full((8, 8), 65535, np.uint16)
    grey16[0, 0] = 0
    rgb = decode_pillow(encode(Image.fromarray(grey16), "PNG"))
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [0, 0, 0]


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.fromarray(pattern(100, 100)), "PNG")
    assert inspect_bytes(data, ".png", max_pixels=10_000).width == 100
    with pytest.raises(DecodeError, match="over the limit of 9999"):
        inspect_bytes(data, ".png", max_pixels=9_999)


@pytest.mark.parametrize(
    "params",
    [
        {"quality": 95, "subsampling": 0},
        {"quality": 50, "subsampling": 2, "optimize": True},
        {"quality": 85, "progressive": True},
        {"quality": 90, "restart_marker_blocks": 1},
        {"quality": 100, "icc_profile": b"\xff\xd9\xff\xc0" * 64},  # marker-like bytes inside a header segment
    ],
)
def test_jpeg_structure_check_accepts_valid_encodings(params: dict) -> None:
    data = encode(Image.fromarray(pattern(123, 77, 2)), "JPEG", **params)
    assert inspect_bytes(data, ".jpeg").format == "JPEG"
    assert decode_pillow(data).shape == (77, 123, 3)


def test_bytes_after_the_end_of_a_jpeg_are_ignored() -> None:
    data = encode(Image.fromarray(pattern(64, 48)), "JPEG") + b"camera trailer \xff\xc0 junk"
    assert inspect_bytes(data, ".jpg").width == 64


def test_missing_file_and_folder_are_decode_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="file not found"):
        read_rgb(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DecodeError, match="folder"):
        read_rgb(tmp_path / "dir.png")


def test_to_tensor_matches_per_image_resize_bitwise() -> None:
    """Grouped resizing gives each image exactly what resizing it alone gives."""
    images = [pattern(90, 70, 1), pattern(64, 64, 2), pattern(90, 70, 3), pattern(33, 200, 4)]
    batch = to_tensor(images, 64)
    assert batch.shape == (4, 3, 64, 64) and batch.dtype == torch.float32
    for i, rgb in enumerate(images):
        alone = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        if alone.shape[-2:] != (64, 64):
            alone = F.interpolate(alone, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        assert torch.equal(batch[i], alone[0].clamp(0, 255) / 255.0)
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0


def test_box_reduce_is_the_block_mean_in_strips() -> None:
    rng = np.random.default_rng(0)
    chw = torch.from_numpy(rng.integers(0, 256, (3, 301, 250), dtype=np.uint8))
    reduced = _box_reduce(chw, 3)  # 301 rows span several strips and end with a partial block
    assert reduced.shape == (3, 101, 84)
    block = chw[:, 3:6, 6:9].double().mean(dim=(1, 2))
    assert torch.allclose(reduced[:, 1, 2].double(), block, atol=1e-4)
    assert torch.allclose(reduced[:, 100, 83].double(), chw[:, 300:, 249:].double().mean(dim=(1, 2)), atol=1e-4)


def test_huge_image_is_reduced_before_resize_and_stays_close() -> None:
    """Over 16 MP the image is box-averaged first; the result is close to a direct antialiased resize."""
    ramp = np.arange(4100)
    rgb = np.empty((4100, 4100, 3), np.uint8)
    rgb[:, :, 0] = ((ramp // 7) % 256)[None, :]
    rgb[:, :, 1] = ((ramp // 5) % 256)[:, None]
    rgb[:, :, 2] = ((ramp[:, None] + ramp[None, :]) // 50) % 256
    out = resize_batch([torch.from_numpy(rgb)], 64)
    # the reference resizes the whole image directly (uint8 path: fast, rounded to whole levels)
    direct = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None], size=(64, 64), mode="bilinear", antialias=True)
    direct = direct.float() / 255.0
    assert out.shape == (1, 3, 64, 64)
    assert float((out - direct).abs().mean()) < 0.01
