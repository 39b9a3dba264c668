"""Per-position Mahalanobis distance.

    mahalanobis(x[B, P, D], mean[P, D], precision[P, D, D]) -> dist[B, P] float32

dist[b, p] = sqrt((x[b,p] - mean[p])^T precision[p] (x[b,p] - mean[p])), not squared.

With a Cholesky factor of the precision, precision[p] = L_p L_p^T (L lower-triangular, made once
per model by `precision_factor`), the square is a sum of squares

    d2[b, p] = || (x[b,p] - mean[p])^T L_p ||^2

Triton (CUDA): one program per (position p, block of BLOCK_B images). It forms the centred rows
diff = x - mean on the fly, multiplies them by L_p on the tensor cores in [BLOCK_N]-column slabs
(TF32 operands, fp32 accumulation; only the k >= n blocks, L being triangular) and reduces each
slab's squares into d2, so neither diff nor diff @ L is written out. L_p is read once per block of
images, so large batches amortise it. Without a factor the kernel multiplies by the precision
itself and takes sum(diff * (diff @ precision)) with 3xTF32 operands (fp32-grade products: that
sum cancels, a sum of squares does not). Accuracy against float64: tests and device benchmark.
"""

from __future__ import annotations

import torch

from kernels._checks import use_triton
from kernels._triton import jit_kernel, tl

PRECISIONS = ("tf32", "fp32", "tf32x3")


def _mahalanobis_kernel(
    x_ptr, mean_ptr, w_ptr, out_ptr, n_batch, n_pos, dim,
    stride_xb, stride_xp, stride_mp, stride_wp, stride_wr,
    TRIANGULAR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """d2[b, p] = ||diff @ L||^2 (TRIANGULAR, w = L) or sum(diff * (diff @ precision)) (w = P)."""
    p = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_batch
    x_row = x_ptr + b[:, None].to(tl.int64) * stride_xb + p * stride_xp
    mean_row = mean_ptr + p * stride_mp
    w_pos = w_ptr + p * stride_wp
    d2 = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, dim, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < dim
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        k_start = 0
        if TRIANGULAR:
            k_start = (n0 // BLOCK_K) * BLOCK_K  # L[k, n] = 0 for k < n: skip those blocks
        for k0 in range(k_start, dim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < dim
            ok = b_ok[:, None] & k_ok[None, :]
            mu = tl.load(mean_row + kk, mask=k_ok, other=0.0)
            diff = tl.where(ok, tl.load(x_row + kk[None, :], mask=ok, other=0.0) - mu[None, :], 0.0)
            w_ok = k_ok[:, None] & c_ok[None, :]
            w = tl.load(w_pos + kk[:, None] * stride_wr + cols[None, :], mask=w_ok, other=0.0)
            acc = tl.dot(diff, w, acc, input_precision=PRECISION)
        if TRIANGULAR:
            d2 += tl.sum(acc * acc, axis=1)
        else:
            ok = b_ok[:, None] & c_ok[None, :]
            mu = tl.load(mean_row + cols, mask=c_ok, other=0.0)
            diff_n = tl.where(ok, tl.load(x_row + cols[None, :], mask=ok, other=0.0) - mu[None, :], 0.0)
            d2 += tl.sum(diff_n * acc, axis=1)
    tl.store(out_ptr + b * n_pos + p, d2, mask=b_ok)


MAHALANOBIS_CONFIGS = [
    {"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bb, bn, bk, w, s in [
        (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3), (32, 64, 64, 4, 3), (128, 64, 64, 8, 2),
    ]
]  # fmt: skip
INTERPRET_CONFIG = {"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def precision_factor(precision: torch.Tensor) -> torch.Tensor:
    """L[P, D, D] lower-triangular with precision[p] = L[p] L[p]^T (float64 Cholesky, float32 out).

    Make it once per model (it costs P * D^3 / 3) and pass it to `mahalanobis(..., factor=L)`.
    """
    return torch.linalg.cholesky(precision.double()).float().contiguous()


def mahalanobis_triton(
    x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, factor: torch.Tensor | None = None,
    mode: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """The fused kernel (CUDA, or CPU under TRITON_INTERPRET=1); mode: input precision of tl.dot."""
    _check(x, mean, precision)
    triangular = factor is not None
    mode = mode or ("tf32" if triangular else "tf32x3")
    if mode not in PRECISIONS:
        raise ValueError(f"mode must be one of {PRECISIONS}, got {mode!r}")
    kernel, interpreted = jit_kernel(_mahalanobis_kernel, MAHALANOBIS_CONFIGS, key=["dim", "TRIANGULAR", "PRECISION"])
    xf = x.float()
    xf = xf if xf.stride(2) == 1 else xf.contiguous()
    mf = mean.float().contiguous()
    w = (factor if triangular else precision).float().contiguous()
    n_batch, n_pos, dim = xf.shape
    out = torch.empty((n_batch, n_pos), dtype=torch.float32, device=x.device)
    grid = lambda meta: (n_pos, -(-n_batch // meta["BLOCK_B"]))  # noqa: E731
    extra = INTERPRET_CONFIG if interpreted else {}
    kernel[grid](
        xf, mf, w, out, n_batch, n_pos, dim, xf.stride(0), xf.stride(1), mf.stride(0), w.stride(0), w.stride(1),
        TRIANGULAR=triangular, PRECISION="ieee" if mode == "fp32" else mode, **extra,
    )  # fmt: skip
    return out.clamp_min_(0).sqrt_()


def _check(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> None:
    if x.dim() != 3 or mean.dim() != 2 or precision.dim() != 3:
        raise ValueError(
            f"expected x[B,P,D], mean[P,D], precision[P,D,D]; got {tuple(x.shape)}, "
            f"{tuple(mean.shape)}, {tuple(precision.shape)}"
        )
    b, p, d = x.shape
    if mean.shape != (p, d) or precision.shape != (p, d, d):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)} needs mean ({p}, {d}) and precision ({p}, {d}, {d}), "
            f"got {tuple(mean.shape)} and {tuple(precision.shape)}"
        )


def mahalanobis_torch(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Batched matmul per position: (P, B, D) @ (P, D, D), then a row-wise dot."""
    _check(x, mean, precision)
    diff = (x.float() - mean.float()).transpose(0, 1)  # (P, B, D)
    proj = torch.bmm(diff, precision.float())  # (P, B, D)
    d2 = (proj * diff).sum(dim=2).transpose(0, 1)  # (B, P)
    return d2.clamp_min_(0).sqrt_().contiguous()


def mahalanobis(
    x: torch.Tensor,
    mean: torch.Tensor,
    precision: torch.Tensor,
    *,
    backend: str = "auto",
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mahalanobis distance of every (image, position) feature to that position's Gaussian.

    factor: `precision_factor(precision)`, made once per model; used by the Triton path.
    """
    if use_triton(backend, x, mean, precision):
        return mahalanobis_triton(x, mean, precision, factor)
    return mahalanobis_torch(x, mean, precision)
