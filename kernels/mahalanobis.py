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

TF32 operands are rounded to nearest (ties away, as cvt.rna.tf32.f32) in the kernel before the dot:
the tensor cores themselves truncate fp32 to TF32, and truncation biases every product low (~7e-4
relative on the distance at D = 100..550); rounded operands leave an unbiased error that averages
out over D. Tiles are a pure function of the shapes (`tile_config`), never autotuned, so every
process computes the same sums in the same order (bitwise-equal results across Dask workers).
"""

from __future__ import annotations

import torch

from kernels._checks import use_triton
from kernels._triton import Launch, cdiv, device_function, interpreting, run, tl

PRECISIONS = ("tf32", "fp32", "tf32x3")
FACTOR_POSITIONS = 256  # positions per float64 Cholesky block in precision_factor


@device_function
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), kept as fp32 bits.

    Integer arithmetic on the bit pattern, so the CPU interpreter runs it too: adding half of the
    13 dropped bits' unit and clearing them rounds the magnitude to nearest (sign bit untouched)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


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
            if PRECISION == "tf32":
                diff = _round_tf32(diff)
                w = _round_tf32(w)
            acc = tl.dot(diff, w, acc, input_precision=PRECISION)
        if TRIANGULAR:
            d2 += tl.sum(acc * acc, axis=1)
        else:
            ok = b_ok[:, None] & c_ok[None, :]
            mu = tl.load(mean_row + cols, mask=c_ok, other=0.0)
            diff_n = tl.where(ok, tl.load(x_row + cols[None, :], mask=ok, other=0.0) - mu[None, :], 0.0)
            d2 += tl.sum(diff_n * acc, axis=1)
    tl.store(out_ptr + b * n_pos + p, d2, mask=b_ok)


# Tiles chosen by `tile_config` from the mode alone; each compiles for sm_90 with wgmma and no spills
# at D = 176 and 550 (benchmarks/results/compile_sm90.json).
MAHALANOBIS_TILES = {
    "factor": {"BLOCK_B": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    # 3xTF32 and the full matrix hold more per column: narrower slabs (64 x 64 spilled 372 B at D = 550)
    "narrow": {"BLOCK_B": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    # IEEE fp32 on the CUDA cores, factor: more warps for the same slab
    "fp32 factor": {"BLOCK_B": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
}
INTERPRET_TILE = {"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def tile_config(triangular: bool, mode: str, interpreted: bool = False) -> dict:
    """The tile for a launch: a pure function of its arguments (never of timings or history)."""
    if interpreted:
        return dict(INTERPRET_TILE)
    if triangular and mode == "tf32":
        return dict(MAHALANOBIS_TILES["factor"])
    if triangular and mode == "fp32":
        return dict(MAHALANOBIS_TILES["fp32 factor"])
    return dict(MAHALANOBIS_TILES["narrow"])


def precision_factor(precision: torch.Tensor) -> torch.Tensor:
    """L[P, D, D] lower-triangular with precision[p] = L[p] L[p]^T (float64 Cholesky, float32 out).

    Make it once per model (it costs P * D^3 / 3) and pass it to `mahalanobis(..., factor=L)`.
    Factored FACTOR_POSITIONS positions at a time: the float64 copy stays small (WRN50: 4,096 x 550^2).
    """
    out = torch.empty(precision.shape, dtype=torch.float32, device=precision.device)
    for lo in range(0, precision.shape[0], FACTOR_POSITIONS):
        out[lo : lo + FACTOR_POSITIONS] = torch.linalg.cholesky(precision[lo : lo + FACTOR_POSITIONS].double())
    return out


def mahalanobis_launch(
    x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, out: torch.Tensor, triangular: bool, mode: str,
    interpreted: bool = False,
) -> Launch:  # fmt: skip
    """The launch over prepared operands: x [B, P, D] (unit last stride), mean [P, D], w [P, D, D]."""
    n_batch, n_pos, dim = x.shape
    tile = tile_config(triangular, mode, interpreted)
    warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
    return Launch(
        _mahalanobis_kernel, (n_pos, cdiv(n_batch, tile["BLOCK_B"])),
        (x, mean, w, out, n_batch, n_pos, dim, x.stride(0), x.stride(1), mean.stride(0), w.stride(0), w.stride(1)),
        dict(TRIANGULAR=triangular, PRECISION="ieee" if mode == "fp32" else mode, **tile), warps, stages,
    )  # fmt: skip


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
    xf = x.float()
    xf = xf if xf.stride(2) == 1 else xf.contiguous()
    mf = mean.float().contiguous()
    w = (factor if triangular else precision).float().contiguous()
    out = torch.empty(xf.shape[:2], dtype=torch.float32, device=x.device)
    run(mahalanobis_launch(xf, mf, w, out, triangular, mode, interpreting()))
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
