"""Triton, imported on first use, and kernels jitted on first use.

Kernels are plain functions at module level (readable, importable without Triton); `jit_kernel`
imports Triton, binds `tl` in the kernel's module and wraps the function with triton.jit (plus
autotune on a GPU) the first time it runs. Importing `kernels.*` therefore never imports Triton:
TRITON_INTERPRET=1 (the CPU interpreter, for tests) must be set before Triton's import, because
Triton fixes the mode of its own library functions then, and this keeps that moment late.
"""

from __future__ import annotations

import os
from typing import Any, Callable

tl: Any = None  # bound to triton.language in each kernel module by jit_kernel

_JITTED: dict[Callable, Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit_kernel(fn: Callable, configs: list[dict] | None, key: list[str] | None = None) -> tuple[Any, bool]:
    """(launchable kernel for `fn`, whether it runs in the interpreter).

    On a GPU with `configs`, the kernel is autotuned over them, keyed by `key`; the interpreter
    gets no autotuning (the launcher passes a small fixed tile instead).
    """
    try:
        import triton
        import triton.language
    except ImportError as exc:
        raise RuntimeError("the Triton backend needs the `triton` package; install it or use backend='torch'") from exc
    interpreted = interpreting()
    if fn not in _JITTED:
        fn.__globals__["tl"] = triton.language
        kernel = triton.jit(fn)
        if configs and not interpreted:
            kernel = triton.autotune(
                [
                    triton.Config(
                        {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                        num_warps=c.get("num_warps", 4),
                        num_stages=c.get("num_stages", 3),
                    )
                    for c in configs
                ],
                key=key or [],
            )(kernel)
        _JITTED[fn] = kernel
    return _JITTED[fn], interpreted
