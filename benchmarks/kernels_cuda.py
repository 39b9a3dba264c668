"""GPU cases for benchmarks/kernels.py: the fused kernels beside cuBLAS and the peers' torch ways.

kNN: Q = 64 images x 1,024 patches; D = 1,536 / 1,024; M = 16,384 / 131,072 / 1,048,576.
Baselines that would materialise Q x M (cuBLAS GEMM alone, bf16 matmul + min, torch.cdist fp32)
are timed on one 16,384-row bank chunk and scaled by M / 16,384 (their cost is linear in M).
Each (D, M) also checks the fused modes against a float64 brute force on 256 queries.
With --quick --device cpu and TRITON_INTERPRET=1 the same code runs at toy sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

from benchmarks._env import record as _rec
from kernels import knn
from kernels.mahalanobis import mahalanobis_torch, mahalanobis_triton, precision_factor

CHUNK = 16_384  # bank rows per materialised block in the baselines


def device_time(fn: Callable[[], Any], device: str, reps: int = 3) -> float:
    """Median seconds of `reps` runs after one warm-up (which also compiles)."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _queries_near(bank: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """3/4 of the queries near a bank row (normal patches), 1/4 anywhere (anomalies)."""
    src = bank[torch.randint(bank.shape[0], (n,), generator=gen, device="cpu").to(bank.device)]
    noise = torch.randn(src.shape, generator=gen, device="cpu").to(bank.device)
    near = n * 3 // 4
    return torch.cat([src[:near] + 0.3 * noise[:near], noise[near:] * bank.std()])


def _float64_topk(q: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    best_d = best_i = None
    for lo in range(0, bank.shape[0], 65_536):
        d = torch.cdist(q.double(), bank[lo : lo + 65_536].double())
        d, i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
        i = i + lo
        if best_d is not None:
            d, pos = torch.topk(torch.cat([best_d, d], 1), k, dim=1, largest=False)
            i = torch.cat([best_i, i], 1).gather(1, pos)
        best_d, best_i = d, i
    return best_d, best_i


def _agreement(d: torch.Tensor, i: torch.Tensor, ref_d: torch.Tensor, ref_i: torch.Tensor) -> str:
    same = float((i == ref_i).double().mean())
    rel = float(((d.double() - ref_d).abs() / ref_d.clamp_min(1e-9)).max())
    return f"idx = float64 on {same:.2%}, max rel dist err {rel:.1e}"


def knn_cuda_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    if args.quick:
        n_images, dims, banks, patches = 1, [20], [100, 300], 64
    else:
        n_images, dims, banks, patches = 64, [1536, 1024], [16_384, 131_072, 1_048_576], 1024
    torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" baselines are fp32
    gen = torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []
    for dim in dims:
        for n_bank in banks:
            bank = torch.randn(n_bank, dim, generator=gen).to(device)
            q = _queries_near(bank, n_images * patches, gen)
            norms = knn.sq_norms(bank)
            bank16 = bank.bfloat16()
            case = f"Q={n_images}x{patches} D={dim} M={n_bank}"
            chunk = bank[:CHUNK]
            scale = n_bank / chunk.shape[0]
            q16, chunk16 = q.bfloat16(), bank16[:CHUNK]
            gemm = device_time(lambda: q16 @ chunk16.T, device) * scale
            ceiling = n_images / gemm
            records.append(_rec(case, "cuBLAS bf16 GEMM alone (ceiling)", gemm, 0.0, n_images, ceiling))
            t = device_time(lambda: (norms[:CHUNK] - 2 * (q16 @ chunk16.T).float()).min(1), device) * scale
            records.append(_rec(case, "torch bf16 matmul + min", t, 0.0, n_images, ceiling))
            t = device_time(lambda: torch.cdist(q, chunk).min(1), device) * scale
            records.append(_rec(case, "torch.cdist fp32 + min (peers)", t, 0.0, n_images, ceiling))
            ref_q = q[:256]
            ref1 = _float64_topk(ref_q, bank, 1)
            ref9 = _float64_topk(ref_q, bank, 9)
            modes = [("bf16", 1), ("exact", 1), ("exact", 9)]
            if n_bank != banks[-1]:
                modes.append(("bf16", 9))
            if n_bank == banks[0] and dim == dims[0]:
                modes += [("tf32", 1), ("fp32", 1)]
            reps = 2 if n_bank == banks[-1] else 3
            for precision, k in modes:
                run = lambda: knn.topk_triton(q, bank, k, norms, precision=precision, bank_lowp=bank16)  # noqa: E731
                t = device_time(run, device, reps)
                d, i = knn.topk_triton(ref_q, bank, k, norms, precision=precision, bank_lowp=bank16)
                ref_d, ref_i = ref1 if k == 1 else ref9
                records.append(_rec(case, f"fused {precision} k={k}", t, 0.0, n_images, ceiling,
                                    check=_agreement(d, i, ref_d, ref_i)))
            if device == "cuda" and n_bank == banks[-1] and dim == dims[-1]:
                host_bank = bank.cpu().pin_memory()
                t = device_time(lambda: knn.topk(q, host_bank, 1, backend="triton"), device, reps=1)
                d, i = knn.topk(ref_q, host_bank, 1, backend="triton")
                records.append(_rec(case, "fused exact k=1, bank streamed from pinned host memory", t, 0.0,
                                    n_images, ceiling, check=_agreement(d, i, *ref1)))
                del host_bank
            print(f"  done {case}", flush=True)
            args.on_progress(records)
            del bank, q, bank16, chunk16, q16
            if device == "cuda":
                torch.cuda.empty_cache()
    return records


def mahalanobis_device_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    if args.quick:
        batch, shapes = 4, [(16, 20)]
    else:
        batch, shapes = (128 if device == "cuda" else 8), [(3136, 550), (1024, 100)]
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    records = []
    for positions, dim in shapes:
        case = f"B={batch} P={positions} D={dim}"
        mean = torch.randn(positions, dim, generator=gen).to(device)
        x = (mean + torch.randn(batch, positions, dim, generator=gen).to(device)).contiguous()
        precision = _random_precision(positions, dim, gen, device)
        factor = precision_factor(precision)
        t_ref = device_time(lambda: mahalanobis_torch(x, mean, precision), device)
        ceiling = batch / t_ref
        records.append(_rec(case, "torch fp32 batched matmul", t_ref, 0.0, batch, ceiling))
        sub = slice(0, min(positions, 64))
        diff = x[:, sub].double() - mean[sub].double()
        exact = torch.einsum("bpi,pij,bpj->bp", diff, precision[sub].double(), diff).sqrt()
        if device == "cuda" or args.quick:
            for name, run in (
                ("fused tf32, Cholesky factor", lambda: mahalanobis_triton(x, mean, precision, factor)),
                ("fused 3xtf32, precision as given", lambda: mahalanobis_triton(x, mean, precision)),
                ("fused fp32 (ieee), Cholesky factor", lambda: mahalanobis_triton(x, mean, precision, factor, "fp32")),
            ):
                t = device_time(run, device)
                got = run()[:, sub].double()
                rel = float(((got - exact).abs() / exact).max())
                records.append(_rec(case, name, t, 0.0, batch, ceiling, check=f"max rel err vs float64 {rel:.1e}"))
        args.on_progress(records)
        del x, precision, factor
    return records


def _random_precision(positions: int, dim: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """PaDiM-like: inverse of (sample covariance of 2*dim draws + 0.01 I), per position."""
    out = torch.empty(positions, dim, dim, device=device)
    for lo in range(0, positions, 256):
        n = min(256, positions - lo)
        a = torch.randn(n, 2 * dim, dim, generator=gen).to(device)
        cov = a.transpose(1, 2) @ a / (2 * dim) + 0.01 * torch.eye(dim, device=device)
        out[lo : lo + n] = torch.linalg.inv(cov.double()).float()
    return out
