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
min-distance vector, and with it every pick, equals the brute force's bit for bit (ties aside:
equal maxima may be broken in a different row order).

Per pick: distances to the leaf centres (n_leaves x D), a gather of the rows that still need
work, a scatter of their new minima, and the arg-max as an arg-max over per-leaf maxima followed
by one inside the winning leaf. Measured in benchmarks/results/coreset_cpu.json.
"""

from __future__ import annotations

import math

import torch

# Rows per leaf. Small leaves have tight radii (few rows revisited per pick) but more centres to
# test per pick; 64 was the fastest on patch features in benchmarks/results/coreset_cpu.json.
DEFAULT_LEAF_SIZE = 64
# Relative slack on every bound: fp32 distance error is ~1e-6 relative at D in the thousands.
BOUND_TOL = 1e-4
# Power-iteration steps for each node's split direction (a rough principal axis is enough).
POWER_STEPS = 3
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
    """State of one pruned greedy run: leaves, their bounds and the min-distance of every row."""

    def __init__(self, x: torch.Tensor, leaf_size: int, seed: int):
        self.leaf_ids = balanced_leaves(x, leaf_size, seed)
        n_leaves, size = self.leaf_ids.shape
        valid = self.leaf_ids >= 0
        filled = torch.where(valid, self.leaf_ids, self.leaf_ids[:, :1])  # pad with a real row
        self.rows = x[filled.reshape(-1)]  # [n_leaves * S, D], leaf-major
        leaves = self.rows.view(n_leaves, size, -1)
        self.centres = (leaves * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        self.centre_dist = (leaves - self.centres[:, None]).pow(2).sum(-1).sqrt()  # [n_leaves, S]
        self.radii = torch.where(valid, self.centre_dist, 0.0).amax(1)
        self.min_d2 = torch.where(valid, float("inf"), PADDED)  # [n_leaves, S]
        self.leaf_max = torch.full((n_leaves,), float("inf"))  # sqrt(max min_d2) per leaf
        self.slot = torch.empty(x.shape[0], dtype=torch.long)  # original row -> flat leaf slot
        self.slot[self.leaf_ids[valid]] = torch.arange(n_leaves * size).view(n_leaves, size)[valid]
        self.size = size

    def add(self, row: int) -> None:
        """Fold pick `row` into the min-distances (exactly as the brute force would)."""
        size = self.size
        flat_min = self.min_d2.view(-1)
        flat_min[self.slot[row]] = PICKED
        p = self.rows[self.slot[row]]
        dc = (self.centres - p).pow(2).sum(1).sqrt()
        reach = dc - self.radii - BOUND_TOL * (dc + self.radii)
        leaves = (reach <= self.leaf_max * (1 + BOUND_TOL)).nonzero().squeeze(1)
        dcl = dc[leaves, None]
        rcd = self.centre_dist[leaves]
        lower = (dcl - rcd).abs() - BOUND_TOL * (dcl + rcd)
        cur = self.min_d2[leaves]
        need = (cur > 0) & ((lower <= 0) | (lower * lower <= cur * (1 + BOUND_TOL)))
        slots = (leaves[:, None] * size + torch.arange(size))[need]
        d2 = (self.rows[slots] - p).pow(2).sum(1)
        flat_min[slots] = torch.minimum(flat_min[slots], d2)
        top = self.min_d2[leaves].amax(1)
        self.leaf_max[leaves] = torch.where(top < 0, PICKED, top.clamp_min(0).sqrt())

    def farthest(self) -> tuple[int, float]:
        """(original row id, distance) of the row farthest from all picks so far."""
        leaf = int(torch.argmax(self.leaf_max))
        pos = int(torch.argmax(self.min_d2[leaf]))
        return int(self.leaf_ids[leaf, pos]), float(self.leaf_max[leaf])


def greedy_kcenter_pruned(
    x: torch.Tensor, n: int, start: int = 0, *, leaf_size: int = DEFAULT_LEAF_SIZE, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """(picks[n] int64, covering radius) by exact pruned greedy k-center on a CPU tensor.

    The covering radius is max over rows of the distance to the nearest pick (0 when n = N).
    The seed only shapes the leaves (speed); the picks do not depend on it.
    """
    xf = x.detach().float().contiguous()
    state = _PrunedKCenter(xf, min(leaf_size, xf.shape[0]), seed)
    picks = torch.empty(n, dtype=torch.long)
    nxt = start
    radius = 0.0
    for step in range(n):
        picks[step] = nxt
        state.add(nxt)
        nxt, radius = state.farthest()
    return picks, max(radius, 0.0)
