"""The exact CPU kNN index against float64 brute force and the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import knn_index
from kernels._checks import cpu_native_bf16
from kernels.knn import sq_norms, topk_torch
from kernels.knn_index import MIN_QUERIES_FOR_CELLS, KnnIndex


def blobs(n_rows: int, dim: int, seed: int, n_clusters: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen) * 6 + 40  # far from the origin, like features
    which = torch.randint(n_clusters, (n_rows,), generator=gen)
    return centres[which] + torch.randn(n_rows, dim, generator=gen) * (0.3 + torch.rand(n_rows, 1, generator=gen))


def near_and_far_queries(bank: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Half near bank rows (normal patches), half pushed away from the bank (anomalies)."""
    gen = torch.Generator().manual_seed(seed)
    rows = bank[torch.randint(bank.shape[0], (n,), generator=gen)]
    near = rows[: n // 2] + 0.05 * torch.randn(n // 2, bank.shape[1], generator=gen)
    far = rows[n // 2 :] + 4.0 * torch.randn(n - n // 2, bank.shape[1], generator=gen)
    return torch.cat([near, far])


def float64_topk(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(queries.double(), bank.double())
    return torch.topk(d, k, dim=1, largest=False)


@pytest.fixture(autouse=True)
def cells_even_for_small_banks(monkeypatch: pytest.MonkeyPatch) -> None:
    """These banks are small: search them with the cells (tests of the dense path set it back)."""
    monkeypatch.setattr(knn_index, "DENSE_BANK_ROWS", 0)


@pytest.fixture(scope="module")
def bank() -> torch.Tensor:
    return blobs(3001, 37, seed=0)


@pytest.fixture(scope="module")
def index(bank: torch.Tensor) -> KnnIndex:
    return KnnIndex.build(bank, seed=0)


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("n_queries", [7, MIN_QUERIES_FOR_CELLS + 300])  # few-query path, cell path
def test_search_is_exact(index: KnnIndex, bank: torch.Tensor, k: int, n_queries: int) -> None:
    queries = near_and_far_queries(bank, n_queries, seed=k)
    dist, idx = index.search(queries, k)
    ref_d, ref_i = float64_topk(queries, bank, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64 and dist.shape == (n_queries, k)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref_i)
    # The torch reference expands ||q||^2 - 2 q.b + ||b||^2 on raw norms: never closer to float64.
    torch_d, torch_i = topk_torch(queries, bank, k)
    assert (dist.double() - ref_d).abs().max() <= (torch_d.double() - ref_d).abs().max()
    assert (idx[:, 0] == torch_i[:, 0]).float().mean() > 0.99


def test_queries_on_bank_rows_find_themselves(index: KnnIndex, bank: torch.Tensor) -> None:
    rows = torch.arange(0, bank.shape[0], 3)[:MIN_QUERIES_FOR_CELLS + 10]
    dist, idx = index.search(bank[rows], 1)
    assert torch.equal(idx[:, 0], rows)
    assert float(dist.max()) == 0.0


def test_index_exposes_bank_and_norms(index: KnnIndex, bank: torch.Tensor) -> None:
    assert torch.equal(index.bank, bank)
    torch.testing.assert_close(index.bank_sq_norms, sq_norms(bank))
    assert 20 <= index.n_cells <= 60  # ~sqrt(M) cells, empty ones dropped
    again = KnnIndex.build(bank, seed=0)
    assert torch.equal(again.centres, index.centres)


def test_tiny_banks_and_repeated_rows() -> None:
    one = KnnIndex.build(torch.ones(1, 5))
    dist, idx = one.search(torch.zeros(600, 5), 1)
    assert idx.unique().tolist() == [0]
    torch.testing.assert_close(dist, torch.full((600, 1), 5**0.5))
    base = blobs(50, 8, seed=3)
    repeated = torch.cat([base, base, base])
    queries = near_and_far_queries(base, 600, seed=4)
    dist, idx = KnnIndex.build(repeated, n_cells=9).search(queries, 5)
    ref_d, _ = float64_topk(queries, repeated, 5)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    got = torch.linalg.vector_norm(repeated[idx].double() - queries[:, None].double(), dim=2)
    torch.testing.assert_close(got, ref_d, rtol=1e-5, atol=1e-5)  # the indices carry those distances


def test_k1_cell_path_resolves_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries a rounding error apart: the k = 1 row-minimum path re-ranks them and finds the true one."""
    base = blobs(400, 24, seed=9)
    nudge = torch.randn(400, 24, generator=torch.Generator().manual_seed(10)) * 1e-5
    bank = torch.cat([base, base + nudge])  # every entry has a twin a hair away
    queries = near_and_far_queries(base, 800, seed=11)
    index = KnnIndex.build(bank, n_cells=20)
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(a[0].shape) or real_topk(*a, **kw))
    dist, idx = index.search(queries, 1)
    exact = (bank[None] - queries[:, None]).pow(2).sum(2)  # the direct fp32 distances the index re-ranks by
    best = exact.min(1).values
    assert torch.equal(exact.gather(1, idx)[:, 0], best)  # the nearest twin (or one tied with it exactly)
    assert torch.equal(dist[:, 0], best.sqrt())
    assert calls  # the tied rows took the full top-k


def test_bad_arguments_are_refused(index: KnnIndex) -> None:
    with pytest.raises(ValueError, match="k must be in"):
        index.search(torch.zeros(3, 37), index.bank.shape[0] + 1)
    with pytest.raises(ValueError, match="dims"):
        index.search(torch.zeros(3, 36), 1)
    with pytest.raises(ValueError, match="empty"):
        KnnIndex.build(torch.zeros(0, 4))


@pytest.mark.parametrize("dense_fraction", [0.0, 1.0])  # every query dense / never dense
def test_dense_fallback_and_pure_cell_scans_agree(
    index: KnnIndex, bank: torch.Tensor, monkeypatch: pytest.MonkeyPatch, dense_fraction: float
) -> None:
    import kernels.knn_index as knn_index

    monkeypatch.setattr(knn_index, "DENSE_FRACTION", dense_fraction)
    queries = near_and_far_queries(bank, MIN_QUERIES_FOR_CELLS + 50, seed=9)
    dist, idx = index.search(queries, 3)
    ref_d, ref_i = float64_topk(queries, bank, 3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_native_bf16(), reason="this CPU has no native bf16: the index uses fp32 only")
@pytest.mark.parametrize("k", [1, 9])
def test_bf16_dense_pass_is_proven_exact(bank: torch.Tensor, index: KnnIndex, k: int) -> None:
    keep = k + knn_index.RERANK_EXTRA
    # Spread-out entries and queries displaced from them (real features are like this: the far
    # patches of the bottle test set all pass the proof): the proof must hold and be right.
    gen = torch.Generator().manual_seed(5)
    spread = torch.randn(2000, 37, generator=gen) * 10
    queries = spread[:200] + torch.randn(200, 37, generator=gen) * 2
    sparse = KnnIndex.build(spread, seed=0)
    d16, i16 = sparse._dense_candidates_bf16(queries, keep)
    assert torch.isfinite(d16[:, 0]).all()
    assert torch.equal(i16[:, :k], float64_topk(queries, spread, k)[1])
    # Crowded clusters: the proof fails for most rows, which are redone in fp32; the search
    # answers exactly what the fp32-only index answers.
    queries = near_and_far_queries(bank, 300, seed=7)
    assert torch.isinf(index._dense_candidates_bf16(queries, keep)[0][:, 0]).any()
    fp32 = KnnIndex.build(bank, seed=0)
    fp32.bank_c_bf16_t = None
    for a, b in zip(index.search(queries, k), fp32.search(queries, k), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not cpu_native_bf16(), reason="this CPU has no native bf16: the index uses fp32 only")
def test_bf16_rows_whose_proof_fails_are_redone_in_fp32(
    bank: torch.Tensor, index: KnnIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = near_and_far_queries(bank, 64, seed=8)
    monkeypatch.setattr(knn_index, "BF16_U", 1.0)  # an error bound no candidate list can beat
    d16, _ = index._dense_candidates_bf16(queries, 3)
    assert torch.isinf(d16[:, 0]).all()
    d, i = index.search(queries, 1)
    ref_d, ref_i = float64_topk(queries, bank, 1)
    assert torch.equal(i, ref_i) and torch.allclose(d.double(), ref_d, rtol=1e-5)


def float64_topk_excluding(queries: torch.Tensor, bank: torch.Tensor, k: int, q_owner: torch.Tensor,
                           b_owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(queries.double(), bank.double())
    d[q_owner[:, None] == b_owner[None, :]] = float("inf")
    return torch.topk(d, k, dim=1, largest=False)


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("n_queries", [7, MIN_QUERIES_FOR_CELLS + 300])
def test_search_excluding_owners_is_exact(bank: torch.Tensor, k: int, n_queries: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = KnnIndex._dense_candidates_bf16
    monkeypatch.setattr(KnnIndex, "_dense_candidates_bf16",
                        lambda self, q, keep, q_owner=None: (calls.append(q_owner is not None), real(self, q, keep, q_owner))[1])
    # Owners in runs of 30 rows: whole neighbourhoods of a query vanish, as an image's own patches do.
    b_owner = torch.arange(bank.shape[0]) // 30
    index = KnnIndex.build(bank, seed=0, owner=b_owner)
    gen = torch.Generator().manual_seed(k)
    rows = torch.randint(bank.shape[0], (n_queries,), generator=gen)
    queries = near_and_far_queries(bank, n_queries, seed=k)
    queries[: n_queries // 2] = bank[rows[: n_queries // 2]]  # exact copies of own rows: ties at 0
    q_owner = b_owner[rows]
    dist, idx = index.search(queries, k, query_owner=q_owner)
    ref_d, ref_i = float64_topk_excluding(queries, bank, k, q_owner, b_owner)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert not bool((b_owner[idx] == q_owner[:, None]).any())
    assert torch.equal(idx[:, 0], ref_i[:, 0]) or bool(torch.isclose(dist[:, 0].double(), ref_d[:, 0]).all())
    # Without the exclusion the copies find themselves at distance 0.
    plain_d, _ = index.search(queries, k)
    assert float(plain_d[: n_queries // 2, 0].max()) == 0.0 and float(dist[: n_queries // 2, 0].min()) > 0
    if n_queries > MIN_QUERIES_FOR_CELLS and k == 9 and cpu_native_bf16():
        assert True in calls  # the far queries' dense bf16 search ran with the exclusion


@pytest.mark.parametrize("k", [1, 9])
def test_small_banks_are_searched_densely_and_exactly(bank: torch.Tensor, k: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    b_owner = torch.arange(bank.shape[0]) // 30
    index = KnnIndex.build(bank, seed=0, owner=b_owner)
    queries = near_and_far_queries(bank, 2 * knn_index.DENSE_BLOCK + 77, seed=11)  # a partial last block
    queries[:40] = bank[:40]  # exact copies: ties at 0 with themselves
    q_owner = torch.randint(0, int(b_owner.max()) + 1, (queries.shape[0],), generator=torch.Generator().manual_seed(1))
    q_owner[:40] = b_owner[:40]
    cells = [index.search(queries, k), index.search(queries, k, query_owner=q_owner)]
    monkeypatch.setattr(knn_index, "DENSE_BANK_ROWS", bank.shape[0])
    monkeypatch.setattr(KnnIndex, "_search_cells", lambda *a: pytest.fail("a small bank went to the cells"))
    plain_d, plain_i = index.search(queries, k)
    ref_d, ref_i = float64_topk(queries, bank, k)
    torch.testing.assert_close(plain_d.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain_i, ref_i) and float(plain_d[:40, 0].max()) == 0.0
    dist, idx = index.search(queries, k, query_owner=q_owner)
    ref_d, _ = float64_topk_excluding(queries, bank, k, q_owner, b_owner)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
    assert not bool((b_owner[idx] == q_owner[:, None]).any()) and float(dist[:40, 0].min()) > 0
    for (cd, ci), (dd, di) in zip(cells, [(plain_d, plain_i), (dist, idx)], strict=True):
        torch.testing.assert_close(dd, cd, rtol=1e-6, atol=1e-6)
        assert (di == ci).float().mean() > 0.999


@pytest.mark.parametrize("dense_rows", [0, 10_000])  # cells / the small-bank dense path
def test_exclusion_with_ties_and_whole_cells_excluded(dense_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_index, "DENSE_BANK_ROWS", dense_rows)
    # Duplicated rows (exact ties) and one owner per k-means cell: a query's own cell is all excluded.
    base = blobs(40, 6, seed=5, n_clusters=4)
    bank = torch.cat([base, base, base])  # every row three times: ties between owners
    index = KnnIndex.build(bank, seed=0, n_cells=4)
    cell_owner = torch.zeros(bank.shape[0], dtype=torch.long)
    for cell in range(index.n_cells):
        lo, hi = index.offsets[cell], index.offsets[cell + 1]
        cell_owner[index.entry_ids[lo:hi]] = cell
    index = KnnIndex.build(bank, seed=0, n_cells=4, owner=cell_owner)
    queries = torch.cat([bank[torch.arange(0, 120, 1)]] * 6)[: MIN_QUERIES_FOR_CELLS + 50]
    q_owner = cell_owner[torch.arange(queries.shape[0]) % 120]
    for k in (1, 3):
        dist, idx = index.search(queries, k, query_owner=q_owner)
        ref_d, _ = float64_topk_excluding(queries, bank, k, q_owner, cell_owner)
        torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)
        assert not bool((cell_owner[idx] == q_owner[:, None]).any())


def test_fewer_rows_left_than_k_give_inf_and_owner_errors() -> None:
    bank = blobs(20, 4, seed=1)
    owner = torch.zeros(20, dtype=torch.long)
    owner[:3] = 1
    index = KnnIndex.build(bank, owner=owner)
    dist, idx = index.search(bank[3:5], 5, query_owner=torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(dist[:, :3]).all() and torch.isinf(dist[:, 3:]).all()
    assert set(idx[:, :3].reshape(-1).tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="without bank owners"):
        KnnIndex.build(bank).search(bank[:2], 1, query_owner=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="query_owner must be"):
        index.search(bank[:2], 1, query_owner=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("k", [1, 4])
def test_torch_path_excludes_owners(k: int) -> None:
    bank = blobs(500, 12, seed=2)
    b_owner = torch.arange(500) // 10
    queries = bank[::7] + 0.01
    q_owner = b_owner[::7]
    dist, idx = topk_torch(queries, bank, k, query_owner=q_owner, bank_owner=b_owner)
    ref_d, _ = float64_topk_excluding(queries, bank, k, q_owner, b_owner)
    # The plain expansion on raw norms (~40 here) errs by ~1e-2: the exclusion is what is checked.
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-2, atol=2e-2)
    assert not bool((b_owner[idx] == q_owner[:, None]).any())
