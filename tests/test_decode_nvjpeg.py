"""The nvjpeg decoder's CPU-side work, checked without a GPU: EXIF orientation applied to what nvjpeg
returns (pixels as stored), so rotated camera JPEGs match Pillow's exif_transpose exactly."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from imagegen import exif_rotated_jpeg, jpeg_bytes, png_bytes
from PIL import Image

from engine.inputs.decode import decode_pillow
from engine.inputs.decoders import (
    NvjpegDecoder,
    apply_orientation,
    exif_orientation,
    reused_decoder,
)
from engine.inputs.inspection import inspect_bytes


def as_stored(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What nvjpeg on CUDA returns: (3, H, W) RGB pixels as stored, EXIF ignored (same IJG decode as Pillow)."""
    out = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as img:
            out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow(orientation: int) -> None:
    data = exif_rotated_jpeg(96, 64, orientation=orientation)
    assert exif_orientation(data) == orientation
    decoder = NvjpegDecoder(torch.device("cpu"), decode_jpeg=as_stored)
    (got,) = decoder.decode([(data, inspect_bytes(data, ".jpg"))])
    expected = decode_pillow(data)
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape  # width and height swapped for 5..8
    assert np.array_equal(got.numpy(), expected)
    stored = as_stored([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0].permute(1, 2, 0).numpy()
    if orientation != 1:  # what the nvjpeg decoder returned before: the stored pixels, a wrong image
        assert stored.shape != expected.shape or not np.array_equal(stored, expected)


def test_mixed_batch_keeps_order_and_sends_non_jpegs_to_pillow() -> None:
    files = [exif_rotated_jpeg(40, 24, 6), png_bytes(30, 20), jpeg_bytes(32, 16), exif_rotated_jpeg(40, 24, 3)]
    exts = [".jpg", ".png", ".jpg", ".jpg"]
    calls: list[int] = []
    decoder = NvjpegDecoder(torch.device("cpu"), decode_jpeg=lambda blobs: calls.append(len(blobs)) or as_stored(blobs))
    out = decoder.decode([(d, inspect_bytes(d, e)) for d, e in zip(files, exts, strict=True)])
    assert calls == [3]  # the JPEGs in one batched call
    for got, data in zip(out, files, strict=True):
        assert np.array_equal(got.numpy(), decode_pillow(data))


def _app1(tiff: bytes) -> bytes:
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def test_orientation_parser_reads_both_byte_orders_and_treats_damage_as_none() -> None:
    big = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, 3, 1) + b"\x00\x08\x00\x00"
    little = b"II\x2a\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHI", 0x0112, 3, 1) + b"\x05\x00\x00\x00"
    xmp = b"\xff\xe1" + struct.pack(">H", 12) + b"http://ns.a"[:10]
    start, scan = b"\xff\xd8", b"\xff\xda\x00\x02"
    assert exif_orientation(start + _app1(big) + scan) == 8
    assert exif_orientation(start + xmp + _app1(little) + scan) == 5  # after another APP1 segment
    assert exif_orientation(jpeg_bytes(16, 16)) == 1  # no EXIF
    assert exif_orientation(start + _app1(big[:12]) + scan) == 1  # truncated IFD
    assert exif_orientation(start + _app1(big.replace(b"\x00\x08\x00\x00", b"\x00\x09\x00\x00")) + scan) == 1
    assert exif_orientation(start + scan + _app1(big)) == 1  # metadata after the scan is not read


def test_orientation_runs_on_any_device_tensor_layout() -> None:
    hwc = torch.arange(2 * 3 * 1).view(2, 3, 1)
    assert apply_orientation(hwc, 6).shape == (3, 2, 1) and apply_orientation(hwc, 1) is hwc
    assert torch.equal(apply_orientation(apply_orientation(hwc, 6), 8), hwc)  # 90 CW then 90 CCW


def test_reused_decoder_is_one_per_thread() -> None:
    import threading

    first = reused_decoder("pillow", torch.device("cpu"), 8, 1)
    assert reused_decoder("pillow", torch.device("cpu"), 8, 1) is first
    other: list = []
    t = threading.Thread(target=lambda: other.append(reused_decoder("pillow", torch.device("cpu"), 8, 1)))
    t.start()
    t.join()
    assert other[0] is not first


def test_a_reused_dali_decoder_builds_its_pipeline_once() -> None:
    pytest.importorskip("nvidia.dali")
    import threading

    data = [jpeg_bytes(32, 24, seed=s) for s in range(3)]
    items = [(d, inspect_bytes(d, ".jpg")) for d in data]
    pipes: list = []

    def two_tasks() -> None:  # what a Dask worker thread does for two shards in a row
        for _ in range(2):
            decoder = reused_decoder("dali", torch.device("cpu"), 4, 1)
            out = decoder.decode(items)
            assert all(np.array_equal(o.numpy(), decode_pillow(d)) for o, d in zip(out, data, strict=True))
            pipes.append(decoder._pipe)

    t = threading.Thread(target=two_tasks)
    t.start()
    t.join()
    assert len(pipes) == 2 and pipes[0] is not None and pipes[0] is pipes[1]
