"""The cases benchmarks/kernels.py runs: one function per op, each returning table records.

A record: case (sizes), variant, wall_s, cpu_s (process CPU time), rate (items/s), ceiling (the
same rate at the machine's limit: memory bandwidth or GEMM throughput measured in the same run),
of_ceiling (rate / ceiling), check (agreement with the reference), plus op-specific keys.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np
import torch

import kernels.coreset_cpu as coreset_cpu
from benchmarks._env import record as _rec
from kernels.coreset import greedy_kcenter_torch, greedy_kcenter_with_radius


def patch_like(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Synthetic rows shaped like projected patch features: a mixture of clusters of unequal weight
    in a 16-dim latent space (real bottle features: 10 directions hold ~87% of the variance),
    mapped into `dim` dimensions, plus a little isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    latent, n_clusters = 16, 200
    scales = 8.0 * 0.8 ** torch.arange(latent, dtype=torch.float32)
    weights = 1.0 / torch.arange(1, n_clusters + 1, dtype=torch.float32)  # a few dominant groups
    centres = torch.randn(n_clusters, latent, generator=gen) * scales
    spread = torch.rand(n_clusters, 1, generator=gen) * 0.3 + 0.05
    which = torch.multinomial(weights, rows, replacement=True, generator=gen)
    z = centres[which] + torch.randn(rows, latent, generator=gen) * scales * spread[which]
    basis = torch.linalg.qr(torch.randn(dim, latent, generator=gen))[0]  # orthonormal columns
    return (z @ basis.T + 0.05 * torch.randn(rows, dim, generator=gen)).contiguous()


def load_rows(path, rows: int) -> torch.Tensor:
    data = torch.from_numpy(np.load(path)).float()
    return data[:rows].contiguous()


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> tuple[Any, float, float]:
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the memory ceiling."""
    n = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _, wall, _ = timed(lambda: dst.copy_(src), sync)
        best = min(best, wall)
    return 2 * n * 4 / best


def coreset_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device
    rows = args.rows or (1_000_000 if device == "cuda" else 190_000)
    if args.quick:
        rows = min(rows, 300 if args.smoke else 20_000)
    picks = args.picks or max(1, rows // 10)
    x = load_rows(args.features, rows) if args.features else patch_like(rows, 128)
    source = str(args.features) if args.features else "patch_like synthetic"
    case = f"{x.shape[0]}x{x.shape[1]} -> {picks} ({source})"
    bandwidth = copy_bandwidth(device)
    brute_ceiling = bandwidth / (x.shape[0] * x.shape[1] * 4)  # picks/s if each pick reads x once
    records: list[dict[str, Any]] = []
    if device == "cpu" and not args.smoke:
        reference = _brute_force_record(x, picks, args.verify, case, brute_ceiling, records)
        default = coreset_cpu.DEFAULT_CANDIDATES
        variants = [(f"lazy exact, {c} candidates", c, None) for c in (2048, default, 8192)]
        variants.append((f"lazy exact, {default} candidates, refreshes on 2 threads", default, 2))
        for name, candidates, threads in variants:
            (idx, radius), wall, cpu = timed(
                lambda: coreset_cpu.greedy_kcenter_lazy(x, picks, candidates=candidates, threads=threads)
            )
            agree = int((idx[: len(reference)] == reference).cumprod(0).sum())
            check = f"first {agree} of {len(reference)} picks equal the brute force"
            records.append(_rec(case, name, wall, cpu, picks, radius=radius, check=check))
            args.on_progress(records)
        return records
    return _coreset_device(x.to(device), picks, case, brute_ceiling, device, args)


def _brute_force_record(x, picks, full, case, ceiling, records) -> torch.Tensor:
    """Brute force in full (--verify) or its first picks, extrapolated (its cost per pick is flat);
    returns the picks it made, the reference for the others."""
    probe = picks if full else min(picks, 300)
    idx, wall, cpu = timed(lambda: greedy_kcenter_torch(x, probe))
    scale = picks / probe
    rec = _rec(case, "brute force (reference)" + ("" if full else f", {probe} picks extrapolated"),
               wall * scale, cpu * scale, picks, ceiling=ceiling)
    records.append(rec)
    return idx


def _coreset_device(xg, picks, case, ceiling, device, args) -> list[dict[str, Any]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    records = []
    probe = min(picks, 2000)
    ref, wall, cpu = timed(lambda: greedy_kcenter_torch(xg, probe), sync)
    records.append(_rec(case, f"torch brute force, {probe} picks extrapolated", wall * picks / probe,
                        cpu * picks / probe, picks, ceiling=ceiling))
    args.on_progress(records)
    (idx, radius), wall, cpu = timed(lambda: greedy_kcenter_with_radius(xg, picks, backend="triton"), sync)
    agree = int((idx[:probe] == ref).cumprod(0).sum())
    records.append(_rec(case, "triton fused step", wall, cpu, picks, ceiling=ceiling, radius=radius,
                        check=f"first {agree} of {probe} picks equal torch"))
    return records


def knn_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.device == "cuda" or args.smoke:
        from benchmarks.kernels_cuda import knn_cuda_cases

        return knn_cuda_cases(args)
    return knn_cpu_cases(args)


def knn_cpu_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """PatchCore scoring on a CPU: 16 images x 1,024 patches against a ~19,000-row bank."""
    n_images = 2 if args.quick else 16
    if args.knn_data:
        data = np.load(args.knn_data)
        bank = torch.from_numpy(data["bank"]).float()
        near_name, far_name = data["labels"].tolist() if "labels" in data else ("normal images", "defect images")
        query_sets = {near_name: data["near"], far_name: data["far"]}
        query_sets = {k: torch.from_numpy(v[: n_images * 1024]).float() for k, v in query_sets.items()}
        source = str(args.knn_data)
    else:
        bank = patch_like(2_000 if args.quick else 19_000, 152, seed=1)
        gen = torch.Generator().manual_seed(2)
        rows = bank[torch.randint(bank.shape[0], (n_images * 1024,), generator=gen)]
        query_sets = {
            "near bank": rows + 0.3 * torch.randn(rows.shape, generator=gen),
            "far from bank": rows + 3.0 * torch.randn(rows.shape, generator=gen),
        }
        source = "patch_like synthetic"
    from kernels.knn import topk_torch
    from kernels.knn_index import KnnIndex

    if args.bank_sizes:
        return knn_small_bank_cases(bank, query_sets, source, args.bank_sizes)
    records = []
    (index, wall, cpu) = timed(lambda: KnnIndex.build(bank, seed=0))
    size = f"{n_images}x1024 x {bank.shape[0]} x {bank.shape[1]} ({source})"
    records.append(_rec(size, f"KnnIndex.build ({index.n_cells} cells)", wall, cpu, 1))
    q0 = next(iter(query_sets.values()))
    gemm_s = min(timed(lambda: q0 @ bank.T)[1] for _ in range(3))
    gemm_bf16_s = min(timed(lambda: q0.bfloat16() @ bank.bfloat16().T)[1] for _ in range(3))
    ceiling = n_images / gemm_s  # images/s of the fp32 GEMM alone: the brute force's ceiling
    records.append(_rec(size, "fp32 GEMM alone (brute-force ceiling)", gemm_s, gemm_s, n_images, ceiling))
    records.append(_rec(size, "bf16 GEMM alone", gemm_bf16_s, gemm_bf16_s, n_images, ceiling))
    for name, queries in query_sets.items():
        exact_d, exact_i = _float64_nn(queries, bank)
        (d, i), wall, cpu = timed(lambda: topk_torch(queries, bank, 1))
        records.append(_rec(f"{size}, {name}", "topk_torch k=1 (brute fp32)", wall, cpu, n_images, ceiling,
                            check=_nn_check(d, i, exact_d, exact_i)))
        (d, i), wall, cpu = timed(lambda: index.search(queries, 1))
        records.append(_rec(f"{size}, {name}", "KnnIndex.search k=1", wall, cpu, n_images, ceiling,
                            check=_nn_check(d, i, exact_d, exact_i)))
        few = queries[:: queries.shape[0] // 16][:16]  # the k = 9 reweighting: one row per image
        _, wall, cpu = timed(lambda: index.search(few, 9))
        records.append(_rec(f"{size}, {name}", "KnnIndex.search k=9, 16 rows", wall, cpu, n_images, ceiling))
    return records


def knn_small_bank_cases(bank: torch.Tensor, query_sets: dict[str, torch.Tensor], source: str,
                         sizes: list[int]) -> list[dict[str, Any]]:
    """KnnIndex.search k=1 on random subsets of the bank, through the cells and through the dense
    blocks, 1 thread (as in a scan): where DENSE_BANK_ROWS should sit."""
    from kernels import knn_index
    from kernels._threads import torch_threads

    records, gen = [], torch.Generator().manual_seed(0)
    real_rows = knn_index.DENSE_BANK_ROWS
    try:
        for m in sizes:
            sub = bank[torch.randperm(bank.shape[0], generator=gen)[:m]].contiguous()
            index = knn_index.KnnIndex.build(sub, seed=0)
            for name, queries in query_sets.items():
                exact_d, exact_i = _float64_nn(queries, sub)
                for path, rows in (("cells", 0), ("dense blocks", m)):
                    knn_index.DENSE_BANK_ROWS = rows
                    with torch_threads(1):
                        (d, i), wall, cpu = timed(lambda: index.search(queries, 1))
                    rec = _rec(f"{queries.shape[0]} x {m} x {sub.shape[1]} ({source}), {name}",
                               f"KnnIndex.search k=1, {path} ({index.n_cells} cells)", wall, cpu, queries.shape[0],
                               check=_nn_check(d, i, exact_d, exact_i))
                    rec["us_per_query"] = 1e6 * wall / queries.shape[0]
                    records.append(rec)
    finally:
        knn_index.DENSE_BANK_ROWS = real_rows
    return records


def _float64_nn(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [torch.cdist(queries[i : i + 2048].double(), bank.double()).min(1) for i in range(0, len(queries), 2048)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _nn_check(d, i, exact_d, exact_i) -> str:
    same = float((i[:, 0] == exact_i).double().mean())
    rel = float(((d[:, 0].double() - exact_d).abs() / exact_d.clamp_min(1e-6)).max())
    return f"nn index = float64 on {same:.4%}, max rel dist err {rel:.1e}"


def mahalanobis_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.kernels_cuda import mahalanobis_device_cases

    return mahalanobis_device_cases(args)
