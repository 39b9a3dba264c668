"""Top-k nearest neighbours by Euclidean distance.

    topk(queries[Q, D], bank[M, D], k) -> (dist[Q, k] float32 ascending, idx[Q, k] int64)

dist is the Euclidean (not squared) distance. Squared distances are expanded as

    ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2

so the work is one GEMM; ||b||^2 (`bank_sq_norms`) is computed once per bank, and ||q||^2 does not
change a query's ranking, so it is added only to the k survivors.

Triton (CUDA): one fused kernel streams bank tiles [BLOCK_M, D] through the tensor cores against a
query tile [BLOCK_Q, D], turns the [BLOCK_Q, BLOCK_M] dot tile into partial distances and merges
it into a running top-k held in registers; the Q x M distance matrix is never written. k = 1 is a
row-min; for k > 1 each tile inserts its minimum into the row's list (replacing the list maximum)
while it beats the list maximum, so a tile that cannot improve any row costs one row-min. When Q
alone cannot fill the GPU the bank is split over a second grid axis and the splits' lists merged.
Operand precision (`precision=`):

    "fp32"  IEEE fp32 dot (CUDA cores; the slow truth)     "tf32"  TF32 tensor cores
    "bf16" / "fp16"  half-width operands, fp32 accumulation (approximate ranking and distances)
    "exact" (default) a bf16 pass keeps `candidates` (2k + 8) per query, then a second kernel
            recomputes those candidates' distances directly as sum((q - b)^2) in fp32 and keeps
            the k best: indices and distances of the fp32 truth unless more than 2k + 8 bank rows
            tie within bf16 rounding of the k-th.

A bank that stays in host memory (CPU tensor, CUDA queries) is streamed to the GPU in chunks
through pinned buffers, the next chunk's copy overlapping the current chunk's kernel, and the
chunks' top-k lists merged (kernels/knn_stream.py). The CPU path for large banks is the exact index
in kernels/knn_index.py; the torch reference below is the plain chunked GEMM.
"""

from __future__ import annotations

import torch

from kernels._checks import check_2d, use_triton
from kernels._triton import jit_kernel, tl
from kernels.knn_stream import topk_streamed

# Bank rows per chunk in the torch path: bounds the Q x chunk block held at once.
TORCH_BANK_CHUNK = 16384
PRECISIONS = ("exact", "fp32", "tf32", "bf16", "fp16")
MAX_K = 64  # the running list lives in registers
MIN_SPLIT_ROWS = 1024  # bank rows per split at least (tests lower it to exercise the merge)


def _knn_tile_kernel(
    q_ptr, b_ptr, bn_ptr, out_d_ptr, out_i_ptr,
    n_q, n_bank, dim, rows_per_split, stride_q, stride_b,
    K: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Running top-K of ||b||^2 - 2 q.b over bank rows [split * rows_per_split, +rows_per_split)."""
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_q
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, n_bank)
    slots = tl.arange(0, K_PAD)
    # Padding slots hold -inf so they are never the list maximum that an insertion replaces.
    best_d = tl.where(slots[None, :] < K, float("inf"), float("-inf")) + tl.zeros([BLOCK_Q, K_PAD], tl.float32)
    best_i = tl.zeros([BLOCK_Q, K_PAD], tl.int32) - 1
    tile_cols = tl.arange(0, BLOCK_M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + tile_cols
        col_ok = cols < m_hi
        acc = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            d_ok = dk < dim
            a = tl.load(q_ptr + rows[:, None] * stride_q + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_b + dk[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if PRECISION == "ieee" or PRECISION == "tf32":
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc)
        norms = tl.load(bn_ptr + cols, mask=col_ok, other=0.0)
        d2 = tl.where(col_ok[None, :], norms[None, :] - 2.0 * acc, float("inf"))
        if K == 1:
            cand, pos = tl.min(d2, axis=1, return_indices=True)
            better = cand < tl.max(best_d, axis=1)
            best_d = tl.where(better[:, None], cand[:, None], best_d)
            best_i = tl.where(better[:, None], (m0 + pos)[:, None], best_i)
        else:
            worst, worst_at = tl.max(best_d, axis=1, return_indices=True)
            cand, pos = tl.min(d2, axis=1, return_indices=True)
            better = cand < worst
            rounds = 0
            while (tl.max(better.to(tl.int32), axis=0) > 0) & (rounds < K):
                put = better[:, None] & (slots[None, :] == worst_at[:, None])
                best_d = tl.where(put, cand[:, None], best_d)
                best_i = tl.where(put, (m0 + pos)[:, None], best_i)
                d2 = tl.where(tile_cols[None, :] == pos[:, None], float("inf"), d2)
                worst, worst_at = tl.max(best_d, axis=1, return_indices=True)
                cand, pos = tl.min(d2, axis=1, return_indices=True)
                better = cand < worst
                rounds += 1
    out = (split * n_q + rows)[:, None] * K + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < K)
    tl.store(out_d_ptr + out, best_d, mask=keep)
    tl.store(out_i_ptr + out, best_i, mask=keep)


def _rerank_kernel(
    q_ptr, b_ptr, cand_ptr, out_ptr, n_q, dim, n_cand, stride_q, stride_b,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[q, c] = sum_d (q[d] - bank[cand[q, c], d])^2 in fp32, summed directly (no expansion)."""
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_q
    for c in range(0, n_cand):
        idx = tl.load(cand_ptr + rows * n_cand + c, mask=row_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_Q], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (dk < dim)[None, :]
            a = tl.load(q_ptr + rows[:, None] * stride_q + dk[None, :], mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + idx[:, None] * stride_b + dk[None, :], mask=ok, other=0.0).to(tl.float32)
            diff = a - b
            acc += tl.sum(diff * diff, axis=1)
        tl.store(out_ptr + rows * n_cand + c, acc, mask=row_ok)


# Hopper-sized tiles; the interpreter (CPU tests) gets the smallest that tl.dot accepts.
KNN_CONFIGS = [
    {"BLOCK_Q": bq, "BLOCK_M": bm, "BLOCK_D": bd, "num_warps": w, "num_stages": s}
    for bq, bm, bd, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 32, 8, 3)]
]
INTERPRET_CONFIG = {"BLOCK_Q": 16, "BLOCK_M": 32, "BLOCK_D": 64}


def _tile_pass(q: torch.Tensor, bank: torch.Tensor, norms: torch.Tensor, k: int, precision: str):
    """Launch the tile kernel: (partial squared distance without ||q||^2 [Q, k], index [Q, k])."""
    n_q, dim = q.shape
    n_bank = bank.shape[0]
    # Tuned per (K, precision); D is left out of the key so two feature widths share one tuning.
    kernel, interpreted = jit_kernel(_knn_tile_kernel, KNN_CONFIGS, key=["K", "PRECISION"])
    # Split the bank when the query blocks alone leave SMs idle (a few images against a big bank).
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    q_blocks = -(-n_q // 128)
    splits = max(1, min(-(-2 * sms // q_blocks), -(-n_bank // MIN_SPLIT_ROWS)))
    rows_per_split = -(-n_bank // splits)
    out_d = torch.empty((splits, n_q, k), dtype=torch.float32, device=q.device)
    out_i = torch.empty((splits, n_q, k), dtype=torch.int32, device=q.device)
    mode = {"fp32": "ieee", "tf32": "tf32"}.get(precision, "lowp")
    grid = lambda meta: (triton_cdiv(n_q, meta["BLOCK_Q"]), splits)  # noqa: E731
    extra = INTERPRET_CONFIG if interpreted else {}
    kernel[grid](
        q, bank, norms, out_d, out_i, n_q, n_bank, dim, rows_per_split, q.stride(0), bank.stride(0),
        K=k, K_PAD=max(2, 1 << (k - 1).bit_length()), PRECISION=mode, **extra,
    )  # fmt: skip
    # Lists come back unsorted (insertion replaces the maximum): sort, merging the splits.
    d = out_d.permute(1, 0, 2).reshape(n_q, splits * k)
    i = out_i.permute(1, 0, 2).reshape(n_q, splits * k)
    d, pos = torch.topk(d, k, dim=1, largest=False)
    return d, i.gather(1, pos).long()


def _rerank(q: torch.Tensor, bank: torch.Tensor, cand: torch.Tensor, k: int):
    kernel, interpreted = jit_kernel(_rerank_kernel, None)
    n_q, n_cand = cand.shape
    exact = torch.empty((n_q, n_cand), dtype=torch.float32, device=q.device)
    block_q = 16 if interpreted else 64
    cand = cand.to(torch.int32).contiguous()
    kernel[(triton_cdiv(n_q, block_q),)](
        q, bank, cand, exact, n_q, q.shape[1], n_cand, q.stride(0), bank.stride(0), BLOCK_Q=block_q, BLOCK_D=64
    )
    d, pos = torch.topk(exact, k, dim=1, largest=False)
    return d.sqrt_(), cand.gather(1, pos).long()


def topk_triton(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    bank_sq_norms: torch.Tensor | None = None,
    *,
    precision: str = "exact",
    candidates: int | None = None,
    bank_lowp: torch.Tensor | None = None,
    candidate_precision: str = "bf16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel(s) on tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    candidate_precision: operands of the exact mode's first pass, "bf16" or "fp16" (the CPU
    interpreter mishandles bf16 in tl.dot, so interpreter tests of the exact mode use fp16).
    """
    _check(queries, bank, k)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n_keep = min(candidates or 2 * k + 8, bank.shape[0]) if precision == "exact" else k
    if n_keep > MAX_K:
        raise ValueError(f"k (with exact-mode candidates) must be at most {MAX_K}, got {n_keep}")
    norms = (sq_norms(bank) if bank_sq_norms is None else bank_sq_norms).float().contiguous()
    if precision in ("fp32", "tf32"):
        q, b = queries.float().contiguous(), bank.float().contiguous()
    else:
        lowp = candidate_precision if precision == "exact" else precision
        half = torch.float16 if lowp == "fp16" else torch.bfloat16
        q = queries.to(half).contiguous()
        b = bank_lowp if bank_lowp is not None and bank_lowp.dtype == half else bank.to(half)
        b = b.contiguous()
    d, i = _tile_pass(q, b, norms, n_keep, precision)
    if precision == "exact":
        return _rerank(queries.float().contiguous(), bank.float().contiguous(), i, k)
    d = d + queries.float().pow(2).sum(1, keepdim=True)
    return d.clamp_min_(0).sqrt_(), i


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(queries: torch.Tensor, bank: torch.Tensor, k: int) -> None:
    check_2d("queries", queries)
    check_2d("bank", bank)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but bank rows have {bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("bank is empty")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, bank rows = {bank.shape[0]}], got {k}")


def sq_norms(bank: torch.Tensor) -> torch.Tensor:
    """Row squared norms in float32; compute once per bank and pass as `bank_sq_norms`."""
    return bank.float().pow(2).sum(dim=1)


def topk_torch(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_sq_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: chunked GEMM + topk, merged across chunks."""
    _check(queries, bank, k)
    q = queries.float()
    q_norms = q.pow(2).sum(dim=1, keepdim=True)
    norms = sq_norms(bank) if bank_sq_norms is None else bank_sq_norms.float()
    best_d = best_i = None
    for start in range(0, bank.shape[0], TORCH_BANK_CHUNK):
        chunk = bank[start : start + TORCH_BANK_CHUNK].float()
        d2 = torch.addmm(q_norms + norms[start : start + chunk.shape[0]], q, chunk.T, alpha=-2.0)
        kk = min(k, chunk.shape[0])
        d, i = torch.topk(d2, kk, dim=1, largest=False)
        i = i + start
        if best_d is not None:
            d, pos = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + kk), dim=1, largest=False)
            i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
        best_d, best_i = d, i
    assert best_d is not None and best_i is not None
    return best_d.clamp_min_(0).sqrt_(), best_i.long()


def topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    bank_sq_norms: torch.Tensor | None = None,
    backend: str = "auto",
    precision: str = "exact",
    bank_lowp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows of each query: (distances ascending float32, indices int64).

    Triton when asked or when queries are on CUDA (auto); a CPU bank with CUDA queries is streamed.
    `precision` and `bank_lowp` (a bf16/fp16 copy of the bank made once) apply to Triton only.
    """
    if use_triton(backend, queries):
        if queries.is_cuda and not bank.is_cuda:
            _check(queries, bank, k)
            return topk_streamed(queries, bank, k, topk_triton, bank_sq_norms, precision=precision)
        return topk_triton(queries, bank, k, bank_sq_norms, precision=precision, bank_lowp=bank_lowp)
    return topk_torch(queries, bank, k, bank_sq_norms)
