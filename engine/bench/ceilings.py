"""What the machine can do at best, measured in the same run: GEMM rate, memory copy, decoding alone.

gemm: square matmuls, fp32 and bf16, GFLOP/s = 2 n^3 / s (on CPUs at torch's thread count; bf16 on a
CPU without native bf16 is emulated and slow: a ceiling of the hardware, not of vade). copy: a
large tensor copied, GB/s of bytes copied (read once and written once); on CUDA, device to device
and pinned host to device. decode: the scan's own decoder on the inputs' bytes already in memory,
one thread (the CPU loader's), images/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MIN_SECONDS = 0.3  # each measurement repeats until at least this long


def _repeat(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds per call of `fn`, after one warm-up call, over at least MIN_SECONDS (3 calls at least)."""
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < MIN_SECONDS:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - t0) / calls


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def gemm(device: torch.device, n: int | None = None) -> dict[str, float]:
    """GFLOP/s of an n x n matmul in fp32 and bf16 (TF32 off: an fp32 figure)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    out = {"n": n}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            seconds = _repeat(lambda a=a, b=b: torch.mm(a, b), _sync(device))
            out[f"{name}_gflops"] = round(2 * n**3 / seconds / 1e9, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def copy(device: torch.device, mib: int | None = None) -> dict[str, float]:
    """GB/s of a large copy (bytes copied per second): in memory, and on CUDA host -> device (pinned)."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    count = mib * 2**20 // 4
    src = torch.empty(count, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _repeat(lambda: dst.copy_(src), _sync(device))
    out = {"mib": mib, "memory_gb_s": round(count * 4 / seconds / 1e9, 2)}
    if device.type == "cuda":
        host = torch.empty(count, dtype=torch.float32, pin_memory=True).fill_(1.0)
        seconds = _repeat(lambda: dst.copy_(host, non_blocking=True), _sync(device))
        out["host_to_device_gb_s"] = round(count * 4 / seconds / 1e9, 2)
    return out


def decode(paths: Sequence[Path], device: torch.device, decoder_name: str = "auto", limit: int = 64) -> dict[str, Any]:
    """Images/s of the scan's decoder alone on the inputs' bytes (in memory), per file type, one thread."""
    from engine.inputs.decoders import make_decoder
    from engine.inputs.inspection import inspect_bytes
    from engine.inputs.settings import DEFAULT_MAX_PIXELS

    decoder = make_decoder(decoder_name, device, batch_size=32)
    out: dict[str, Any] = {"decoder": decoder.name}
    sync = _sync(device)
    for suffix in sorted({p.suffix.lower() for p in paths}):
        chosen = [p for p in paths if p.suffix.lower() == suffix][:limit]
        items = [(p.read_bytes(), None) for p in chosen]
        items = [(data, inspect_bytes(data, suffix, DEFAULT_MAX_PIXELS)) for data, _ in items]
        seconds = _repeat(lambda items=items: decoder.decode(items), sync)
        out[f"{suffix.lstrip('.')}_images_per_s"] = round(len(items) / seconds, 1)
    return out


def measure(paths: Sequence[Path], device: torch.device, decoder_name: str = "auto") -> dict[str, Any]:
    return {"gemm": gemm(device), "copy": copy(device), "decode": decode(paths, device, decoder_name)}
