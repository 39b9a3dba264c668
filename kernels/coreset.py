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
                   The tile is fixed by the width alone; offsets are 64-bit.
    CPU:           kernels/coreset_cpu.py, candidate rounds with GEMM-bounded lazy refreshes:
                   exact, same picks, 10-20x faster than one pass per pick.
    torch:         the reference below, one full pass per pick.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels._checks import check_2d, use_triton
from kernels._triton import Launch, cdiv, interpreting, jit_kernel, on_device, tl
from kernels.coreset_cpu import greedy_kcenter_lazy


def _kcenter_step_kernel(
    x_ptr, min_d2_ptr, centre_ptr, part_val_ptr, part_idx_ptr, n_rows, dim, stride_x,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Fold the newest pick (index at centre_ptr) into min_d2; write this block's (max, argmax)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    centre = tl.load(centre_ptr).to(tl.int64)
    d2 = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        d_ok = dk < dim
        x_at = x_ptr + rows[:, None].to(tl.int64) * stride_x + dk[None, :]
        xv = tl.load(x_at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        cv = tl.load(x_ptr + centre * stride_x + dk, mask=d_ok, other=0.0)
        diff = xv - cv[None, :]
        d2 += tl.sum(diff * diff, axis=1)
    old = tl.load(min_d2_ptr + rows, mask=row_ok, other=float("-inf"))
    new = tl.minimum(old, d2)
    new = tl.where(rows == centre, -1.0, new)  # picked: below every distance, never picked again
    new = tl.where(row_ok, new, float("-inf"))
    tl.store(min_d2_ptr + rows, new, mask=row_ok)
    top, at = tl.max(new, axis=0, return_indices=True)
    tl.store(part_val_ptr + pid, top)
    tl.store(part_idx_ptr + pid, pid * BLOCK_N + at)


def _kcenter_pick_kernel(
    part_val_ptr, part_idx_ptr, n_parts, centre_ptr, picks_ptr, top_ptr, step, BLOCK: tl.constexpr
):  # fmt: skip
    """Reduce the blocks' (max, argmax): the next pick goes to centre_ptr and picks[step + 1]."""
    offs = tl.arange(0, BLOCK)
    vals = tl.load(part_val_ptr + offs, mask=offs < n_parts, other=float("-inf"))
    best_v, at = tl.max(vals, axis=0, return_indices=True)
    best_i = tl.load(part_idx_ptr + at)
    for p0 in range(BLOCK, n_parts, BLOCK):
        vals = tl.load(part_val_ptr + p0 + offs, mask=p0 + offs < n_parts, other=float("-inf"))
        top, at = tl.max(vals, axis=0, return_indices=True)
        take = top > best_v  # strict: on ties the earlier block (lower row) wins
        best_i = tl.where(take, tl.load(part_idx_ptr + p0 + at), best_i)
        best_v = tl.where(take, top, best_v)
    tl.store(centre_ptr, best_i)
    tl.store(picks_ptr + step + 1, best_i.to(tl.int64))
    tl.store(top_ptr + step, best_v)


# Rows per program and width of a column slab: a [BLOCK_N, BLOCK_D] fp32 tile on num_warps warps.
# 512 x 128 on 4 warps spilled 15.5 KB per thread on sm_90; 256 x 64 on 8 warps holds 64 values per
# thread, 148 registers and no spill (benchmarks/results/compile_sm90.json).
STEP_TILE = {"BLOCK_N": 256, "BLOCK_D": 64, "num_warps": 8, "num_stages": 1}
STEP_INTERPRET_TILE = {"BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}
PICK_BLOCK = {False: 1024, True: 16}


def step_tile(dim: int, interpreted: bool = False) -> dict:
    """The step kernel's tile: a pure function of the width (the interpreter runs programs one by one,
    so few, wide blocks keep CPU tests quick)."""
    tile = dict(STEP_INTERPRET_TILE if interpreted else STEP_TILE)
    tile["BLOCK_D"] = min(tile["BLOCK_D"], max(16, 1 << (dim - 1).bit_length()))
    return tile


def kcenter_launches(
    xf: torch.Tensor, min_d2: torch.Tensor, centre: torch.Tensor, part_val: torch.Tensor, part_idx: torch.Tensor,
    picks: torch.Tensor, tops: torch.Tensor, step: int, interpreted: bool = False,
) -> tuple[Launch, Launch]:  # fmt: skip
    """The two launches of one pick: fold the newest pick in (per block), then reduce the blocks."""
    n_rows, dim = xf.shape
    tile = step_tile(dim, interpreted)
    warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
    n_parts = part_val.shape[0]
    fold = Launch(
        _kcenter_step_kernel, (n_parts,), (xf, min_d2, centre, part_val, part_idx, n_rows, dim, xf.stride(0)),
        tile, warps, stages,
    )  # fmt: skip
    pick = Launch(
        _kcenter_pick_kernel, (1,), (part_val, part_idx, n_parts, centre, picks, tops, step),
        {"BLOCK": PICK_BLOCK[interpreted]}, 4, 1,
    )  # fmt: skip
    return fold, pick


def greedy_kcenter_triton(x: torch.Tensor, n: int, start: int = 0) -> tuple[torch.Tensor, float]:
    """Two launches per pick and no host synchronisation: the picks queue up on the GPU."""
    interpreted = interpreting()
    xf = x.float()
    xf = xf if xf.stride(1) == 1 else xf.contiguous()
    n_rows, dim = xf.shape
    n_parts = cdiv(n_rows, step_tile(dim, interpreted)["BLOCK_N"])
    device = x.device
    min_d2 = torch.full((n_rows,), float("inf"), device=device)
    part_val = torch.empty(n_parts, dtype=torch.float32, device=device)
    part_idx = torch.empty(n_parts, dtype=torch.int32, device=device)
    picks = torch.empty(n + 1, dtype=torch.long, device=device)
    picks[0] = start
    centre = torch.full((1,), start, dtype=torch.int32, device=device)
    tops = torch.empty(n, dtype=torch.float32, device=device)
    fold, pick = kcenter_launches(xf, min_d2, centre, part_val, part_idx, picks, tops, 0, interpreted)
    step_kernel, _ = jit_kernel(fold.fn)
    pick_kernel, _ = jit_kernel(pick.fn)
    extra = {} if interpreted else {"num_warps": fold.num_warps, "num_stages": fold.num_stages}
    with on_device(xf):  # one device guard for the whole loop: two launches per pick
        for step in range(n):
            step_kernel[fold.grid](*fold.args, **fold.constexprs, **extra)
            pick_kernel[pick.grid](*pick.args[:-1], step, **pick.constexprs)
    return picks[:n], float(tops[n - 1].clamp_min(0).sqrt())


def _check(x: torch.Tensor, n: int, start: int) -> None:
    check_2d("x", x)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"n must be in [1, rows = {x.shape[0]}], got {n}")
    if not 0 <= start < x.shape[0]:
        raise ValueError(f"start must be a row index in [0, {x.shape[0]}), got {start}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite: it holds NaN or infinite values, which have no farthest row")


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
    x: torch.Tensor, n: int, *, start: int = 0, backend: str = "auto", progress: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, float]:
    """(indices of n rows by greedy farthest-point selection, covering radius of those rows).
    `progress(picks so far)`: after each round of the CPU path, once at the end elsewhere."""
    _check(x, n, start)
    if x.device.type == "cpu" and not use_triton(backend, x):
        return greedy_kcenter_lazy(x, n, start, progress=progress)
    out = greedy_kcenter_triton(x, n, start) if use_triton(backend, x) else _brute_force(x, n, start)
    if progress is not None:
        progress(n)
    return out


def greedy_kcenter(x: torch.Tensor, n: int, *, start: int = 0, backend: str = "auto") -> torch.Tensor:
    """Indices of n rows chosen by greedy farthest-point selection."""
    return greedy_kcenter_with_radius(x, n, start=start, backend=backend)[0]
