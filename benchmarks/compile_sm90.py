"""Compile every Triton kernel, in every tile its launcher can choose, for the H200 (sm_90), on a CPU.

    bash benchmarks/compile_sm90.sh            # triton 3.6 (the GPU machine's) from ./.triton36
    python benchmarks/compile_sm90.py [--quick] [--out FILE] [--require-triton 3.6]

The launches are the launchers' own (kernels.*.*_launch), built on meta tensors of the default shapes:
PatchCore with Lite0 (D = 152, padded to 160 for the tile pass) and WRN50 (D = 1,536) at 256 px,
64 images x 1,024 patches per micro-batch; PaDiM Lite0 (D = 176) and WRN50 (D = 550) on 4,096
positions; the coreset on the 128-dim projection. Every (list length, operand mode) the kNN tile
chooser can return is compiled, and every Mahalanobis mode. Rows marked `default` are the configs
the default shapes run; the goal is status ok everywhere, the dot on the tensor cores (wgmma) wherever
its operands are TF32/bf16/fp16, and no spills on default rows.

Writes benchmarks/results/compile_sm90.json (or --out): machine, versions, command, and per launch:
kernel, case, tile, status, registers, spill bytes, stack, shared memory, wgmma / cp.async counts.
--quick compiles the default rows only (what tests/test_compile_sm90.py checks with the project's
own Triton). Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # not benchmarks/: keep `kernels` the package

import torch  # noqa: E402

from kernels import coreset, knn, mahalanobis  # noqa: E402
from kernels._compile import compile_launch  # noqa: E402
from kernels._triton import Launch  # noqa: E402

QUERIES = 64 * 1024  # one CUDA micro-batch of 256 px images: 64 x 32 x 32 patches
REWEIGHT_QUERIES = 64  # the k = 9 reweighting: one row per image
BANKS = {"Lite0": (152, 19_000), "WRN50": (1536, 16_384)}
PADIM = {"Lite0": 176, "WRN50": 550}
POSITIONS, PADIM_BATCH = 4096, 64
CORESET_ROWS, CORESET_DIM = 400_000, 128


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def knn_tile(dim: int, n_bank: int, n_q: int, k: int, precision: str, pad: bool = True) -> Launch:
    width = knn.padded_dim(dim) if pad else dim
    dtype = torch.float32 if precision in knn.MODES else (torch.float16 if precision == "fp16" else torch.bfloat16)
    q, bank = meta(n_q, width, dtype=dtype), meta(n_bank, width, dtype=dtype)
    splits = knn.bank_splits(n_q, n_bank, knn.H200_SMS)
    out_d, out_i = meta(splits, n_q, k), meta(splits, n_q, k, dtype=torch.int32)
    return knn.tile_launch(q, bank, meta(n_bank), k, precision, out_d, out_i, splits)


def knn_rerank(dim: int, n_bank: int, n_q: int, n_cand: int) -> Launch:
    return knn.rerank_launch(meta(n_q, dim), meta(n_bank, dim), meta(n_q, n_cand, dtype=torch.int32), meta(n_q, n_cand))


def padim_launch(dim: int, triangular: bool, mode: str) -> Launch:
    x, mean, w = meta(PADIM_BATCH, POSITIONS, dim), meta(POSITIONS, dim), meta(POSITIONS, dim, dim)
    return mahalanobis.mahalanobis_launch(x, mean, w, meta(PADIM_BATCH, POSITIONS), triangular, mode)


def coreset_launches(rows: int, dim: int) -> tuple[Launch, Launch]:
    parts = -(-rows // coreset.step_tile(dim)["BLOCK_N"])
    return coreset.kcenter_launches(
        meta(rows, dim), meta(rows), meta(1, dtype=torch.int32), meta(parts), meta(parts, dtype=torch.int32),
        meta(rows + 1, dtype=torch.int64), meta(rows), 0,
    )  # fmt: skip


def cases(quick: bool) -> list[tuple[str, bool, bool, Launch]]:
    """(case, default?, tensor cores expected?, launch)."""
    out: list[tuple[str, bool, bool, Launch]] = []
    for name, (dim, n_bank) in BANKS.items():
        exact1 = knn.candidates_kept(1, "exact", None, n_bank)
        exact9 = knn.candidates_kept(9, "exact", None, n_bank)
        out.append((f"PatchCore {name} D={dim}: exact k=1 tile pass ({exact1} candidates)", True, True,
                    knn_tile(dim, n_bank, QUERIES, exact1, "exact")))
        out.append((f"PatchCore {name} D={dim}: exact k=9 reweighting ({exact9} candidates)", True, True,
                    knn_tile(dim, n_bank, REWEIGHT_QUERIES, exact9, "exact")))
        out.append((f"PatchCore {name} D={dim}: exact re-rank k=1", True, False, knn_rerank(dim, n_bank, QUERIES, exact1)))
        if dim % knn.DIM_ALIGN and not quick:
            out.append((f"PatchCore {name} D={dim} unpadded (reference: the layout before padding)", False, True,
                        knn_tile(dim, n_bank, QUERIES, exact1, "exact", pad=False)))
        if quick:
            continue
        for precision in ("exact", "fp16", "tf32", "fp32"):
            for k in (1, 10, 26, knn.MAX_K):
                if precision == "exact" and k == 1:
                    continue  # the exact mode keeps at least 10
                out.append((f"kNN D={dim} {precision} list of {k}", False, precision != "fp32",
                            knn_tile(dim, n_bank, QUERIES, k, precision)))
    for name, dim in PADIM.items():
        out.append((f"PaDiM {name} D={dim}: factor, tf32 (default)", True, True, padim_launch(dim, True, "tf32")))
        if quick:
            continue
        for triangular, mode in ((False, "tf32x3"), (True, "fp32"), (False, "fp32"), (True, "tf32x3"), (False, "tf32")):
            label = "factor" if triangular else "full precision matrix"
            out.append((f"PaDiM {name} D={dim}: {label}, {mode}", False, mode != "fp32", padim_launch(dim, triangular, mode)))
    fold, pick = coreset_launches(CORESET_ROWS, CORESET_DIM)
    out.append((f"coreset step {CORESET_ROWS}x{CORESET_DIM}", True, False, fold))
    out.append(("coreset pick (block reduction)", True, False, pick))
    if not quick:
        for dim, label in ((1536, "unprojected WRN50 rows"), (20, "narrow rows: a 32-wide slab")):
            fold, _ = coreset_launches(CORESET_ROWS, dim)
            out.append((f"coreset step {CORESET_ROWS}x{dim} ({label})", False, False, fold))
    return out


def goals(row: dict[str, Any]) -> list[str]:
    """What this row misses: a failed compile, or a dot off the tensor cores (no wgmma) where its
    operands are TF32/bf16/fp16, on any row; spills on a default row."""
    missed = []
    if row["status"] != "ok":
        return ["compile failed"]
    if row["tensor_cores"] and not row.get("wgmma"):
        missed.append("no wgmma")
    if row["default"] and (row.get("spill_stores") or row.get("spill_loads")):
        missed.append("spills")
    return missed


def table(rows: list[dict[str, Any]]) -> str:
    head = "| case | tile | status | regs | spill st/ld B | smem KB | wgmma | cp.async | default |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        tile = "x".join(str(v) for k, v in r.items() if k.startswith("BLOCK")) + f" w{r['num_warps']} s{r['num_stages']}"
        lines.append(
            f"| {r['case']} | {tile} | {r['status']} | {r.get('regs')} | {r.get('spill_stores')}/{r.get('spill_loads')} | "
            f"{(r.get('shared') or 0) / 1024:.1f} | {r.get('wgmma')} | {r.get('cp_async')} | {'yes' if r['default'] else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default-shape launches only")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/compile_sm90.json)")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--require-triton", default=None, help="refuse another Triton (e.g. 3.6)")
    args = parser.parse_args(argv)
    import triton

    if args.require_triton and not triton.__version__.startswith(args.require_triton):
        print(f"triton {triton.__version__} from {triton.__file__}, but {args.require_triton} is required", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for case, default, tensor_cores, launch in cases(args.quick):
        row = {"case": case, "default": default, "tensor_cores": tensor_cores, **compile_launch(launch, args.capability)}
        row["missed"] = goals(row)
        rows.append(row)
        print(f"{row['status']:>5} regs={row.get('regs')} spill={row.get('spill_stores')}/{row.get('spill_loads')} "
              f"smem={row.get('shared')} wgmma={row.get('wgmma')} cp.async={row.get('cp_async')} "
              f"{row['compile_s']}s  {case}", flush=True)  # fmt: skip
    missed = [f"{r['case']}: {', '.join(r['missed'])}" for r in rows if r["missed"]]
    payload = {
        "target": f"cuda sm_{args.capability} (GPUTarget('cuda', {args.capability}, 32)), compiled without a GPU",
        "triton": {"version": triton.__version__, "path": str(Path(triton.__file__).parent)},
        "seconds": round(time.perf_counter() - t0, 1),
        "goals_missed": missed,
        "rows": rows,
    }
    from benchmarks._env import environment

    out = args.out or REPO / "benchmarks" / "results" / ("compile_sm90_quick.json" if args.quick else "compile_sm90.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), **payload}, indent=2) + "\n")
    print(table(rows))
    print(f"{len(rows)} launches compiled in {payload['seconds']} s with triton {triton.__version__}; "
          f"goals missed: {len(missed)}" + "".join(f"\n  {m}" for m in missed))
    print(f"wrote {out}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
