"""Shared argument checks for the kernel launchers."""

from __future__ import annotations

import torch

from kernels import BACKENDS


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the Triton path should run: asked for, or auto with every tensor on CUDA."""
    check_backend(backend)
    if backend == "triton":
        return True
    if backend == "torch":
        return False
    return all(t.is_cuda for t in tensors)


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
