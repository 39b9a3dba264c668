"""Compile a kernel launch for a GPU this machine does not have, and read what ptxas says of it.

    compile_launch(launch, capability=90) -> {"status", "regs", "spill_stores", "spill_loads", "stack",
                                              "shared", "wgmma", "mma", "cp_async", "tma", "tf32_round", ...}

`launch` is what a launcher would run (kernels._triton.Launch): the kernel, its arguments and its tile.
The arguments may be meta tensors (shape, stride and dtype, no memory). They go through Triton's own
argument binder, the one a real launch uses, so the compiled kernel is specialised exactly as on the
GPU (a stride divisible by 16 is marked so, which decides whether loads are vectorised and pipelined
with cp.async). Then Triton compiles for GPUTarget("cuda", capability, 32) and the wheel's `ptxas -v`
reports registers, spills and stack; shared memory is Triton's own count.

Works with the Triton of the GPU machine (3.6, benchmarks/compile_sm90.py) and the project's own;
needs no CUDA driver. Never imported by the launchers.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from typing import Any

from kernels._triton import Launch, bind_tl

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _target(capability: int):  # noqa: ANN202 - triton's GPUTarget
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", capability, 32)


def _bind(jitted: Any, backend: Any, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) as JITFunction.run would make them for these arguments."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jitted.signature, jitted.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitted._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def ptxas_report(ptx: str, arch: str, ptxas: str) -> dict[str, Any]:
    """Registers, stack and spill bytes of the (single) kernel in `ptx`, from `ptxas -v`."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", src.name, "-o", "/dev/null"], capture_output=True, text=True, check=False
        )
    log = out.stdout + out.stderr
    if out.returncode != 0:
        return {"ptxas_error": log[-2000:]}
    regs, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(spill.group(1)) if spill else None,
        "spill_stores": int(spill.group(2)) if spill else None,
        "spill_loads": int(spill.group(3)) if spill else None,
    }


def compile_launch(launch: Launch, capability: int = 90) -> dict[str, Any]:
    """Compile `launch` for sm_<capability> and report; status "ok" or "error: ..." (never raises)."""
    import triton
    from triton.compiler import ASTSource, make_backend

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"kernel": launch.fn.__name__, **launch.config()}
    try:
        bind_tl(launch.fn)
        jitted = triton.jit(launch.fn)
        target = _target(capability)
        backend = make_backend(target)
        kwargs = {**launch.constexprs, "num_warps": launch.num_warps, "num_stages": launch.num_stages}
        signature, constexprs, attrs, options = _bind(jitted, backend, launch.args, kwargs)
        src = ASTSource(jitted, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the table
        rec.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        return rec
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    from triton.backends.nvidia.compiler import get_ptxas

    rec.update(ptxas_report(ptx, arch.group(1) if arch else f"sm_{capability}a", get_ptxas(capability).path))
    rec.update(
        status="ok" if "ptxas_error" not in rec else "error: ptxas",
        shared=int(compiled.metadata.shared),
        wgmma=ptx.count("wgmma.mma_async"),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        tma=ptx.count("cp.async.bulk.tensor"),
        int64_addressing=bool(re.search(r"mul\.wide\.[su]32|mul\.lo\.s64", ptx)),
        compile_s=round(time.perf_counter() - t0, 2),
    )
    return rec
