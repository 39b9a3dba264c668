"""Top-k nearest neighbours by Euclidean distance.

    topk(queries[Q, D], bank[M, D], k) -> (dist[Q, k] float32 ascending, idx[Q, k] int64)

dist is the Euclidean (not squared) distance. Squared distances are expanded as
||q||^2 - 2 q.b + ||b||^2 so the work is one GEMM per bank chunk; the running top-k is merged
chunk by chunk, so the Q x M distance matrix is never held whole.
"""

from __future__ import annotations

import torch

from kernels._checks import check_2d, use_triton

# Bank rows per chunk in the torch path: bounds the Q x chunk block held at once.
TORCH_BANK_CHUNK = 16384


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest bank rows of each query: (distances ascending float32, indices int64)."""
    if use_triton(backend, queries, bank):
        raise NotImplementedError("the Triton kNN kernel is not built yet; use backend='torch'")
    return topk_torch(queries, bank, k, bank_sq_norms)
