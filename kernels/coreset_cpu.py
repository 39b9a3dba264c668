"""Exact greedy k-center on the CPU with triangle-inequality pruning.

The brute force reads all N x D features once per pick, so it is memory-bound (190,000 x 128 fp32
picking 19,000: ~200 s on 2 cores). Here the rows are first split into a balanced tree of leaves
(median splits along each node's principal direction) of at most `leaf_size` rows, padded so that
the leaves form one [n_leaves, S, D] tensor. Each leaf has a centre c and a radius r, each row its
distance to its leaf's centre. For a new pick p and a row x of leaf L:

    d(x, p) >= |d(p, c_L) - d(x, c_L)|  >=  d(p, c_L) - r_L

A row's min-distance can only shrink if d(x, p) < min_d(x), so a leaf whose lower bound is at or
above its largest min-distance is skipped whole, and inside the remaining leaves only rows whose
own bound is below their min-distance are recomputed. Bounds carry a relative safety margin
(`BOUND_TOL`, far above fp32 rounding), so skipping never hides a real update. The distances that
are computed use the same fp32 arithmetic as the brute force ((x - p)^2 summed over D), so the
min-distance vector, and with it every pick, equals the brute force's bit for bit; exact ties
are broken towards the lowest row id, as torch.argmax does.

Per pick: distances to the leaf centres (n_leaves x D), a gather of the rows that still need
work, a scatter of their new minima, and the arg-max as an arg-max over per-leaf maxima followed
by one inside the winning leaf. Measured in benchmarks/results/kernels_coreset_cpu.json.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels._threads import torch_threads

# Rows per leaf. Small leaves have tight radii (few rows revisited per pick) but more centres to
# test per pick; 64 was the fastest on patch features in benchmarks/results/kernels_coreset_cpu.json.
DEFAULT_LEAF_SIZE = 64
# Relative slack on every bound: fp32 distance error is ~1e-6 relative at D in the thousands.
BOUND_TOL = 1e-4
# Power-iteration steps for each node's split direction (a rough principal axis is enough).
POWER_STEPS = 3
# Rounding bound per dimension of a fp32 dot product, with a 4x allowance.
ERR_PER_DIM = 4 * 2.0**-24
# torch threads while building and picking (see kernels/_threads.py).
PICK_THREADS = 1
PICKED = -1.0  # min-distance marker of picked rows: below every real distance, so never re-picked
PADDED = float("-inf")  # marker of padding rows


def _principal_projection(rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Projection of rows onto a rough top principal axis, without materialising rows - mean."""
    mean = rows.mean(dim=0)
    w = torch.randn(rows.shape[1], generator=gen, dtype=rows.dtype)
    for _ in range(POWER_STEPS):
        u = rows @ w - mean @ w
        w = rows.T @ u - mean * u.sum()
        w = w / w.norm().clamp_min(1e-30)
    return rows @ w


def balanced_leaves(x: torch.Tensor, leaf_size: int, seed: int = 0) -> torch.Tensor:
    """Row ids arranged as [n_leaves, leaf_size], -1 where a leaf is padded.

    Nodes split at a quantile of their principal projection so that every leaf ends up with
    between leaf_size - 1 and leaf_size rows.
    """
    n_rows = x.shape[0]
    n_leaves = math.ceil(n_rows / leaf_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(n_rows)
    rows = x.clone()  # reordered in place, node by node, so each node is a contiguous slice
    spans: list[tuple[int, int]] = []
    stack = [(0, n_rows, n_leaves)]
    while stack:
        lo, hi, leaves = stack.pop()
        if leaves == 1:
            spans.append((lo, hi))
            continue
        left_leaves = leaves // 2
        cut = lo + round((hi - lo) * left_leaves / leaves)
        sort = torch.argsort(_principal_projection(rows[lo:hi], gen))
        rows[lo:hi] = rows[lo:hi][sort]
        order[lo:hi] = order[lo:hi][sort]
        stack.append((cut, hi, leaves - left_leaves))
        stack.append((lo, cut, left_leaves))
    ids = torch.full((n_leaves, leaf_size), -1, dtype=torch.long)
    for leaf, (lo, hi) in enumerate(sorted(spans)):
        ids[leaf, : hi - lo] = order[lo:hi]
    return ids


class _PrunedKCenter:
    """State of one pruned greedy run: leaves, their bounds and the min-distance of every row.

    The distances that decide picks are computed by torch exactly like the brute force; the
    bookkeeping on small per-leaf arrays runs in numpy on shared memory, where an operation costs
    about a microsecond instead of torch's ~10 (thousands of picks make that the bulk of the time).
    """

    def __init__(self, x: torch.Tensor, leaf_size: int, seed: int):
        self.leaf_ids = balanced_leaves(x, leaf_size, seed)
        n_leaves, size = self.leaf_ids.shape
        valid = self.leaf_ids >= 0
        filled = torch.where(valid, self.leaf_ids, self.leaf_ids[:, :1])  # pad with a real row
        self.rows = x[filled.reshape(-1)]  # [n_leaves * S, D], leaf-major
        leaves = self.rows.view(n_leaves, size, -1)
        centres = (leaves * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        centre_dist = (leaves - centres[:, None]).pow(2).sum(-1).sqrt()
        # Centre distances come from one mat-vec on mean-centred copies; its rounding error is
        # bounded by ERR_PER_DIM * D * (|c|^2 + |p|^2) and folded into every bound.
        self.mean = x.mean(0)
        self.centres = (centres - self.mean).contiguous()
        self.centre_sq = self.centres.pow(2).sum(1)
        self.err_coef = ERR_PER_DIM * x.shape[1]
        self.centre_dist = centre_dist.numpy()  # [n_leaves, S]
        self.reach_pad = (torch.where(valid, centre_dist, 0.0).amax(1) * (1 + BOUND_TOL)).numpy()
        self.min_d2 = torch.where(valid, float("inf"), PADDED).numpy()  # [n_leaves, S]
        self.flat_min = self.min_d2.reshape(-1)
        # Per leaf: max of min_d2 (decides picks: its square root could merge near-equal values)
        # and its square root (for the bounds).
        self.leaf_top = np.full(n_leaves, np.inf, dtype=np.float32)
        self.leaf_max = np.full(n_leaves, np.inf, dtype=np.float32)
        slot = torch.empty(x.shape[0], dtype=torch.long)  # original row -> flat leaf slot
        slot[self.leaf_ids[valid]] = torch.arange(n_leaves * size).view(n_leaves, size)[valid]
        self.slot = slot.numpy()
        self.leaf_ids_np = self.leaf_ids.numpy()
        self.size = size

    def _centre_distances(self, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(nominal d(p, c) per leaf, bound on its rounding error)."""
        pc = p - self.mean
        p_sq = pc.dot(pc)
        d2 = torch.addmv(self.centre_sq + p_sq, self.centres, pc, alpha=-2.0).numpy()
        err_d2 = self.err_coef * (self.centre_sq.numpy() + p_sq.item())
        dc = np.sqrt(np.maximum(d2, 0))
        return dc, err_d2 / np.maximum(dc, np.sqrt(err_d2))

    def add(self, row: int) -> None:
        """Fold pick `row` into the min-distances (exactly as the brute force would)."""
        size, tol = self.size, BOUND_TOL
        slot = int(self.slot[row])
        self.flat_min[slot] = PICKED
        p = self.rows[slot]
        dc, dc_err = self._centre_distances(p)
        reach = dc * (1 - tol) - dc_err - self.reach_pad
        leaves = np.flatnonzero(reach <= self.leaf_max * (1 + tol))
        dcl = dc[leaves, None]
        rcd = self.centre_dist[leaves]
        lower = np.abs(dcl - rcd) - (dc_err[leaves, None] + tol * (dcl + rcd))
        cur = self.min_d2[leaves]
        need = np.flatnonzero((cur > 0) & ((lower <= 0) | (lower * lower <= cur * (1 + tol))))
        slots = leaves[need // size] * size + need % size
        diff = self.rows.index_select(0, torch.from_numpy(slots)).sub_(p)
        d2 = diff.mul_(diff).sum(1).numpy()  # bit for bit the brute force's (x - p).pow(2).sum(1)
        self.flat_min[slots] = np.minimum(self.flat_min[slots], d2)
        top = self.min_d2[leaves].max(1)
        self.leaf_top[leaves] = top
        self.leaf_max[leaves] = np.where(top < 0, PICKED, np.sqrt(np.maximum(top, 0)))

    def farthest(self) -> tuple[int, float]:
        """(original row id, distance) of the row farthest from all picks so far; on exact ties
        the lowest row id, as the brute force's argmax (repeated rows make such ties common)."""
        top = self.leaf_top.max()
        leaves = np.flatnonzero(self.leaf_top == top)
        tied = self.leaf_ids_np[leaves][self.min_d2[leaves] == top]
        return int(tied.min()), float(self.leaf_max[leaves[0]])


def greedy_kcenter_pruned(
    x: torch.Tensor, n: int, start: int = 0, *, leaf_size: int = DEFAULT_LEAF_SIZE, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """(picks[n] int64, covering radius) by exact pruned greedy k-center on a CPU tensor.

    The covering radius is max over rows of the distance to the nearest pick (0 when n = N).
    The seed only shapes the leaves (speed); the picks do not depend on it.
    """
    xf = x.detach().float().contiguous()
    picks = torch.empty(n, dtype=torch.long)
    nxt = start
    radius = 0.0
    with torch_threads(PICK_THREADS):
        state = _PrunedKCenter(xf, min(leaf_size, xf.shape[0]), seed)
        for step in range(n):
            picks[step] = nxt
            state.add(nxt)
            nxt, radius = state.farthest()
    return picks, max(radius, 0.0)
