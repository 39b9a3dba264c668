"""The CUDA-only behaviour of the kernel launchers, checked on a CPU (Triton interpreter and seams).

64-bit offsets, the device each launch runs on, the same k limits on both paths, tiles that are a
pure function of the shapes (no autotuning), TF32 operands rounded rather than truncated, and the
Lite0 width padded for the tile pass. What only a GPU can show (speed, wgmma, spills) is checked by
compiling for sm_90 (tests/test_compile_sm90.py) and on the GPU by benchmarks/device_all.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter seams: on a GPU machine run this module alone with TRITON_INTERPRET=1",
                allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this module alone",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import kernels._triton as _triton  # noqa: E402
import kernels.coreset as coreset  # noqa: E402
import kernels.knn as knn  # noqa: E402
import kernels.mahalanobis as mahalanobis  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def float64_topk(q: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(torch.cdist(q.double(), bank.double()), k, dim=1, largest=False)


def test_bank_offsets_past_2_31_elements_use_64_bit_arithmetic() -> None:
    # A row-strided view whose last row starts 2^31 elements in (8 GB of address space, 3 rows of it
    # touched): with 32-bit `cols * stride` the kernel reads a wrapped address (a crash, under the
    # interpreter), so it runs in a child process.
    code = (
        "import torch, kernels.knn as knn\n"
        "dim, stride = 16, 2**30\n"
        "bank = torch.empty(2 * stride + dim).as_strided((3, dim), (stride, 1))\n"
        "g = torch.Generator().manual_seed(0)\n"
        "bank.copy_(torch.randn(3, dim, generator=g))\n"
        "q = bank[[2, 1, 0]] + 0.01 * torch.randn(3, dim, generator=g)\n"
        "d, i = knn.topk(q, bank, 1, backend='triton', precision='fp32')\n"
        "assert i[:, 0].tolist() == [2, 1, 0], i\n"
        "d, i = knn.topk_triton(q, bank, 2, precision='exact', candidate_precision='fp16')\n"
        "ref = torch.cdist(q.double(), bank.clone().double()).topk(2, largest=False)\n"
        "assert torch.equal(i, ref.indices), (i, ref.indices)\n"
        "torch.testing.assert_close(d.double(), ref.values, rtol=1e-6, atol=1e-6)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.strip() == "ok"


def test_lite0_width_is_padded_for_the_tile_pass_and_distances_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[_triton.Launch] = []
    real_run = _triton.run
    monkeypatch.setattr(knn, "run", lambda launch: (launched.append(launch), real_run(launch))[1])
    gen = torch.Generator().manual_seed(7)
    bank, q = torch.randn(40, 152, generator=gen), torch.randn(9, 152, generator=gen)
    dist, idx = knn.topk(q, bank, 3, backend="triton", precision="fp32")
    tile = next(launch for launch in launched if launch.fn is knn._knn_tile_kernel)
    q_arg, bank_arg = tile.args[0], tile.args[1]
    assert q_arg.shape[1] == bank_arg.shape[1] == 160 and bank_arg.stride(0) % 16 == 0
    assert tile.args[7] == 160  # the kernel's `dim`
    ref_d, ref_i = float64_topk(q, bank, 3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)
    lowp = knn.lowp_bank(bank, "fp16")
    assert lowp.shape == (40, 160) and lowp.dtype == torch.float16 and not lowp[:, 152:].any()
    d2, i2 = knn.topk_triton(q, bank, 3, bank_lowp=lowp, candidate_precision="fp16")
    assert torch.equal(i2, ref_i)


@pytest.mark.parametrize("k", [28, 29, 40, 64, 65, 100])
def test_k_limit_is_the_same_on_the_triton_and_torch_paths(k: int) -> None:
    # Before: the exact mode kept 2k + 8 candidates and refused k >= 29 on CUDA, while the CPU took any k.
    gen = torch.Generator().manual_seed(k)
    bank, q = torch.randn(120, 12, generator=gen), torch.randn(5, 12, generator=gen)
    ref_d, ref_i = float64_topk(q, bank, k)
    for precision in ("fp32", "exact"):
        if precision == "exact" and k <= knn.MAX_K:
            dist, idx = knn.topk_triton(q, bank, k, precision="exact", candidate_precision="fp16")
        else:
            dist, idx = knn.topk(q, bank, k, backend="triton", precision=precision)
        assert torch.equal(idx, ref_i), precision
        torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-4)
    torch_d, torch_i = knn.topk(q, bank, k, backend="torch")
    assert torch.equal(torch_i, ref_i)
    assert knn.candidates_kept(k, "exact", None, 10_000) <= max(knn.MAX_K, k)


def test_every_launch_runs_on_the_device_of_its_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[str] = []
    real = _triton.on_device

    def recording(*tensors: torch.Tensor):
        entered.append(next(str(t.device) for t in tensors if isinstance(t, torch.Tensor)))
        return real(*tensors)

    monkeypatch.setattr(_triton, "on_device", recording)
    monkeypatch.setattr(coreset, "on_device", recording)
    gen = torch.Generator().manual_seed(3)
    q, bank = torch.randn(6, 20, generator=gen), torch.randn(30, 20, generator=gen)
    knn.topk_triton(q, bank, 2, precision="exact", candidate_precision="fp16")  # tile pass + re-rank
    assert entered == ["cpu", "cpu"]
    x, mean = torch.randn(2, 3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    prec = torch.eye(8).expand(3, 8, 8).contiguous()
    mahalanobis.mahalanobis(x, mean, prec, backend="triton", factor=mahalanobis.precision_factor(prec))
    coreset.greedy_kcenter(bank, 4, backend="triton")
    assert entered == ["cpu"] * 4
    assert isinstance(real(q), type(real()))  # CPU tensors: no device switch (a null context)


def test_tiles_are_a_pure_function_of_the_shapes() -> None:
    import triton

    # What a second process, tuning on a different first shape, would pick: the same tiles.
    code = (
        "import json, kernels.knn as knn, kernels.mahalanobis as m, kernels.coreset as c\n"
        "print(json.dumps([knn.tile_config(10, 'exact'), knn.tile_config(26, 'exact'), knn.tile_config(64, 'bf16'),"
        " knn.tile_config(1, 'fp32'), m.tile_config(True, 'tf32'), m.tile_config(False, 'tf32x3'), c.step_tile(128)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    import json

    here = [knn.tile_config(10, "exact"), knn.tile_config(26, "exact"), knn.tile_config(64, "bf16"),
            knn.tile_config(1, "fp32"), mahalanobis.tile_config(True, "tf32"),
            mahalanobis.tile_config(False, "tf32x3"), coreset.step_tile(128)]  # fmt: skip
    assert json.loads(out.stdout) == here
    # Every chosen tile is one of the listed ones (the set the compile check compiles).
    assert {tuple(sorted(t.items())) for t in here[:4]} <= {tuple(sorted(t.items())) for t in knn.KNN_TILES.values()}
    # No autotuner anywhere: a launch is the one kernel with the one tile.
    kernel, _ = _triton.jit_kernel(knn._knn_tile_kernel)
    assert not isinstance(kernel, triton.runtime.Autotuner)
    a = knn.tile_launch(torch.empty(64, 160, dtype=torch.bfloat16, device="meta"),
                        torch.empty(999, 160, dtype=torch.bfloat16, device="meta"), torch.empty(999, device="meta"),
                        10, "exact", torch.empty(1, device="meta"), torch.empty(1, device="meta"), 1)  # fmt: skip
    b = knn.tile_launch(torch.empty(65536, 160, dtype=torch.bfloat16, device="meta"),
                        torch.empty(19000, 160, dtype=torch.bfloat16, device="meta"), torch.empty(19000, device="meta"),
                        10, "exact", torch.empty(1, device="meta"), torch.empty(1, device="meta"), 4)  # fmt: skip
    assert a.config() == b.config()


def _tf32_round_reference(x: np.ndarray) -> np.ndarray:
    """Round fp32 to 10 mantissa bits, to nearest with ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((bits + 0x1000) & 0xFFFFE000) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


tl = None  # bound to triton.language by jit_kernel


def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, mahalanobis._round_tf32(tl.load(x_ptr + offs, mask=ok)), mask=ok)


def test_tf32_operands_are_rounded_to_nearest_not_truncated() -> None:
    x = np.array([1.0, 1.0 + 2.0**-11, 1.0 + 2.0**-11 + 2.0**-20, 1.0 + 2.0**-12, -1.0 - 2.0**-11, 3.14159265,
                  -2.718281828, 1e-30, 6.0e4], dtype=np.float32)  # fmt: skip
    _triton.bind_tl(mahalanobis._mahalanobis_kernel)  # jits the module's device function
    kernel, _ = _triton.jit_kernel(_round_kernel)
    out = torch.empty(len(x))
    kernel[(1,)](torch.from_numpy(x), out, len(x), BLOCK=16)
    expected = _tf32_round_reference(x)
    assert out.numpy().view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    assert out[1] == 1.0 + 2.0**-10 and out[3] == 1.0 and out[4] == -1.0 - 2.0**-10  # ties away, and below half
    assert not (out.numpy().view(np.uint32) & 0x1FFF).any()  # 10 mantissa bits left


def test_tf32_mode_error_is_unbiased_and_within_the_bound() -> None:
    # The interpreter's dot multiplies its operands exactly in fp32, so the kernel's only TF32 error is
    # its own rounding of the operands; the GPU's tensor cores would truncate unrounded ones instead.
    gen = torch.Generator().manual_seed(11)
    batch, positions, dim = 16, 2, 100
    a = torch.randn(positions, dim, dim, generator=gen)
    prec = torch.linalg.inv(a @ a.transpose(1, 2) / dim + 0.01 * torch.eye(dim)).float()
    mean = torch.randn(positions, dim, generator=gen)
    x = mean + torch.randn(batch, positions, dim, generator=gen)
    factor = mahalanobis.precision_factor(prec)
    diff = x.double() - mean.double()
    ref = torch.einsum("bpi,pij,bpj->bp", diff, prec.double(), diff).sqrt()
    got = mahalanobis.mahalanobis_triton(x, mean, prec, factor, "tf32").double()
    rounded_err = ((got - ref) / ref)
    # The same sum with operands truncated as the tensor cores do: biased low by about 2^-11 per operand.
    trunc = lambda t: (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32).double()  # noqa: E731
    proj = torch.einsum("bpk,pkn->bpn", trunc(x.float() - mean.float()), trunc(factor))
    truncated_err = (proj.pow(2).sum(2).sqrt() - ref) / ref
    assert float(rounded_err.abs().max()) < 3e-4
    assert abs(float(rounded_err.mean())) < 1e-4
    assert float(truncated_err.mean()) < -3e-4  # what the old kernel's error looked like: one-sided
