"""Triton kernels against float64: on a GPU compiled, elsewhere in the CPU interpreter, fp32.

Without CUDA this module sets TRITON_INTERPRET=1 before Triton is imported (kernels.* import
Triton only at their first Triton call; Triton fixes interpreter mode at its own import).
Low-precision tl.dot (bf16) is mishandled by the interpreter: those modes are checked on the GPU
by benchmarks/device_kernels.sh. Sizes are tiny because the interpreter runs every program in
Python; the blocks are the launchers' interpreter tiles (>= 16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this module alone",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import kernels.knn as knn  # noqa: E402
from kernels.coreset import greedy_kcenter_with_radius  # noqa: E402
from kernels.mahalanobis import mahalanobis, precision_factor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def float64_topk(q: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(torch.cdist(q.double(), bank.double()), k, dim=1, largest=False)


def data(n_q: int, n_bank: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_q, dim, generator=gen).to(DEVICE), torch.randn(n_bank, dim, generator=gen).to(DEVICE)


@pytest.mark.parametrize(
    ("n_q", "n_bank", "dim", "k"),
    [
        (1, 1, 5, 1),  # Q = 1, M = 1
        (37, 50, 20, 1),  # M and Q not multiples of the blocks, D not a multiple of 16
        (20, 70, 33, 5),
        (3, 20, 1536, 3),  # wide features
        (17, 40, 7, 16),  # the longest list the tests sweep
    ],
)
def test_knn_fp32_matches_float64(n_q: int, n_bank: int, dim: int, k: int) -> None:
    q, bank = data(n_q, n_bank, dim, seed=n_bank)
    dist, idx = knn.topk(q, bank, k, backend="triton", precision="fp32")
    ref_d, ref_i = float64_topk(q, bank, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64 and dist.shape == (n_q, k)
    assert torch.equal(idx.cpu(), ref_i.cpu())
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)


def test_knn_bank_split_over_programs_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "MIN_SPLIT_ROWS", 16)  # 2 bank splits, merged on the host
    q, bank = data(9, 45, 12, seed=1)
    norms = knn.sq_norms(bank)
    dist, idx = knn.topk_triton(q, bank, 4, norms, precision="fp32")
    ref_d, ref_i = float64_topk(q, bank, 4)
    assert torch.equal(idx.cpu(), ref_i.cpu())
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)


def test_knn_exact_mode_reranks_to_fp32() -> None:
    # Near-duplicate bank rows: the half-precision pass cannot order them, the re-rank must.
    q, bank = data(21, 30, 24, seed=2)
    jitter = torch.randn(bank.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bank = torch.cat([bank, bank + 1e-3 * jitter])
    dist, idx = knn.topk_triton(q, bank, 3, precision="exact", candidate_precision="fp16")
    ref_d, ref_i = float64_topk(q, bank, 3)
    assert torch.equal(idx.cpu(), ref_i.cpu())
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-6, atol=1e-6)


def test_knn_refuses_bad_k_and_precision() -> None:
    q, bank = data(2, 5, 4, seed=4)
    with pytest.raises(ValueError, match=r"k must be in \[1, bank rows = 5\], got 6"):
        knn.topk(q, bank, 6, backend="triton")
    with pytest.raises(ValueError, match="precision must be one of"):
        knn.topk(q, bank, 1, backend="triton", precision="int8")


@pytest.mark.parametrize(("batch", "positions", "dim"), [(1, 1, 1), (3, 5, 20), (17, 2, 70)])
def test_mahalanobis_matches_float64(batch: int, positions: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    x, mean = torch.randn(batch, positions, dim, generator=gen), torch.randn(positions, dim, generator=gen)
    a = torch.randn(positions, dim, dim, generator=gen)
    precision = torch.linalg.inv(a @ a.transpose(1, 2) / dim + 0.01 * torch.eye(dim)).float()
    x, mean, precision = x.to(DEVICE), mean.to(DEVICE), precision.to(DEVICE)
    diff = x.double() - mean.double()
    ref = torch.einsum("bpi,pij,bpj->bp", diff, precision.double(), diff).sqrt()
    direct = mahalanobis(x, mean, precision, backend="triton")
    factored = mahalanobis(x, mean, precision, backend="triton", factor=precision_factor(precision))
    for got in (direct, factored):
        assert got.shape == (batch, positions) and got.dtype == torch.float32
        assert float(((got.double() - ref) / ref).abs().max()) <= 1e-3


@pytest.mark.parametrize(("rows", "dim", "n"), [(1, 3, 1), (50, 20, 10), (30, 5, 30)])
def test_coreset_matches_float64(rows: int, dim: int, n: int) -> None:
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
    start = min(3, rows - 1)
    picks, radius = greedy_kcenter_with_radius(x.to(DEVICE), n, start=start, backend="triton")
    xd = x.double()
    min_d2 = torch.full((rows,), float("inf"), dtype=torch.float64)
    expected = [start]
    for _ in range(n):
        torch.minimum(min_d2, (xd - xd[expected[-1]]).pow(2).sum(1), out=min_d2)
        min_d2[expected[-1]] = -1.0
        expected.append(int(torch.argmax(min_d2)))
    assert picks.tolist() == expected[:n]
    assert radius == pytest.approx(float(min_d2.max().clamp_min(0).sqrt()), rel=1e-5, abs=1e-6)


def test_auto_backend_stays_on_torch_for_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, "topk_triton", None)  # would raise if auto picked Triton on a CPU
    q, bank = (t.cpu() for t in data(4, 9, 6, seed=5))
    assert torch.equal(knn.topk(q, bank, 2)[1], float64_topk(q, bank, 2)[1])


def test_interpreter_set_before_import_in_a_fresh_process() -> None:
    code = (
        "import torch, kernels.knn as knn\n"
        "q, b = torch.randn(5, 20), torch.randn(33, 20)\n"
        "d, i = knn.topk(q, b, 2, backend='triton', precision='fp32')\n"
        "assert torch.equal(i, torch.cdist(q.double(), b.double()).topk(2, largest=False).indices)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(("n_q", "n_bank", "dim", "k"), [(37, 70, 20, 1), (20, 90, 33, 5)])
def test_knn_excluding_owners_matches_float64(n_q: int, n_bank: int, dim: int, k: int) -> None:
    q, bank = data(n_q, n_bank, dim, seed=n_bank)
    b_owner = (torch.arange(n_bank) // 7).to(DEVICE)
    q_owner = (torch.arange(n_q) % (n_bank // 7 + 1)).to(DEVICE)
    q[:5] = bank[torch.arange(5) * 7]  # copies of their own owner's rows: excluded, not found at 0
    q_owner[:5] = b_owner[torch.arange(5) * 7]
    for precision in ("fp32", "exact") if DEVICE == "cuda" else ("fp32",):
        dist, idx = knn.topk(q, bank, k, backend="triton", precision=precision, query_owner=q_owner, bank_owner=b_owner)
        ref = torch.cdist(q.double(), bank.double())
        ref[q_owner[:, None] == b_owner[None, :]] = float("inf")
        ref_d, ref_i = torch.topk(ref, k, dim=1, largest=False)
        assert torch.equal(idx.cpu(), ref_i.cpu())
        torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)


def test_knn_exclusion_leaving_fewer_than_k_rows_gives_inf() -> None:
    q, bank = data(3, 40, 16, seed=1)
    b_owner = torch.zeros(40, dtype=torch.int32, device=DEVICE)
    b_owner[:2] = 1
    dist, idx = knn.topk(q, bank, 4, backend="triton", precision="fp32",
                         query_owner=torch.zeros(3, dtype=torch.int32, device=DEVICE), bank_owner=b_owner)
    assert torch.isfinite(dist[:, :2]).all() and torch.isinf(dist[:, 2:]).all()
    assert set(idx[:, :2].reshape(-1).tolist()) <= {0, 1}
