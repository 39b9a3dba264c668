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
    "exact" (default) a bf16 pass keeps `candidates` (min(2k + 8, MAX_K)) per query, then a
            second kernel recomputes those candidates' distances directly as sum((q - b)^2) in fp32
            and keeps the k best: indices and distances of the fp32 truth unless more bank rows
            than the spare candidates tie within bf16 rounding of the k-th.

A bank that stays in host memory (CPU tensor, CUDA queries) is streamed to the GPU in chunks
through pinned buffers, the next chunk's copy overlapping the current chunk's kernel, and the
chunks' top-k lists merged (kernels/knn_stream.py); a bank already in pinned memory is copied straight
from there.

Tiles are a pure function of the shapes (`tile_config`), never autotuned: every process picks the same
tile for the same shapes, so results are bitwise-equal across Dask workers and resumes. Feature widths
that are not a multiple of 16 (Lite0: 40 + 112 = 152) are zero-padded to one (160) for the tile pass:
distances are unchanged, and rows become 16-byte aligned, which lets the bank tiles be loaded with
vector cp.async copies and pipelined (benchmarks/results/compile_sm90.json: 96 KB of pipelined shared
memory at D = 160, 32 KB and scalar 2-byte loads at D = 152). `lowp_bank` makes that padded
half-precision copy once per bank. Offsets are 64-bit: banks of more than 2^31 elements work.
The Q x k lists live in registers, so k (with the exact mode's candidates) is at most MAX_K on the
Triton path; a larger k runs the torch GEMM path on the same device, on CUDA and CPU alike. The CPU path for large banks is the exact index
in kernels/knn_index.py; the torch reference below is the plain chunked GEMM.
"""

from __future__ import annotations

import torch

from kernels._checks import check_2d, use_triton
from kernels._triton import Launch, cdiv, run, tl
from kernels.knn_stream import topk_streamed

# Bank rows per chunk in the torch path: bounds the Q x chunk block held at once.
TORCH_BANK_CHUNK = 16384
PRECISIONS = ("exact", "fp32", "tf32", "bf16", "fp16")
MAX_K = 64  # the running list lives in registers; a larger k takes the torch path
MIN_SPLIT_ROWS = 1024  # bank rows per split at least (tests lower it to exercise the merge)
DIM_ALIGN = 16  # feature widths are padded to a multiple of this for the tile pass
H200_SMS = 132  # SM count assumed where no GPU is at hand (the compile check's launches)


def _knn_tile_kernel(
    q_ptr, b_ptr, bn_ptr, out_d_ptr, out_i_ptr,
    n_q, n_bank, dim, rows_per_split, stride_q, stride_b, qo_ptr, bo_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EXCLUDE: tl.constexpr,
):  # fmt: skip
    """Running top-K of ||b||^2 - 2 q.b over bank rows [split * rows_per_split, +rows_per_split);
    with EXCLUDE, rows whose owner (bo) equals the query's owner (qo) are never candidates."""
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
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q  # 64-bit: Q x D and M x D may pass 2^31
    if EXCLUDE:
        q_own = tl.load(qo_ptr + rows, mask=row_ok, other=-1)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        cols = m0 + tile_cols
        col_ok = cols < m_hi
        acc = tl.zeros([BLOCK_Q, BLOCK_M], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            d_ok = dk < dim
            a = tl.load(q_rows + dk[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + dk[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if PRECISION == "ieee" or PRECISION == "tf32":
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, b, acc)
        norms = tl.load(bn_ptr + cols, mask=col_ok, other=0.0)
        d2 = tl.where(col_ok[None, :], norms[None, :] - 2.0 * acc, float("inf"))
        if EXCLUDE:
            b_own = tl.load(bo_ptr + cols, mask=col_ok, other=-2)
            d2 = tl.where(q_own[:, None] == b_own[None, :], float("inf"), d2)
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
    out = (split * n_q + rows.to(tl.int64))[:, None] * K + slots[None, :]
    keep = row_ok[:, None] & (slots[None, :] < K)
    tl.store(out_d_ptr + out, best_d, mask=keep)
    tl.store(out_i_ptr + out, best_i, mask=keep)


def _rerank_kernel(
    q_ptr, b_ptr, cand_ptr, out_ptr, n_q, dim, n_cand, stride_q, stride_b,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[q, c] = sum_d (q[d] - bank[cand[q, c], d])^2 in fp32, summed directly (no expansion)."""
    rows = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
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


# Hopper tiles, chosen by `tile_config` from the shapes alone (no timing). Each compiles for sm_90 with
# wgmma and no spills at D = 160 and 1,536 (benchmarks/results/compile_sm90.json).
KNN_TILES = {
    ("half", "lists<=32"): {"BLOCK_Q": 128, "BLOCK_M": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    ("half", "lists=64"): {"BLOCK_Q": 128, "BLOCK_M": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    ("tf32", "lists<=32"): {"BLOCK_Q": 128, "BLOCK_M": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
    ("tf32", "lists=64"): {"BLOCK_Q": 128, "BLOCK_M": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
    # IEEE fp32 runs on the CUDA cores (no tensor cores for it): a smaller tile keeps it in registers.
    ("fp32", "any"): {"BLOCK_Q": 32, "BLOCK_M": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3},
}
# The interpreter (CPU tests) gets the smallest tile that tl.dot accepts.
INTERPRET_TILE = {"BLOCK_Q": 16, "BLOCK_M": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}
RERANK_TILE = {"BLOCK_Q": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
RERANK_INTERPRET_TILE = {"BLOCK_Q": 16, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}
MODES = {"fp32": "ieee", "tf32": "tf32"}  # tl.dot input_precision; anything else: half operands


def list_slots(k: int) -> int:
    """Register slots of a running list of k entries (a power of two, at least 2)."""
    return max(2, 1 << (k - 1).bit_length())


def tile_config(k: int, precision: str, interpreted: bool = False) -> dict:
    """The tile of the tile pass for a list of k entries: a pure function of its arguments.

    Nothing else enters (not the batch, not the bank, not the process's history): that is what keeps
    scores bitwise-equal across workers. Longer lists take registers from the dot tile.
    """
    if interpreted:
        return dict(INTERPRET_TILE)
    if precision == "fp32":
        return dict(KNN_TILES[("fp32", "any")])
    lists = "lists<=32" if list_slots(k) <= 32 else "lists=64"
    return dict(KNN_TILES[("tf32" if precision == "tf32" else "half", lists)])


def padded_dim(dim: int) -> int:
    return cdiv(dim, DIM_ALIGN) * DIM_ALIGN


def pad_columns(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as `dtype` with rows zero-padded to a multiple of DIM_ALIGN; unit column stride.

    Returns `x` itself (a row-strided view is fine) when nothing needs to change."""
    n, dim = x.shape
    width = padded_dim(dim)
    if width == dim and x.dtype == dtype and x.stride(1) == 1:
        return x
    out = x.new_zeros((n, width), dtype=dtype)
    out[:, :dim] = x
    return out


def lowp_bank(bank: torch.Tensor, precision: str = "bf16") -> torch.Tensor:
    """The bank in half precision, zero-padded for the tile pass: make it once per bank and pass it
    to `topk(..., bank_lowp=)`."""
    return pad_columns(bank, torch.float16 if precision == "fp16" else torch.bfloat16)


def tile_launch(
    q: torch.Tensor, bank: torch.Tensor, norms: torch.Tensor, k: int, precision: str,
    out_d: torch.Tensor, out_i: torch.Tensor, splits: int, interpreted: bool = False,
    owners: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Launch:  # fmt: skip
    """The tile pass over padded operands (q [Q, Dp], bank [M, Dp], same dtype); `owners`:
    (query owner [Q], bank owner [M]) int32, a query never matching a row of its own owner."""
    n_q, dim = q.shape
    n_bank = bank.shape[0]
    tile = tile_config(k, precision, interpreted)
    warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
    return Launch(
        _knn_tile_kernel, (cdiv(n_q, tile["BLOCK_Q"]), splits),
        (q, bank, norms, out_d, out_i, n_q, n_bank, dim, cdiv(n_bank, splits), q.stride(0), bank.stride(0),
         *(owners or (norms, norms))),
        dict(K=k, K_PAD=list_slots(k), PRECISION=MODES.get(precision, "lowp"), EXCLUDE=owners is not None, **tile),
        warps, stages,
    )  # fmt: skip


def bank_splits(n_q: int, n_bank: int, sms: int) -> int:
    """Bank splits over a second grid axis, when the query blocks alone leave SMs idle."""
    q_blocks = cdiv(n_q, 128)
    return max(1, min(cdiv(2 * sms, q_blocks), cdiv(n_bank, MIN_SPLIT_ROWS)))


def _sms(t: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else H200_SMS


def _tile_pass(q: torch.Tensor, bank: torch.Tensor, norms: torch.Tensor, k: int, precision: str,
               owners: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Run the tile kernel: (partial squared distance without ||q||^2 [Q, k], index [Q, k]); slots
    left empty (fewer than k rows not excluded) hold inf and index -1."""
    from kernels._triton import interpreting

    n_q, n_bank = q.shape[0], bank.shape[0]
    splits = bank_splits(n_q, n_bank, _sms(q))
    out_d = torch.empty((splits, n_q, k), dtype=torch.float32, device=q.device)
    out_i = torch.empty((splits, n_q, k), dtype=torch.int32, device=q.device)
    run(tile_launch(q, bank, norms, k, precision, out_d, out_i, splits, interpreting(), owners))
    # Lists come back unsorted (insertion replaces the maximum): sort, merging the splits.
    d = out_d.permute(1, 0, 2).reshape(n_q, splits * k)
    i = out_i.permute(1, 0, 2).reshape(n_q, splits * k)
    d, pos = torch.topk(d, k, dim=1, largest=False)
    return d, i.gather(1, pos).long()


def rerank_launch(q: torch.Tensor, bank: torch.Tensor, cand: torch.Tensor, exact: torch.Tensor,
                  interpreted: bool = False) -> Launch:  # fmt: skip
    tile = dict(RERANK_INTERPRET_TILE if interpreted else RERANK_TILE)
    warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
    n_q, n_cand = cand.shape
    return Launch(
        _rerank_kernel, (cdiv(n_q, tile["BLOCK_Q"]),),
        (q, bank, cand, exact, n_q, q.shape[1], n_cand, q.stride(0), bank.stride(0)), tile, warps, stages,
    )  # fmt: skip


def _rerank(q: torch.Tensor, bank: torch.Tensor, cand: torch.Tensor, k: int, empty: torch.Tensor | None = None):
    """Exact distances of the candidates, the k best; `empty` marks slots that hold no candidate."""
    from kernels._triton import interpreting

    exact = torch.empty(cand.shape, dtype=torch.float32, device=q.device)
    cand = cand.clamp_min(0).to(torch.int32).contiguous()
    run(rerank_launch(q, bank, cand, exact, interpreting()))
    if empty is not None:
        exact.masked_fill_(empty, float("inf"))
    d, pos = torch.topk(exact, k, dim=1, largest=False)
    return d.sqrt_(), cand.gather(1, pos).long()


def candidates_kept(k: int, precision: str, candidates: int | None, n_bank: int) -> int:
    """List length of the tile pass: k, or for the exact mode k plus spare candidates, at most MAX_K."""
    if precision != "exact":
        return k
    return min(candidates or 2 * k + 8, max(MAX_K, k), n_bank)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` as `dtype` with unit column stride; a row-strided view is kept as it is (no copy)."""
    t = t if t.dtype == dtype else t.to(dtype)
    return t if t.stride(1) == 1 else t.contiguous()


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
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel(s) on tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1).

    query_owner [Q] / bank_owner [M] (integers, both or neither): a query never matches a bank row
    of its own owner (leave-one-out scores); fewer than k rows left give distance inf, index -1.

    k <= MAX_K. candidate_precision: operands of the exact mode's first pass, "bf16" or "fp16" (the
    CPU interpreter mishandles bf16 in tl.dot, so interpreter tests of the exact mode use fp16).
    bank_lowp: `lowp_bank(bank)`, the padded half-precision copy made once.
    """
    _check(queries, bank, k)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K} on the Triton path (topk() takes the torch path above it), got {k}")
    n_keep = candidates_kept(k, precision, candidates, bank.shape[0])
    norms = (sq_norms(bank) if bank_sq_norms is None else bank_sq_norms).float().contiguous()
    if precision in MODES:
        q, b = pad_columns(queries, torch.float32), pad_columns(bank, torch.float32)
    else:
        lowp = candidate_precision if precision == "exact" else precision
        half = torch.float16 if lowp == "fp16" else torch.bfloat16
        q = pad_columns(queries, half)
        usable = bank_lowp is not None and bank_lowp.dtype == half and bank_lowp.shape == (bank.shape[0], q.shape[1])
        b = bank_lowp if usable else pad_columns(bank, half)
    owners = _owner_pair(query_owner, bank_owner, queries, bank)
    d, i = _tile_pass(q, b, norms, n_keep, precision, owners)
    if precision == "exact":
        empty = torch.isinf(d) if owners is not None else None
        return _rerank(_rows(queries, torch.float32), _rows(bank, torch.float32), i, k, empty)
    d = d + queries.float().pow(2).sum(1, keepdim=True)
    return d.clamp_min_(0).sqrt_(), i


def _owner_pair(query_owner: torch.Tensor | None, bank_owner: torch.Tensor | None,
                queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(query owner, bank owner) as contiguous int32 on the operands' devices, checked; None: no exclusion."""
    if query_owner is None and bank_owner is None:
        return None
    if query_owner is None or bank_owner is None:
        raise ValueError("query_owner and bank_owner go together: give both or neither")
    if query_owner.shape != (queries.shape[0],) or bank_owner.shape != (bank.shape[0],):
        raise ValueError(f"owners must be [Q] = [{queries.shape[0]}] and [M] = [{bank.shape[0]}], got "
                         f"{list(query_owner.shape)} and {list(bank_owner.shape)}")
    return (query_owner.to(queries.device, torch.int32).contiguous(),
            bank_owner.to(bank.device, torch.int32).contiguous())


def triton_cdiv(a: int, b: int) -> int:
    return cdiv(a, b)


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
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_sq_norms: torch.Tensor | None = None,
    query_owner: torch.Tensor | None = None, bank_owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: chunked GEMM + topk, merged across chunks, on the queries' device (a bank held
    elsewhere, e.g. in host memory, is moved a chunk at a time). Owners as in `topk_triton`
    (empty slots: distance inf, an arbitrary index)."""
    _check(queries, bank, k)
    owners = _owner_pair(query_owner, bank_owner, queries, bank)
    q = queries.float()
    q_norms = q.pow(2).sum(dim=1, keepdim=True)
    norms = (sq_norms(bank) if bank_sq_norms is None else bank_sq_norms.float()).to(q.device)
    best_d = best_i = None
    for start in range(0, bank.shape[0], TORCH_BANK_CHUNK):
        chunk = bank[start : start + TORCH_BANK_CHUNK].to(q.device).float()
        d2 = torch.addmm(q_norms + norms[start : start + chunk.shape[0]], q, chunk.T, alpha=-2.0)
        if owners is not None:
            mine = owners[0][:, None] == owners[1][start : start + chunk.shape[0]].to(q.device)[None, :]
            d2.masked_fill_(mine, float("inf"))
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
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows of each query: (distances ascending float32, indices int64).

    query_owner [Q] / bank_owner [M]: exclude bank rows of the query's own owner (every path).

    Triton when asked or when queries are on CUDA (auto); a CPU bank with CUDA queries is streamed.
    `precision` and `bank_lowp` (`lowp_bank(bank)`, made once) apply to Triton only. k > MAX_K runs
    the torch path on the queries' device, so every k that works on a CPU works on CUDA.
    """
    owners = dict(query_owner=query_owner, bank_owner=bank_owner)
    if k > MAX_K:
        return topk_torch(queries, bank, k, bank_sq_norms, **owners)
    if use_triton(backend, queries):
        if queries.is_cuda and not bank.is_cuda:
            _check(queries, bank, k)
            return topk_streamed(queries, bank, k, topk_triton, bank_sq_norms, precision=precision, **owners)
        return topk_triton(queries, bank, k, bank_sq_norms, precision=precision, bank_lowp=bank_lowp, **owners)
    return topk_torch(queries, bank, k, bank_sq_norms, **owners)
