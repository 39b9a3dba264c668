"""Decoders behind one interface: inspected file bytes -> RGB uint8 (H, W, 3) tensors on one device.

`make_decoder("auto" | "dali" | "pillow" | "nvjpeg", device)`. auto = DALI where installed (CPU pipeline,
or "mixed" on CUDA), else torchvision's nvjpeg on CUDA, else Pillow. Files a decoder cannot read (formats
or modes outside its list, or a batch it fails on) are decoded by Pillow, which has the last word: its
error becomes the row's message. Files were already checked by engine.inputs.inspection.inspect_bytes, so the
verdict on a broken file does not depend on the decoder.
"""

from __future__ import annotations

import importlib.util
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


class NvjpegDecoder:
    """torchvision.io.decode_jpeg on CUDA (nvjpeg) for JPEGs; everything else through Pillow."""

    name = "nvjpeg"
    modes = frozenset({"RGB", "L"})

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ConfigError("--decoder nvjpeg decodes on a GPU; use --device cuda, or --decoder pillow|dali on a CPU")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as exc:
            raise ConfigError(
                "--decoder nvjpeg needs torchvision built for this torch (pip install torchvision); "
                "or use --decoder dali|pillow"
            ) from exc
        self.device = device
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB

    def decode(self, items: list[Item]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        mine = [i for i, (_, info) in enumerate(items) if info.format == "JPEG" and info.mode in self.modes]
        if mine:
            blobs = [torch.from_numpy(np.frombuffer(items[i][0], dtype=np.uint8).copy()) for i in mine]
            try:
                decoded = self._decode_jpeg(blobs, mode=self._rgb, device=self.device, apply_exif_orientation=True)
                for i, chw in zip(mine, decoded, strict=True):
                    results[i] = chw.permute(1, 2, 0).contiguous()
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
