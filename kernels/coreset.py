"""Greedy k-center (farthest-point) coreset selection.

    greedy_kcenter(x[N, D], n) -> idx[n] int64, distinct, in greedy order

Pick 0 is row `start`; each later pick is the row farthest (Euclidean) from all rows picked before
it. Exact on the rows as given: a random projection, if wanted, is the caller's business.
"""

from __future__ import annotations

import torch

from kernels._checks import check_2d, use_triton


def _check(x: torch.Tensor, n: int, start: int) -> None:
    check_2d("x", x)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be in [1, rows = {x.shape[0]}], got {n}")
    if not 0 <= start < x.shape[0]:
        raise ValueError(f"start must be a row index in [0, {x.shape[0]}), got {start}")


def greedy_kcenter_torch(x: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Brute force: one pass over all rows per pick (the reference)."""
    _check(x, n, start)
    xf = x.float()
    min_d2 = torch.full((x.shape[0],), float("inf"), device=x.device)
    picks = torch.empty(n, dtype=torch.long, device=x.device)
    nxt = start
    for step in range(n):
        picks[step] = nxt
        d2 = (xf - xf[nxt]).pow(2).sum(dim=1)
        torch.minimum(min_d2, d2, out=min_d2)
        nxt = int(torch.argmax(min_d2))
    return picks


def greedy_kcenter(x: torch.Tensor, n: int, *, start: int = 0, backend: str = "auto") -> torch.Tensor:
    """Indices of n rows chosen by greedy farthest-point selection."""
    if use_triton(backend, x):
        raise NotImplementedError("the Triton coreset kernel is not built yet; use backend='torch'")
    return greedy_kcenter_torch(x, n, start)
