"""Triton, imported on first use; kernels jitted on first use; launches described before they run.

Kernels are plain functions at module level (readable, importable without Triton); `jit_kernel`
imports Triton, binds `tl` in the kernel's module and wraps the function with triton.jit the first
time it runs. Importing `kernels.*` therefore never imports Triton: TRITON_INTERPRET=1 (the CPU
interpreter, for tests) must be set before Triton's import, because Triton fixes the mode of its own
library functions then, and this keeps that moment late.

A launcher first builds a `Launch` (kernel, grid, arguments, tile) from the shapes alone, then runs
it. The tile is a pure function of the shapes, never autotuned on timings: two processes (two Dask
workers, a scan and its resume) given the same shapes run the same tile, so the same reduction order
and bitwise-equal results. The same `Launch`, built on meta tensors, is what the sm_90 compile check
compiles (kernels/_compile.py, benchmarks/compile_sm90.py, tests/test_compile_sm90.py), so the
check covers exactly what the launchers can choose.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

tl: Any = None  # bound to triton.language in each kernel module by bind_tl

_JITTED: dict[Callable, Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `fn[grid](*args, **constexprs, num_warps=, num_stages=)`."""

    fn: Callable
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def config(self) -> dict[str, Any]:
        """The tile and the compile-time constants, as recorded by the compile check."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}


def device_function(fn: Callable) -> Callable:
    """Mark a helper that kernels call: `bind_tl` jits it in its module before the kernel compiles."""
    fn.__dict__["_vade_device_function"] = True
    return fn


def bind_tl(fn: Callable) -> Any:
    """Import Triton, bind `tl` in the module of `fn` and jit the module's device functions; returns
    the triton module."""
    try:
        import triton
        import triton.language
    except ImportError as exc:
        raise RuntimeError("the Triton backend needs the `triton` package; install it or use backend='torch'") from exc
    module = fn.__globals__
    module["tl"] = triton.language
    for name, value in list(module.items()):
        if callable(value) and getattr(value, "_vade_device_function", False):
            module[name] = triton.jit(value)
    return triton


def jit_kernel(fn: Callable) -> tuple[Any, bool]:
    """(launchable kernel for `fn`, whether it runs in the interpreter)."""
    if fn not in _JITTED:
        triton = bind_tl(fn)
        _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn], interpreting()


def on_device(*tensors: Any) -> contextlib.AbstractContextManager:
    """Make the tensors' CUDA device current for a launch (Triton launches on the current device:
    without this, tensors on cuda:1 would be handed to a kernel running on cuda:0)."""
    for t in tensors:
        if getattr(t, "is_cuda", False):
            import torch

            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def run(launch: Launch) -> None:
    """Run a launch on the device of its tensor arguments."""
    kernel, interpreted = jit_kernel(launch.fn)
    with on_device(*launch.args):
        if interpreted:
            kernel[launch.grid](*launch.args, **launch.constexprs)
        else:
            kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                num_stages=launch.num_stages)  # fmt: skip


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
