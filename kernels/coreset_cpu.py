"""Exact greedy k-center on the CPU: candidate rounds and GEMM-bounded lazy refreshes.

The brute force folds every pick into all N rows' min-distances: N x D reads per pick, memory-bound
(pcb, 368,640 x 128 picking 36,864: ~15 min on a core). Two facts make most of that work skippable:

* min-distances only shrink, so a stale value (one that has not yet seen the latest picks) is an
  upper bound on the current one;
* the next pick is the arg-max, so only rows near the top ever need an up-to-date value.

A round settles a threshold tau: every row whose value is >= tau is brought up to date, and there
are at least `candidates` of them. Rows below tau stay stale: their true values are below tau too.
The round then picks among the candidates alone, folding each pick into the candidates only,
while the best candidate is still >= tau (then it is the global arg-max). When it drops below,
the next round settles a lower tau, refreshing only the stale rows that now reach it.

A refresh folds a block of picks into a block of rows with one GEMM on mean-centred copies
(|a|^2 + |b|^2 - 2 a.b, a lower and an upper bound once its fp32 rounding error is allowed for):
a pick is skipped for a row where its lower bound exceeds both the row's value and the smallest
upper bound of the block; the rest (about one pick per refreshed row) are computed exactly like
the brute force, (x - p)^2 summed in fp32. So the min-distances, and with them every pick, equal
the brute force's bit for bit; exact ties go to the lowest row id, as torch.argmax does.

On CPUs with native bf16 (AVX512-BF16, AMX) the refresh GEMM runs on bf16 copies, about 3x the fp32
rate: each operand rounds by at most u = 2^-8 and the output once more, so |a.b - dot| <= 4u |a||b|
<= 2u (|a|^2 + |b|^2), and the bounds widen by that (err + 4u of the norms on each side). A pick
whose lower bound the wider margin lets through is computed exactly as before: only the number of
exact pairs grows, never the answer.
Measured in benchmarks/results/kernels_coreset_cpu.json.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from kernels._checks import cpu_native_bf16
from kernels._threads import torch_threads

# Rows kept up to date per round. Fewer: more rounds (each settles over all N rows); more: each
# pick updates more candidates. 4,096 was the fastest on bottle and pcb patch features.
DEFAULT_CANDIDATES = 4096
# A settle refreshes the stale rows down to this many times `candidates` from the top, so that the
# values it lowers seldom call for another pass.
REFRESH_MARGIN = 2
# Rounding bound per dimension on |a|^2 + |b|^2 - 2 a.b in fp32, relative to |a|^2 + |b|^2: the
# standard gamma_D bound is 2 D u; 4 D u leaves room for the centring subtraction.
ERR_PER_DIM = 4 * 2.0**-24
# Relative slack on every comparison with an exactly computed distance, whose own fp32 error is
# below D u (1e-5 at D = 128).
BOUND_TOL = 1e-4
# Rows and picks per GEMM block of a refresh (a 4,096 x 4,096 fp32 block is 64 MiB).
REFRESH_BLOCK = 4096
# Relative bound, on |a|^2 + |b|^2, of the rounding of 2 a.b computed on bf16 operands with a bf16 output.
BF16_GEMM_ERR = 4 * 2.0**-8
PICKED = -1.0  # min-distance marker of picked rows: below every real distance, so never re-picked


class _LazyKCenter:
    """Min-distances of all rows, each up to date with the first `folded[r]` picks."""

    def __init__(self, x: torch.Tensor, start: int):
        self.x = x
        n_rows, dim = x.shape
        self.centred = x - x.mean(0)
        self.sq = self.centred.pow(2).sum(1)
        self.err = ERR_PER_DIM * dim
        self.tol = BOUND_TOL + dim * 2.0**-24
        self.low_sq = self.sq * (1 - self.err)  # a row's share of the lower bound
        self._gemm_operands()
        self.picks = [start]
        # the first pick, folded into every row
        self.values = torch.cat([self.exact(rows, start) for rows in torch.arange(n_rows).split(REFRESH_BLOCK)])
        self.values[start] = PICKED
        self.folded = torch.ones(n_rows, dtype=torch.long)

    def _gemm_operands(self) -> None:
        """The refresh GEMM's operands and their rounding bound: bf16 copies where the CPU has
        native bf16, else the fp32 rows themselves."""
        self.gemm_rows = self.centred.bfloat16() if cpu_native_bf16() else self.centred
        self.gemm_err = self.err + (BF16_GEMM_ERR if self.gemm_rows.dtype == torch.bfloat16 else 0.0)

    def exact(self, rows: torch.Tensor, pick: int | torch.Tensor) -> torch.Tensor:
        """Squared distances of rows to picks (one each, or one for all), as the brute force adds them."""
        other = self.x[pick] if isinstance(pick, int) else self.x.index_select(0, pick)
        diff = self.x.index_select(0, rows).sub_(other)
        return diff.mul_(diff).sum(1)

    def refresh(self, rows: torch.Tensor) -> None:
        """Fold every pick a row has not seen into its value (threaded GEMMs)."""
        picks = torch.tensor(self.picks)
        seen = self.folded[rows]
        for first in torch.unique(seen).tolist():
            group = rows[seen == first]
            for c0 in range(first, len(self.picks), REFRESH_BLOCK):
                new = picks[c0 : c0 + REFRESH_BLOCK]
                new_centred = self.gemm_rows.index_select(0, new)
                new_low = self.sq[new] * (1 - self.gemm_err)
                # Upper minus lower bound of a pair is 2 err (|a|^2 + |b|^2): its column part, at most.
                new_slack = 2 * self.gemm_err * float(self.sq[new].max())
                for r0 in range(0, group.numel(), REFRESH_BLOCK):
                    self._fold(group[r0 : r0 + REFRESH_BLOCK], new, new_centred, new_low, new_slack)
        self.folded[rows] = len(self.picks)

    def _fold(
        self, rows: torch.Tensor, new: torch.Tensor, new_centred: torch.Tensor, new_low: torch.Tensor, new_slack: float
    ) -> None:
        """One GEMM block: lower bounds (less each row's share) of rows x new picks, then exact pairs.

        A pick is computed exactly only where its lower bound is under both the row's value and the
        block's smallest upper bound: one pick per row or so, the one that sets the new minimum.
        """
        value = self.values[rows]
        dot = torch.mm(self.gemm_rows.index_select(0, rows), new_centred.T)
        low = dot.float().mul_(-2.0).add_(new_low[None, :])
        row_sq = self.sq[rows]
        row_low = row_sq * (1 - self.gemm_err)
        best_upper = low.amin(1) + row_low + 2 * self.gemm_err * row_sq + new_slack
        limit = torch.minimum(value, best_upper) * (1 + self.tol) - row_low
        limit = torch.where(value > 0, limit, float("-inf"))  # picked or on a pick: nothing to lower
        at, col = (low <= limit[:, None]).nonzero(as_tuple=True)
        if at.numel():
            hit = rows[at]
            self.values.scatter_reduce_(0, hit, self.exact(hit, new[col]), reduce="amin")

    def settle(self, count: int) -> float:
        """Threshold tau, the count-th largest value, with every row at or above it up to date."""
        step, n_rows = len(self.picks), self.values.numel()
        while True:
            tau = float(torch.topk(self.values, min(count, n_rows), sorted=False).values.min())
            if not bool(((self.values >= tau) & (self.folded < step)).any()):
                return tau
            margin = float(torch.topk(self.values, min(REFRESH_MARGIN * count, n_rows), sorted=False).values.min())
            self.refresh(((self.values >= margin) & (self.folded < step)).nonzero().squeeze(1))

    def pick_round(self, tau: float, n: int, floor: float = float("-inf")) -> None:
        """Pick among the rows at or above tau while the best of them is still at or above tau (and,
        given `floor`, above it)."""
        rows = (self.values >= tau).nonzero().squeeze(1)  # ascending: argmax ties go to the lowest id
        values = self.values[rows]
        centred = self.centred.index_select(0, rows)
        row_low = self.low_sq[rows]
        # A pick p lowers row r only where its lower bound fits under the value:
        # (1 - err)(|r|^2 + |p|^2) - 2 r.p <= value (1 + tol), i.e. r.p >= half_gap[r] + (1 - err)|p|^2 / 2.
        half_gap = (row_low - values * (1 + self.tol)) / 2
        half_gap[values <= 0] = float("inf")
        while len(self.picks) < n:
            best = int(torch.argmax(values))
            if float(values[best]) < max(tau, 0.0) or float(values[best]) <= floor:  # below tau: a stale row may be ahead
                break
            pick = int(rows[best])
            self.picks.append(pick)
            at = (torch.mv(centred, self.centred[pick]) >= half_gap + float(self.low_sq[pick]) / 2).nonzero().squeeze(1)
            if at.numel():
                lowered = torch.minimum(values[at], self.exact(rows[at], pick))
                values[at] = lowered
                half_gap[at] = (row_low[at] - lowered * (1 + self.tol)) / 2
            values[best] = PICKED
            half_gap[best] = float("inf")
        self.values[rows] = values
        self.folded[rows] = len(self.picks)


def greedy_kcenter_lazy(
    x: torch.Tensor, n: int, start: int = 0, *, candidates: int = DEFAULT_CANDIDATES, threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """(picks[n] int64, covering radius) by exact greedy k-center on a CPU tensor.

    The covering radius is max over rows of the distance to the nearest pick (0 when n = N).
    `candidates` and `threads` (for the refreshes; default `refresh_threads()`) only change the
    speed; the picks do not depend on them. `progress(picks so far)` is called after each round.
    """
    xf = x.detach().float().contiguous()
    with torch_threads(threads or refresh_threads()):
        state = _LazyKCenter(xf, start)
        while len(state.picks) < n:
            tau = state.settle(candidates + 1)
            with torch_threads(1):  # thousands of small operations: threads only wait at barriers
                state.pick_round(tau, n)
            if progress is not None:
                progress(len(state.picks))
        radius_sq = state.settle(1)
    return torch.tensor(state.picks, dtype=torch.long), math.sqrt(max(radius_sq, 0.0))


class _ExtendKCenter(_LazyKCenter):
    """The state of a greedy run whose first `n_picked` rows are already picks, with the other rows'
    squared distances to them given (the continuation of a fit's coreset over new rows)."""

    def __init__(self, x: torch.Tensor, n_picked: int, min_d2: torch.Tensor):
        self.x = x
        n_rows, dim = x.shape
        self.centred = x - x.mean(0)
        self.sq = self.centred.pow(2).sum(1)
        self.err = ERR_PER_DIM * dim
        self.tol = BOUND_TOL + dim * 2.0**-24
        self.low_sq = self.sq * (1 - self.err)
        self._gemm_operands()
        self.picks = list(range(n_picked))
        self.values = torch.cat([torch.full((n_picked,), PICKED), min_d2.float()])
        self.folded = torch.full((n_rows,), n_picked, dtype=torch.long)


def greedy_kcenter_extend(
    picked: torch.Tensor, rows: torch.Tensor, radius: float, *, min_d: torch.Tensor | None = None,
    candidates: int = DEFAULT_CANDIDATES, max_picks: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Continue greedy k-center from the centres `picked` [M, D] over new `rows` [N, D] until every
    row is within `radius` of a centre: (indices into `rows` of the new picks, in order; covering
    radius of the new rows after them). `min_d`: each row's distance to its nearest centre (computed
    here by brute force when not given) — the greedy run's starting minima."""
    xf = torch.cat([picked.detach().float(), rows.detach().float()]).contiguous()
    m = picked.shape[0]
    if min_d is None:
        min_d2 = torch.cat([torch.cdist(rows[i : i + 4096].float(), picked.float()).amin(1) for i in
                            range(0, rows.shape[0], 4096)]).pow(2)
    else:
        min_d2 = min_d.float().pow(2)
    floor = radius * radius
    limit = m + (max_picks if max_picks is not None else rows.shape[0])
    with torch_threads(refresh_threads()):
        state = _ExtendKCenter(xf, m, min_d2)
        while len(state.picks) < limit:
            tau = state.settle(candidates + 1)
            if float(state.values.max()) <= floor:
                break
            with torch_threads(1):
                state.pick_round(tau, limit, floor)
        radius_sq = state.settle(1)
    return torch.tensor(state.picks[m:], dtype=torch.long) - m, math.sqrt(max(radius_sq, 0.0))


def refresh_threads() -> int:
    """Threads for the refreshes: all of torch's while no other process is running, else half of
    them (at least one).

    Every refresh op ends at a thread barrier, so a thread that shares its core with another busy
    process stalls all of them. pcb 368,640 x 128 -> 36,864 on the 2-core EPYC: 34-41 s on 2 threads
    and 56-60 s on 1 when the machine is quiet, but 121 s on 2 threads and 63 s on 1 beside one other
    busy process. Half the threads keep a many-core machine's GEMMs parallel with room to spare.
    The threads change only the speed, never the picks."""
    threads = torch.get_num_threads()
    return threads if _machine_idle() else max(1, threads // 2)


def _machine_idle(samples: int = 5, gap_s: float = 0.01) -> bool:
    """Whether this process's reading thread is the only runnable one on the machine now (Linux
    /proc/loadavg's running count, sampled a few times); False where it cannot be read."""
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return False
        if running > 1:
            return False
        time.sleep(gap_s)
    return True
