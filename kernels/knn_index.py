"""Exact k-nearest-neighbour index for the CPU: k-means cells with triangle and bisector bounds.

    index = KnnIndex.build(bank[M, D], seed=0)
    dist[Q, k], idx[Q, k] = index.search(queries[Q, D], k)   # same contract as kernels.knn.topk

Brute force on the CPU is one Q x M x D GEMM (PatchCore: 1,024 patches x 19,000 x 152 per image,
~55 ms at fp32 on 2 cores). Normal patches lie close to the bank, so nearly all of that GEMM is
spent on entries that cannot win. Here the bank is split into ~sqrt(M) k-means cells, each entry
in the cell of its nearest centre (a Voronoi cell, assigned in float64), with centre c_j and radius
r_j. For a query q whose nearest centre is c_a, every entry e of cell j satisfies

    d(q, e) >= d(q, c_j) - r_j                                         (triangle)
    d(q, e) >= (d(q, c_j)^2 - d(q, c_a)^2) / (2 d(c_a, c_j))            (distance to the bisector)

Banks of at most DENSE_BANK_ROWS rows (a small coreset) are searched densely instead, one
cache-sized block of queries at a time: there the per-cell loop costs more than the whole GEMM.

Search: (1) distances of all queries to all centres (one GEMM); (2) scan each query's own cell,
which gives an upper bound u = the k-th best distance so far; (3) scan only cells whose lower
bound is below u; a query far from the whole bank, whose bounds leave over DENSE_FRACTION of the
cells, is instead searched by one dense GEMM over the bank (no worse than brute force). Scans are batched per cell: the queries that need cell j form one GEMM with
cell j's entries. Distances are computed on residuals from the cell centre,

    ||q - e||^2 = ||q - c_j||^2 + ||e - c_j||^2 - 2 (q - c_j).(e - c_j)

so the expansion cancels on numbers of the size of the distances themselves, not of the raw
feature norms: results agree with a float64 brute force to ~1e-5 relative, and every bound carries
a margin above that error (tests/test_kernels_knn_index.py). Speed: benchmarks/results/kernels_knn_cpu.json.

Queries far from the whole bank, searched densely, run that GEMM in bf16 on CPUs with native bf16
(3x faster than fp32 there) and keep a wider candidate list, then prove it holds the true k nearest:
with u = 2^-8 the bf16 dot product is off by at most 4u |q| |e|, so every entry left out is at least
(its approximate distance - twice that) away; a query whose proof fails (0.1% of the far patches of
the bottle test set; near queries, whose neighbours crowd within the bound, fail more) is redone in
fp32. The answer is the same as the fp32 path's.

Exclusion (leave-one-out scores): built with `owner` (one integer per bank row, e.g. the training
image it came from), `search(queries, k, query_owner=)` never returns a row whose owner equals the
query's. Excluded rows get distance inf in every GEMM before any top-k or minimum, so the search
stays exact: a bound on all of a cell's rows is a bound on its rows that are left, and a cell
whose rows are all excluded yields only empty (inf) slots. Fewer than k rows left: distance inf.
"""

from __future__ import annotations

import math

import torch

from kernels._checks import check_2d, cpu_native_bf16
from kernels._threads import torch_threads
from kernels.knn import sq_norms

KMEANS_ITERS = 12
# Relative slack on bounds: fp32 expansion error on residuals is ~D * 2^-24 of the summed norms.
ERR_PER_DIM = 4 * 2.0**-24
BOUND_TOL = 1e-4
# Below this many queries the per-cell loop costs more than it saves: one GEMM over the bank.
MIN_QUERIES_FOR_CELLS = 512
# Banks of at most this many rows are searched densely: blocks of DENSE_BLOCK queries, one fp32
# GEMM each over the whole bank. Measured on 2 EPYC cores, 1 thread, with patches of the default
# bottle model on bank subsets (benchmarks/results/kernels_knn_cpu_small_banks.json): dense costs
# ~5 ns per query per row, the cells 6-25 us per query; dense wins up to 2,000 rows on normal
# patches and up to ~3,500 on unfamiliar ones.
DENSE_BANK_ROWS = 2500
DENSE_BLOCK = 256
# torch threads for build and search (see kernels/_threads.py).
INDEX_THREADS = 1
# A query whose bounds leave more than this fraction of the cells to scan is searched densely.
DENSE_FRACTION = 0.2
# Candidates beyond k kept before the exact re-rank: a guard against expansion rounding.
RERANK_EXTRA = 2
# bf16 dense search: extra candidates checked exactly, and the unit roundoff of bf16.
BF16_EXTRA = 48  # bottle test set's far patches: 72% proven with 16 extra, 99.9% with 48
BF16_U = 2.0**-8
BF16_ROWS = 128


class KnnIndex:
    """Exact kNN over a fixed bank; build once (a model load), search many batches."""

    def __init__(self, bank: torch.Tensor, centres: torch.Tensor, cell_of: torch.Tensor,
                 owner: torch.Tensor | None = None):
        self.bank = bank
        self.bank_sq_norms = sq_norms(bank)
        n_cells = centres.shape[0]
        order = torch.argsort(cell_of, stable=True)
        self.entry_ids = order  # cell-major position -> row of `bank`
        self.owner = None if owner is None else owner.to(torch.int64).cpu()
        self.entry_owner = None if owner is None else self.owner[order]  # cell-major
        counts = torch.bincount(cell_of, minlength=n_cells)
        self.offsets = [0, *torch.cumsum(counts, 0).tolist()]
        self.centres = centres
        # Bank-mean-centred copies for the GEMMs over all centres / all entries: smaller norms,
        # smaller expansion error.
        self.mean = bank.mean(0)
        self.centres_c = centres - self.mean
        self.centres_c_sq = self.centres_c.pow(2).sum(1)
        self.bank_c = bank - self.mean
        self.bank_c_sq = self.bank_c.pow(2).sum(1)
        self.bank_c_sq_max = float(self.bank_c_sq.max())
        self.residuals = (bank[order] - centres[cell_of[order]]).contiguous()
        self.residual_sq = self.residuals.pow(2).sum(1)
        self.residual_sq_max = torch.zeros(n_cells).scatter_reduce_(
            0, cell_of[order], self.residual_sq, "amax", include_self=False
        )
        self.radii = self.residual_sq_max.sqrt()  # sqrt is monotonic: the max of the roots
        self.centre_dist = torch.cdist(centres.double(), centres.double()).float()
        # Transposed bf16 copy for dense searches where the CPU has native bf16 (else None).
        self.bank_c_bf16_t = self.bank_c.T.contiguous().bfloat16() if cpu_native_bf16() else None
        self.bank_c_half_sq_neg = -0.5 * self.bank_c_sq
        self.bank_c_norm_max = float(self.bank_c_sq.max().sqrt())

    @classmethod
    def build(cls, bank: torch.Tensor, seed: int = 0, n_cells: int | None = None,
              owner: torch.Tensor | None = None) -> "KnnIndex":
        """Index `bank` (M x D, any float dtype; kept as float32 on the CPU); `owner` [M]: what
        `search(query_owner=)` excludes."""
        check_2d("bank", bank)
        if bank.shape[0] == 0:
            raise ValueError("bank is empty")
        if owner is not None and owner.shape != (bank.shape[0],):
            raise ValueError(f"owner must be [M] = [{bank.shape[0]}], got {list(owner.shape)}")
        bank = bank.detach().float().cpu().contiguous()
        m = bank.shape[0]
        cells = n_cells or max(1, round(math.sqrt(m)))
        # A few large GEMMs (k-means): the caller's threads help here, unlike in `search`.
        with torch_threads(max(INDEX_THREADS, torch.get_num_threads())):
            centres = _kmeans(bank, min(cells, m), seed)
            # Final assignment in float64 so each cell is exactly the Voronoi cell of its centre,
            # which the bisector bound relies on; empty cells are dropped.
            cell_of = _nearest_centre(bank.double(), centres.double())
            used, cell_of = torch.unique(cell_of, return_inverse=True)
            return cls(bank, centres[used].contiguous(), cell_of, owner)

    @property
    def n_cells(self) -> int:
        return self.centres.shape[0]

    def search(
        self, queries: torch.Tensor, k: int = 1, query_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dist[Q, k] float32 ascending Euclidean, idx[Q, k] int64 rows of `bank`); `query_owner`
        [Q]: rows of the bank with that owner are excluded (the index must have been built with one)."""
        check_2d("queries", queries)
        if queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries have {queries.shape[1]} dims but bank rows have {self.bank.shape[1]}")
        if not 1 <= k <= self.bank.shape[0]:
            raise ValueError(f"k must be in [1, bank rows = {self.bank.shape[0]}], got {k}")
        q = queries.detach().float().cpu().contiguous()
        q_owner = None
        if query_owner is not None:
            if self.owner is None:
                raise ValueError("this index was built without bank owners: it cannot exclude")
            if query_owner.shape != (q.shape[0],):
                raise ValueError(f"query_owner must be [Q] = [{q.shape[0]}], got {list(query_owner.shape)}")
            q_owner = query_owner.to(torch.int64).cpu()
        with torch_threads(INDEX_THREADS):
            if q.shape[0] < MIN_QUERIES_FOR_CELLS or self.n_cells == 1 or self.bank.shape[0] <= DENSE_BANK_ROWS:
                return self._search_dense(q, k, q_owner)
            return self._search_cells(q, k, q_owner)

    def _search_dense(
        self, q: torch.Tensor, k: int, q_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Few queries (the k = 9 reweighting) or a small bank: per block of DENSE_BLOCK queries
        (its distance matrix stays in cache) one fp32 GEMM over the bank-mean-centred bank picks
        candidates as a cell scan does, then their distances are recomputed as sum((q - e)^2)."""
        keep = min(k + RERANK_EXTRA, self.bank.shape[0])
        dist = torch.empty((q.shape[0], k))
        idx = torch.empty((q.shape[0], k), dtype=torch.long)
        tie_scale = 2 * ERR_PER_DIM * q.shape[1]
        bank_c_t = self.bank_c.T
        for start in range(0, q.shape[0], DENSE_BLOCK):
            block = slice(start, start + DENSE_BLOCK)
            qc = q[block] - self.mean
            # |q|^2 is the same along a row: left out, it changes no ranking (re-ranked exactly below).
            d2 = torch.mm(qc, bank_c_t).mul_(-2.0).add_(self.bank_c_sq)
            if q_owner is not None:
                assert self.owner is not None
                d2.masked_fill_(q_owner[block][:, None] == self.owner[None, :], float("inf"))
            tie = tie_scale * (qc.pow(2).sum(1, keepdim=True) + self.bank_c_sq_max)
            best_d = torch.full((d2.shape[0], keep), float("inf"))
            best_i = torch.zeros((d2.shape[0], keep), dtype=torch.long)
            for local, d, pos in _nearest_of(d2, keep, k, tie):
                best_d[local, : d.shape[1]] = d
                best_i[local, : d.shape[1]] = pos
            dist[block], idx[block] = self._rerank(q[block], best_i, k, best_d)
        return dist, idx

    def _dense_candidates(
        self, q: torch.Tensor, keep: int, q_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distances, indices) of `keep` candidates for the nearest entries: the proven
        exact `keep` nearest from a bf16 pass where the CPU has native bf16, else an fp32 GEMM's.
        With `q_owner` (exclusion) an inf distance means an empty slot."""
        if self.bank_c_bf16_t is None or self.bank.shape[0] <= keep + BF16_EXTRA:
            return self._dense_candidates_fp32(q, keep, q_owner)
        d, i = self._dense_candidates_bf16(q, keep, q_owner)
        failed = torch.isinf(d[:, 0]).nonzero().squeeze(1)
        if failed.numel():
            owner = None if q_owner is None else q_owner[failed]
            d[failed], i[failed] = self._dense_candidates_fp32(q[failed], keep, owner)
        return d, i

    def _dense_candidates_bf16(
        self, q: torch.Tensor, keep: int, q_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_dense_candidates`; rows whose proof fails come back with distance inf. Excluded
        entries rank last (key -inf), so the proof covers the entries left."""
        wide = keep + BF16_EXTRA
        d_out = torch.empty((q.shape[0], keep))
        i_out = torch.empty((q.shape[0], keep), dtype=torch.long)
        for start in range(0, q.shape[0], BF16_ROWS):  # row blocks: the block's scores stay in cache
            rows = slice(start, start + BF16_ROWS)
            qc = q[rows] - self.mean
            q_sq = qc.pow(2).sum(1)
            # Rank by q.e - |e|^2 / 2 (largest): the squared distance minus |q|^2, halved and negated.
            key = torch.mm(qc.bfloat16(), self.bank_c_bf16_t).float().add_(self.bank_c_half_sq_neg)
            if q_owner is not None:
                assert self.owner is not None
                key.masked_fill_(q_owner[rows][:, None] == self.owner[None, :], float("-inf"))
            top, cand = torch.topk(key, wide + 1, dim=1)
            exact = self._exact_sq(q[rows], cand[:, :wide])
            if q_owner is not None:
                exact.masked_fill_(torch.isinf(top[:, :wide]), float("inf"))  # excluded: empty slots
            d, pos = torch.topk(exact, keep, dim=1, largest=False)
            # Operand rounding (2u) and output rounding (u) of the dot, doubled in the expansion, plus
            # fp32 slack on the norms; an entry outside the list is at least `outside` - err away.
            outside = q_sq - 2 * top[:, wide]
            err = 8 * BF16_U * q_sq.sqrt() * self.bank_c_norm_max + 1e-4 * (q_sq + self.bank_c_norm_max**2)
            d[~(outside - err > d[:, keep - 1])] = float("inf")
            d_out[rows], i_out[rows] = d, cand.gather(1, pos)
        return d_out, i_out

    def _dense_candidates_fp32(
        self, q: torch.Tensor, keep: int, q_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximate squared distances, indices) of the `keep` best over the whole bank; rows
        of the query's owner (`q_owner`) are at inf."""
        qc = q - self.mean
        d2 = torch.addmm(qc.pow(2).sum(1, keepdim=True) + self.bank_c_sq, qc, self.bank_c.T, alpha=-2.0)
        if q_owner is not None:
            assert self.owner is not None
            d2.masked_fill_(q_owner[:, None] == self.owner[None, :], float("inf"))
        return torch.topk(d2, keep, dim=1, largest=False)

    def _exact_sq(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """[Q, C] squared distances sum((q - e)^2) computed directly (no expansion) to the candidates."""
        rows = self.bank.index_select(0, cand.reshape(-1)).view(*cand.shape, self.bank.shape[1])
        return rows.sub_(q[:, None, :]).pow_(2).sum(2)

    def _rerank(
        self, q: torch.Tensor, cand: torch.Tensor, k: int, cand_d: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact distances of the candidates, the k best ascending; slots whose `cand_d` is inf are
        empty (placeholders) and never chosen."""
        if cand_d is None:
            exact = self._exact_sq(q, cand)
        else:  # only the filled slots (k = 1 rows without a near tie fill one of k + RERANK_EXTRA)
            exact = torch.full(cand.shape, float("inf"))
            rows, slots = torch.isfinite(cand_d).nonzero(as_tuple=True)
            exact[rows, slots] = self.bank.index_select(0, cand[rows, slots]).sub_(q[rows]).pow_(2).sum(1)
        d, pos = (exact.min(1, keepdim=True) if k == 1 else torch.topk(exact, k, dim=1, largest=False))
        return d.sqrt_(), cand.gather(1, pos)

    def _search_cells(
        self, q: torch.Tensor, k: int, q_owner: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_q = q.shape[0]
        qc = q - self.mean
        q_sq = qc.pow(2).sum(1)
        to_centre = torch.addmm(q_sq[:, None] + self.centres_c_sq, qc, self.centres_c.T, alpha=-2.0)
        to_centre_err = ERR_PER_DIM * q.shape[1] * (q_sq[:, None] + self.centres_c_sq)
        own = to_centre.argmin(1)
        keep = min(k + RERANK_EXTRA, self.bank.shape[0])
        best_d = torch.full((n_q, keep), float("inf"))
        best_i = torch.zeros((n_q, keep), dtype=torch.long)
        for cell, members in _groups(own, self.n_cells):
            for rows, d, ids in self._scan(q, members, cell, keep, k, q_owner):
                best_d[rows, : d.shape[1]] = d
                best_i[rows, : d.shape[1]] = ids
        lower = self._lower_bounds(to_centre, to_centre_err, own)
        # The k-th best so far, plus the expansion error of residual distances (|q - c| + r)^2 wide.
        own_reach = to_centre.gather(1, own[:, None])[:, 0].clamp_min(0).sqrt() + self.radii[own]
        slack = ERR_PER_DIM * q.shape[1] * 2 * own_reach.pow(2)
        upper = (best_d[:, k - 1] + slack).clamp_min(0).sqrt() * (1 + BOUND_TOL) + BOUND_TOL
        need = lower < upper[:, None]
        need[torch.arange(n_q), own] = False
        # Queries far from the whole bank (bounds prune little) go to one dense GEMM instead.
        dense = need.sum(1) > DENSE_FRACTION * self.n_cells
        if bool(dense.any()):
            rows = dense.nonzero().squeeze(1)
            owner = None if q_owner is None else q_owner[rows]
            best_d[rows], best_i[rows] = self._dense_candidates(q[rows], keep, owner)
            need[rows] = False
        pairs = need.nonzero()  # (query, cell), query-major
        cells = pairs[:, 1]
        order = torch.argsort(cells, stable=True)
        groups = _groups(cells[order], self.n_cells, pairs[order, 0])
        found = [part for cell, members in groups for part in self._scan(q, members, cell, keep, k, q_owner)]
        if found:
            _merge_into(best_d, best_i, found)
        return self._rerank(q, best_i, k, best_d)

    def _lower_bounds(self, to_centre: torch.Tensor, err: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """[Q, n_cells] lower bounds on the distance from each query to each cell's entries."""
        low_sq = (to_centre - err).clamp_min(0)
        triangle = low_sq.sqrt() - self.radii * (1 + BOUND_TOL)
        own_sq = (to_centre.gather(1, own[:, None]) + err.gather(1, own[:, None])).clamp_min(0)
        gap = self.centre_dist[own] * (1 + BOUND_TOL)
        bisector = (low_sq - own_sq) / (2 * gap.clamp_min(1e-30))
        return torch.maximum(triangle, bisector) - BOUND_TOL

    def _scan(
        self, q: torch.Tensor, members: torch.Tensor, cell: int, keep: int, k: int,
        q_owner: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, ...]]:
        """[(rows, squared distances [m, t], entry ids [m, t])]: for queries `members`, the nearest
        entries of cell `cell`, ascending: t = min(keep, cell size), or t = 1 (below).

        k = 1 (every PatchCore patch): a row minimum is ~5x cheaper than a top-k, and the extra
        re-rank candidates only matter where another entry is within the expansion's rounding of
        the minimum; those rows get the full top-`keep`, the others their one nearest."""
        lo, hi = self.offsets[cell], self.offsets[cell + 1]
        rel = q.index_select(0, members) - self.centres[cell]
        rel_sq = rel.pow(2).sum(1, keepdim=True)
        d2 = torch.addmm(rel_sq + self.residual_sq[lo:hi], rel, self.residuals[lo:hi].T, alpha=-2.0)
        if q_owner is not None:
            assert self.entry_owner is not None
            mine = q_owner.index_select(0, members)[:, None] == self.entry_owner[lo:hi][None, :]
            d2.masked_fill_(mine, float("inf"))
        ids = self.entry_ids[lo:hi]
        # Two entries whose expansions each err by up to ERR_PER_DIM * D * (|rel|^2 + |res|^2).
        tie = 2 * ERR_PER_DIM * q.shape[1] * (rel_sq + self.residual_sq_max[cell])
        return [(members[local], d, ids[pos]) for local, d, pos in _nearest_of(d2, keep, k, tie)]


def _nearest_of(d2: torch.Tensor, keep: int, k: int, tie: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """[(local rows, squared distances [m, t], columns [m, t])] of the nearest columns of each row
    of the contiguous approximate distance matrix `d2`, ascending: t = min(keep, columns), or t = 1.

    k = 1 (every PatchCore patch): a row minimum (numpy's argmin: ~10x torch's min with indices on
    CPUs) is much cheaper than a top-k, and the extra re-rank candidates only matter where another
    column is within `tie` (the expansion's rounding, per row) of the minimum; those rows get the
    full top-`keep`, the others their one nearest."""
    take = min(keep, d2.shape[1])
    if k != 1 or take == 1:
        d, pos = torch.topk(d2, take, dim=1, largest=False)
        return [(torch.arange(d2.shape[0]), d, pos)]
    pos = torch.from_numpy(d2.numpy().argmin(1)).unsqueeze(1)
    v = d2.gather(1, pos)
    d2.scatter_(1, pos, float("inf"))  # the runner-up: the row minimum of the others
    tied = d2.amin(1, keepdim=True) <= v + tie
    d2.scatter_(1, pos, v)
    tied = tied.squeeze(1)
    if not bool(tied.any()):
        return [(torch.arange(d2.shape[0]), v, pos)]
    d_t, pos_t = torch.topk(d2[tied], take, dim=1, largest=False)
    alone = (~tied).nonzero().squeeze(1)
    return [(alone, v[alone], pos[alone]), (tied.nonzero().squeeze(1), d_t, pos_t)]


def _merge_into(best_d: torch.Tensor, best_i: torch.Tensor, found: list[tuple[torch.Tensor, ...]]) -> None:
    """Per query, the `keep` smallest of its running list and every (members, d, ids) of `found`:
    one sort by distance, one stable sort by query, then the first `keep` of each query's run."""
    n_q, keep = best_d.shape
    qids = [torch.arange(n_q).repeat_interleave(keep)]
    dists, ids = [best_d.reshape(-1)], [best_i.reshape(-1)]
    for members, d, e in found:
        qids.append(members.repeat_interleave(d.shape[1]) if d.shape[1] > 1 else members)
        dists.append(d.reshape(-1))
        ids.append(e.reshape(-1))
    all_q, all_d, all_i = torch.cat(qids), torch.cat(dists), torch.cat(ids)
    order = torch.argsort(all_d, stable=True)
    order = order[torch.argsort(all_q[order], stable=True)]
    q_sorted = all_q[order]
    counts = torch.bincount(q_sorted, minlength=n_q)
    rank = torch.arange(q_sorted.numel()) - (torch.cumsum(counts, 0) - counts)[q_sorted]
    sel = rank < keep
    best_d[q_sorted[sel], rank[sel]] = all_d[order][sel]
    best_i[q_sorted[sel], rank[sel]] = all_i[order][sel]


def _groups(keys_sorted_or_not: torch.Tensor, n_cells: int, values: torch.Tensor | None = None):
    """(cell, member query ids) for each non-empty cell; `values` are given sorted by key."""
    if values is None:
        order = torch.argsort(keys_sorted_or_not, stable=True)
        keys, values = keys_sorted_or_not[order], order
    else:
        keys = keys_sorted_or_not
    counts = torch.bincount(keys, minlength=n_cells).tolist()
    start = 0
    for cell, count in enumerate(counts):
        if count:
            yield cell, values[start : start + count]
            start += count


def _nearest_centre(rows: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([torch.cdist(rows[i : i + chunk], centres).argmin(1) for i in range(0, rows.shape[0], chunk)])


def _kmeans(rows: torch.Tensor, n_cells: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means from a seeded sample of rows; an emptied centre is reseeded on a far row."""
    gen = torch.Generator().manual_seed(seed)
    centres = rows[torch.randperm(rows.shape[0], generator=gen)[:n_cells]].clone()
    row_sq = rows.pow(2).sum(1, keepdim=True)
    for _ in range(KMEANS_ITERS):
        d2 = torch.addmm(row_sq + centres.pow(2).sum(1), rows, centres.T, alpha=-2.0)
        near_d2, cell_of = d2.min(1)
        counts = torch.bincount(cell_of, minlength=n_cells)
        sums = torch.zeros_like(centres).index_add_(0, cell_of, rows)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].float()
        empty = (~filled).nonzero().squeeze(1)
        if empty.numel():
            centres[empty] = rows[torch.topk(near_d2, empty.numel()).indices]
    return centres.contiguous()
