"""Decoders behind one interface: inspected file bytes -> RGB uint8 (H, W, 3) tensors on one device.

`make_decoder("auto" | "dali" | "pillow" | "nvjpeg", device)`. auto = DALI where installed (CPU pipeline,
or "mixed" on CUDA), else torchvision's nvjpeg on CUDA, else Pillow. Files a decoder cannot read (formats
or modes outside its list, or a batch it fails on) are decoded by Pillow, which has the last word: its
error becomes the row's message. Files were already checked by engine.inputs.inspection.inspect_bytes, so the
verdict on a broken file does not depend on the decoder.

EXIF orientation is applied by every decoder. torchvision's CUDA decode_jpeg ignores it (its docs: CPU
only), so the nvjpeg decoder reads the orientation tag from the JPEG's bytes (`exif_orientation`) and
turns the decoded pixels on the GPU (`apply_orientation`, Pillow's exif_transpose for all 8 values).
`reused_decoder` keeps one decoder per thread, so a Dask worker builds its DALI pipeline once, not per task.
"""

from __future__ import annotations

import importlib.util
import struct
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from engine.errors import ConfigError, DecodeError
from engine.inputs.decode import decode_pillow, pixels_tensor
from engine.inputs.inspection import ImageInfo
from engine.inputs.settings import DECODERS

Item = tuple[bytes, ImageInfo]
Result = torch.Tensor | DecodeError


class Decoder(Protocol):
    name: str
    device: torch.device

    def decode(self, items: list[Item]) -> list[Result]: ...


def _pillow(data: bytes, device: torch.device) -> Result:
    try:
        return pixels_tensor(decode_pillow(data)).to(device)
    except DecodeError as exc:
        return exc


class PillowDecoder:
    """Pillow on the CPU; pixels are moved to `device` afterwards."""

    name = "pillow"

    def __init__(self, device: torch.device):
        self.device = device

    def decode(self, items: list[Item]) -> list[Result]:
        return [_pillow(data, self.device) for data, _ in items]


class DaliDecoder:
    """An NVIDIA DALI pipeline fed with file bytes: device="cpu" without CUDA, "mixed" with it."""

    name = "dali"
    # Only formats whose structure inspect_bytes verifies: DALI decodes some broken files without an
    # error (a truncated BMP, say) where Pillow refuses them. CMYK and 16-bit go to Pillow too, whose
    # conversion is the reference.
    formats = frozenset({"JPEG", "PNG"})
    modes = frozenset({"RGB", "L", "RGBA", "P"})

    def __init__(self, device: torch.device, batch_size: int, threads: int = 1):
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._pipe = None

    def _reads(self, data: bytes, info: ImageInfo) -> bool:
        # 16-bit PNGs: DALI rounds to 8 bits where Pillow truncates (1 level apart); Pillow keeps one answer.
        sixteen_bit_png = info.format == "PNG" and len(data) > 24 and data[24] == 16
        return info.format in self.formats and info.mode in self.modes and not sixteen_bit_png

    def _build(self):  # noqa: ANN202 - DALI's Pipeline type
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=(self.device.index or 0) if on_gpu else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def pipeline():  # noqa: ANN202
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, jpeg_fancy_upsampling=True
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run(self, blobs: list[bytes]) -> list[torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        (out,) = self._pipe.run()
        if self.device.type == "cuda":
            # DALI reuses its output buffers on the next run, so each image is copied out.
            return [torch.from_dlpack(out[i]).clone() for i in range(len(blobs))]
        return [torch.from_numpy(np.array(out.at(i))) for i in range(len(blobs))]

    def decode(self, items: list[Item]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        mine = [i for i, (data, info) in enumerate(items) if self._reads(data, info)]
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start : start + self.batch_size]
            try:
                for i, px in zip(chunk, self._run([items[i][0] for i in chunk]), strict=True):
                    results[i] = px
            except RuntimeError:
                self._pipe = None  # a DALI error leaves the pipeline unusable; Pillow decides these files
        return [r if r is not None else _pillow(items[i][0], self.device) for i, r in enumerate(results)]


ORIENTATION_TAG = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG's bytes; 1 where there is none or it cannot be read.

    Reads the APP1 "Exif" segment's first IFD (TIFF header, either byte order) without decoding anything;
    a malformed segment counts as no orientation, as Pillow's exif_transpose treats it."""
    pos, size = 2, len(data)
    while pos + 4 <= size and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(count):
            tag, kind, _n, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * entry)
            if tag == ORIENTATION_TAG:
                if kind != 3:  # SHORT
                    return 1
                (orientation,) = struct.unpack_from(order + "H", value)
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:
        return 1
    return 1


def apply_orientation(hwc: torch.Tensor, orientation: int) -> torch.Tensor:
    """Pixels (H, W, C) as they are stored -> as EXIF `orientation` says they are displayed, on any
    device (Pillow's ImageOps.exif_transpose)."""
    if orientation == 2:
        return hwc.flip(1)
    if orientation == 3:
        return hwc.flip(0).flip(1)
    if orientation == 4:
        return hwc.flip(0)
    if orientation == 5:
        return hwc.transpose(0, 1)
    if orientation == 6:
        return torch.rot90(hwc, -1, (0, 1))
    if orientation == 7:
        return hwc.flip(0).flip(1).transpose(0, 1)
    if orientation == 8:
        return torch.rot90(hwc, 1, (0, 1))
    return hwc


JpegBatchDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # 1-D uint8 streams -> (3, H, W) as stored


class NvjpegDecoder:
    """torchvision.io.decode_jpeg on CUDA (nvjpeg), one batched call per batch, for JPEGs; EXIF
    orientation applied on the GPU; everything else through Pillow.

    `decode_jpeg` replaces the nvjpeg call (a seam: tests pass a CPU decoder that ignores EXIF as
    nvjpeg does, and check the pixels against Pillow's)."""

    name = "nvjpeg"
    modes = frozenset({"RGB", "L"})

    def __init__(self, device: torch.device, decode_jpeg: JpegBatchDecoder | None = None):
        self.device = device
        if decode_jpeg is not None:
            self._decode = decode_jpeg
            return
        if device.type != "cuda":
            raise ConfigError("--decoder nvjpeg decodes on a GPU; use --device cuda, or --decoder pillow|dali on a CPU")
        try:
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_jpeg as tv_decode
        except ImportError as exc:
            raise ConfigError(
                "--decoder nvjpeg needs torchvision built for this torch (pip install torchvision); "
                "or use --decoder dali|pillow"
            ) from exc
        # apply_exif_orientation=False: on CUDA it is ignored today; saying so keeps one rotation (ours)
        # should a later torchvision start to apply it.
        self._decode = lambda blobs: tv_decode(
            blobs, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False
        )

    def decode(self, items: list[Item]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        mine = [i for i, (_, info) in enumerate(items) if info.format == "JPEG" and info.mode in self.modes]
        if mine:
            blobs = [torch.frombuffer(bytearray(items[i][0]), dtype=torch.uint8) for i in mine]
            try:
                decoded = self._decode(blobs)
                for i, chw in zip(mine, decoded, strict=True):
                    hwc = apply_orientation(chw.permute(1, 2, 0), exif_orientation(items[i][0]))
                    results[i] = hwc.contiguous()
            except RuntimeError:
                pass  # one bad stream fails the batch; Pillow decides these files
        return [r if r is not None else _pillow(items[i][0], self.device) for i, r in enumerate(results)]


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def check_decoder(name: str, device: str) -> None:
    """Refuse a decoder that cannot run for the requested device ("auto", "cpu", "cuda[:N]")."""
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    if name == "dali" and not dali_available():
        raise ConfigError("--decoder dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); or use --decoder pillow")
    if name == "nvjpeg":
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            raise ConfigError("--decoder nvjpeg decodes on a GPU; use --device cuda, or --decoder pillow|dali on a CPU")
        if not torchvision_available():
            raise ConfigError(
                "--decoder nvjpeg needs torchvision built for this torch (pip install torchvision); "
                "or use --decoder dali|pillow"
            )


_per_thread = threading.local()


def reused_decoder(name: str, device: torch.device, batch_size: int = 32, threads: int = 1) -> Decoder:
    """`make_decoder`'s decoder, made once per thread and kept: each Dask task of a worker thread reuses
    the decoder (and its built DALI pipeline, which is not thread-safe) of the task before it."""
    cache: dict = _per_thread.__dict__.setdefault("decoders", {})
    key = (name, str(device), batch_size, threads)
    if key not in cache:
        cache[key] = make_decoder(name, device, batch_size, threads)
    return cache[key]


def make_decoder(name: str, device: torch.device, batch_size: int = 32, threads: int = 1) -> Decoder:
    """The decoder called `name` for `device`; raises ConfigError when it cannot run here."""
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    if name == "auto":
        if dali_available():
            name = "dali"
        elif device.type == "cuda" and torchvision_available():
            name = "nvjpeg"
        else:
            name = "pillow"
    if name == "dali":
        if not dali_available():
            raise ConfigError("--decoder dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); or use --decoder pillow")
        return DaliDecoder(device, batch_size, threads)
    if name == "nvjpeg":
        return NvjpegDecoder(device)
    # Pillow pixels stay on the CPU: they are resized there and the batch is moved to the device once.
    return PillowDecoder(torch.device("cpu"))
