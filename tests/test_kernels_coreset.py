"""Greedy k-center: the lazy CPU path and the dispatcher against brute force references."""

from __future__ import annotations

import pytest
import torch

import kernels.coreset_cpu as coreset_cpu
from kernels.coreset import (
    greedy_kcenter,
    greedy_kcenter_torch,
    greedy_kcenter_with_radius,
)
from kernels.coreset_cpu import greedy_kcenter_lazy


@pytest.fixture(autouse=True, params=["bf16", "fp32"])
def refresh_gemm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the refresh GEMM on bf16 operands (native bf16 CPUs; emulated elsewhere)
    and on fp32 ones: the picks must not depend on it."""
    monkeypatch.setattr(coreset_cpu, "cpu_native_bf16", lambda: request.param == "bf16")
    return request.param


def clustered(n_rows: int, dim: int, n_clusters: int = 12, seed: int = 0) -> torch.Tensor:
    """Gaussian blobs of different spreads, like patch features: dense groups plus outliers."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen) * 4
    spread = torch.rand(n_clusters, 1, generator=gen) * 1.5 + 0.1
    which = torch.randint(n_clusters, (n_rows,), generator=gen)
    return centres[which] + torch.randn(n_rows, dim, generator=gen) * spread[which]


def brute_float64(x: torch.Tensor, n: int, start: int) -> tuple[torch.Tensor, float]:
    xd = x.double()
    min_d2 = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    picks = [start]
    for _ in range(n):
        torch.minimum(min_d2, (xd - xd[picks[-1]]).pow(2).sum(1), out=min_d2)
        min_d2[picks[-1]] = -1.0
        picks.append(int(torch.argmax(min_d2)))
    return torch.tensor(picks[:n]), float(min_d2.max().clamp_min(0).sqrt())


@pytest.mark.parametrize("candidates", [4, 50, 5000])
def test_lazy_equals_brute_force_on_clusters(candidates: int) -> None:
    # 4 candidates: hundreds of rounds, rows refreshed from many different points; 5000: one round
    x = clustered(2001, 16)
    picks, radius = greedy_kcenter_lazy(x, 200, start=7, candidates=candidates)
    assert torch.equal(picks, greedy_kcenter_torch(x, 200, start=7))
    ref_picks, ref_radius = brute_float64(x, 200, 7)
    assert torch.equal(picks, ref_picks)
    assert radius == pytest.approx(ref_radius, rel=1e-5)


def test_small_refresh_blocks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # blocks of 16 rows x 16 picks: every refresh spans many GEMM blocks in both directions
    x = clustered(3000, 24, seed=6)
    expected = greedy_kcenter_torch(x, 300, start=5)
    monkeypatch.setattr(coreset_cpu, "REFRESH_BLOCK", 16)
    picks, _ = greedy_kcenter_lazy(x, 300, start=5, candidates=32)
    assert torch.equal(picks, expected)


def test_lazy_all_rows_and_one_row() -> None:
    x = clustered(517, 9, seed=1)
    every, radius = greedy_kcenter_lazy(x, 517, start=3, candidates=16)
    assert torch.equal(every, greedy_kcenter_torch(x, 517, start=3))
    assert sorted(every.tolist()) == list(range(517))
    assert radius == 0.0
    one, radius_one = greedy_kcenter_lazy(x, 1, start=3)
    assert one.tolist() == [3]
    assert radius_one == pytest.approx(float(torch.cdist(x[3:4].double(), x.double()).max()), rel=1e-5)


@pytest.mark.parametrize("candidates", [3, 64])
def test_repeated_rows_give_distinct_picks(candidates: int) -> None:
    base = clustered(40, 5, seed=2)
    x = torch.cat([base, base, base[:10]])  # every row at least twice
    picks = greedy_kcenter_lazy(x, 90, candidates=candidates)[0]
    assert len(set(picks.tolist())) == 90
    # Repeated rows tie exactly, also across a round's threshold; both paths take the lowest row id.
    assert torch.equal(picks, greedy_kcenter_torch(x, 90))
    # once each distinct row is picked the rest are at distance 0: the first 40 picks cover all
    first, radius = greedy_kcenter_lazy(x, 40, candidates=candidates)
    assert radius == 0.0
    assert len({tuple(r) for r in x[first].tolist()}) == 40


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_near_equal_distances_are_told_apart(sign: float) -> None:
    # Squared distances 546.33325 and the next float up: their fp32 square roots can coincide,
    # so picks must be decided on the squared values.
    near = torch.tensor([[10.0, 21.1266]])  # (10^2 + 21.1266^2) rounds to 546.33325
    far = -torch.tensor([[10.0, 21.126602]])  # rounds to the next float, 546.3333
    assert float((far**2).sum()) > float((near**2).sum())
    filler = torch.randn(60, 2, generator=torch.Generator().manual_seed(5)) * 0.1
    x = torch.cat([torch.zeros(1, 2), sign * near, sign * far, filler])
    for candidates in (1, 2, 100):
        picks, _ = greedy_kcenter_lazy(x, 2, start=0, candidates=candidates)
        assert picks.tolist() == [0, 2]
    assert torch.equal(picks, greedy_kcenter_torch(x, 2, start=0))


def test_far_offset_rows_stay_exact() -> None:
    # Rows far from the origin with small spreads: the GEMM bound's rounding allowance matters.
    x = clustered(1500, 32, seed=7) * 0.05 + 300.0
    picks, radius = greedy_kcenter_lazy(x, 150, start=2, candidates=8)
    assert torch.equal(picks, greedy_kcenter_torch(x, 150, start=2))
    assert radius == pytest.approx(brute_float64(x, 150, 2)[1], rel=1e-4)


def test_dispatch_on_cpu_matches_reference_and_reports_radius() -> None:
    x = clustered(4200, 8, seed=4)
    picks, radius = greedy_kcenter_with_radius(x, 120, start=11)
    assert torch.equal(picks, greedy_kcenter_torch(x, 120, start=11))
    assert torch.equal(greedy_kcenter(x, 120, start=11), picks)
    covering = torch.cdist(x.double(), x[picks].double()).min(1).values.max()
    assert radius == pytest.approx(float(covering), rel=1e-5)
    small = x[:300]
    assert torch.equal(greedy_kcenter(small, 30, backend="torch"), greedy_kcenter_torch(small, 30))


@pytest.mark.parametrize(("n", "start"), [(0, 0), (11, 0), (3, 10), (3, -1)])
def test_bad_arguments_are_refused(n: int, start: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        greedy_kcenter(torch.zeros(10, 3), n, start=start)


def test_non_finite_rows_are_refused() -> None:
    x = clustered(50, 4)
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        greedy_kcenter(x, 5)


def test_extend_continues_the_greedy_run_down_to_the_radius() -> None:
    # A greedy run over all rows, stopped at radius r, equals: the first picks (from the old rows),
    # then the extension over the new rows from those picks, when the old rows come first.
    from kernels.coreset_cpu import greedy_kcenter_extend, greedy_kcenter_lazy

    gen = torch.Generator().manual_seed(3)
    old = torch.randn(600, 8, generator=gen)
    new = torch.randn(400, 8, generator=gen) + 1.5
    picks, radius = greedy_kcenter_lazy(old, 60)
    added, after = greedy_kcenter_extend(old[picks], new, radius)
    assert added.numel() > 0 and after <= radius + 1e-6
    bank = torch.cat([old[picks], new[added]])
    assert float(torch.cdist(new, bank).amin(1).max()) <= radius + 1e-5
    # Each pick was the farthest new row at its time (the brute-force continuation).
    d = torch.cdist(new, old[picks]).amin(1)
    for i in added.tolist():
        assert float(d[i]) == pytest.approx(float(d.max()), rel=1e-5)
        d = torch.minimum(d, torch.cdist(new, new[i : i + 1])[:, 0])
    assert float(d.max()) <= radius + 1e-5


def test_progress_reports_picks_so_far_up_to_n() -> None:
    x = clustered(3000, 16, seed=4)
    seen: list[int] = []
    picks, _ = greedy_kcenter_lazy(x, 400, start=1, candidates=32, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 400 and len(seen) > 1  # one call per round
    assert torch.equal(picks, greedy_kcenter_lazy(x, 400, start=1)[0])  # watching changes nothing
    done: list[int] = []
    greedy_kcenter_with_radius(x, 50, start=1, progress=done.append)
    assert done[-1] == 50
