"""Greedy k-center (farthest-point) coreset selection.

    greedy_kcenter(x[N, D], n) -> idx[n] int64, distinct, in greedy order
    greedy_kcenter_with_radius(x[N, D], n) -> (idx[n], covering radius r)

Pick 0 is row `start`; pick t is argmax_i min_{s<t} ||x_i - x_{idx_s}||, the row farthest from all
rows picked before it (the first such row on exact ties). Picked rows are never picked again, so
the picks are distinct even when rows repeat. r = max_i min_s ||x_i - x_{idx_s}|| after the last
pick: every row lies within r of the coreset. Exact on the rows as given: a random projection, if
wanted, is the caller's business.

State: min_d2[N] (float32), the squared distance of each row to its nearest pick so far. A step
folds the newest pick into min_d2 and takes the arg-max:

    Triton (CUDA): one fused launch per pick reads x once, updates min_d2 and writes one
                   (max, argmax) pair per block; a second tiny launch reduces the block pairs.
    CPU:           kernels/coreset_cpu.py, triangle-inequality pruning over balanced leaves:
                   exact, same picks, ~10x less work than one pass per pick.
    torch:         the reference below, one full pass per pick.
"""

from __future__ import annotations

import torch

from kernels._checks import check_2d, use_triton
from kernels.coreset_cpu import greedy_kcenter_pruned

# Below this many rows the pruned CPU path's tree is not worth building.
PRUNED_MIN_ROWS = 4096


def _check(x: torch.Tensor, n: int, start: int) -> None:
    check_2d("x", x)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be in [1, rows = {x.shape[0]}], got {n}")
    if not 0 <= start < x.shape[0]:
        raise ValueError(f"start must be a row index in [0, {x.shape[0]}), got {start}")


def _brute_force(x: torch.Tensor, n: int, start: int) -> tuple[torch.Tensor, float]:
    xf = x.float()
    min_d2 = torch.full((x.shape[0],), float("inf"), device=x.device)
    picks = torch.empty(n, dtype=torch.long, device=x.device)
    nxt = start
    for step in range(n):
        picks[step] = nxt
        d2 = (xf - xf[nxt]).pow(2).sum(dim=1)
        torch.minimum(min_d2, d2, out=min_d2)
        min_d2[nxt] = -1.0  # picked: below every distance, so never picked again
        nxt = int(torch.argmax(min_d2))
    return picks, float(min_d2.max().clamp_min(0).sqrt())


def greedy_kcenter_torch(x: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Brute force: one pass over all rows per pick (the reference)."""
    _check(x, n, start)
    return _brute_force(x, n, start)[0]


def greedy_kcenter_with_radius(
    x: torch.Tensor, n: int, *, start: int = 0, backend: str = "auto"
) -> tuple[torch.Tensor, float]:
    """(indices of n rows by greedy farthest-point selection, covering radius of those rows)."""
    _check(x, n, start)
    if use_triton(backend, x):
        raise NotImplementedError("the Triton coreset kernel is not built yet; use backend='torch'")
    if x.device.type == "cpu" and x.shape[0] >= PRUNED_MIN_ROWS:
        return greedy_kcenter_pruned(x, n, start)
    return _brute_force(x, n, start)


def greedy_kcenter(x: torch.Tensor, n: int, *, start: int = 0, backend: str = "auto") -> torch.Tensor:
    """Indices of n rows chosen by greedy farthest-point selection."""
    return greedy_kcenter_with_radius(x, n, start=start, backend=backend)[0]
