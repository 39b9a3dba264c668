"""`vade bench --sweep`: how cost grows with the work.

bank: the scoring stage (kNN search, reweighting, maps; one model worker = one thread on a CPU) on
real feature maps of the inputs, against synthetic banks of 1 k .. 1 M rows of the model's feature
dimension: the model's own bank rows resampled with Gaussian noise (a tenth of each column's spread),
so normal patches stay near the bank as they do in a scan; plus the CPU index's build time.
coreset: the fit's greedy k-center (kernels.coreset.greedy_kcenter_with_radius: the exact lazy CPU
kernel, Triton on CUDA) on 100 k .. 4 M training patches of the projection's 128 dimensions
(a Gaussian mixture of 256 clusters), picking PICK_RATIO of them.

Points whose time, extrapolated from the point before (bank: linear in rows, coreset: rows x picks),
exceeds the budget are skipped and say so; --sweep-max caps the rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

BANK_ROWS = (1_000, 10_000, 100_000, 1_000_000)
CORESET_ROWS = (100_000, 400_000, 1_000_000, 4_000_000)
PICK_RATIO = 0.01
PROJECTION_DIM = 128
SCORING_BATCHES = 4  # micro-batches scored per bank size


def synthetic_bank(bank: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """`rows` rows like `bank`'s: its rows resampled, plus noise of a tenth of each column's spread."""
    gen = torch.Generator().manual_seed(seed)
    base = bank.float().cpu()
    picks = torch.randint(0, base.shape[0], (rows,), generator=gen)
    spread = base.std(0, keepdim=True).clamp_min(1e-6)
    out = base[picks]
    out += torch.randn(out.shape, generator=gen) * (0.1 * spread)
    return out


def training_patches(rows: int, dim: int = PROJECTION_DIM, clusters: int = 256, seed: int = 0) -> torch.Tensor:
    """A Gaussian mixture standing in for projected training patches, (rows, dim) float32."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen) * 3.0
    out = torch.randn(rows, dim, generator=gen)
    out += centres[torch.randint(0, clusters, (rows,), generator=gen)]
    return out


def _skip(predicted: float, budget: float) -> str | None:
    return f"skipped: about {predicted:.0f} s predicted from the point before, over the {budget:.0f} s budget" \
        if predicted > budget else None


def bank_sweep(model: Any, images: torch.Tensor, sizes: Sequence[int], budget: float,
               say: Callable[[str], None]) -> list[dict]:  # fmt: skip
    """Scoring images/s (one thread) per bank size; the model's bank is replaced (load a copy)."""
    from engine.scan.model_stage import F16_MAX

    original = model.bank.detach().float().cpu()
    batch = images[: 8]
    with torch.inference_mode():
        fmaps = model.features(batch)
    rows_out: list[dict] = []
    last: tuple[int, float] | None = None
    for size in sizes:
        if last is not None:
            reason = _skip(last[1] * size / last[0], budget)
            if reason:
                rows_out.append({"bank_rows": size, "status": reason})
                continue
        say(f"sweep: bank of {size:,} rows")
        model.bank_owner = None
        model._set_bank(synthetic_bank(original, size).to(model.device))
        t0 = time.perf_counter()
        model.prepare_scoring()
        build = time.perf_counter() - t0
        with torch.inference_mode():
            model.score_features(fmaps)  # warm-up
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(SCORING_BATCHES):
                out = model.score_features(fmaps)
                model.normalize(out.maps).clamp_(-F16_MAX, F16_MAX).to(torch.float16).cpu()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t1
        n = SCORING_BATCHES * batch.shape[0]
        rows_out.append({"bank_rows": size, "dim": int(original.shape[1]), "index_build_s": round(build, 3),
                         "scoring_images_per_s": n / seconds, "scoring_s_per_image": seconds / n, "status": "ok"})
        last = (size, build + seconds)
    model._set_bank(original.to(model.device))
    return rows_out


def coreset_sweep(device: torch.device, sizes: Sequence[int], budget: float, say: Callable[[str], None],
                  ratio: float = PICK_RATIO) -> list[dict]:  # fmt: skip
    """Seconds of the fit's greedy k-center per number of training patches."""
    from kernels.coreset import greedy_kcenter_with_radius

    out: list[dict] = []
    last: tuple[int, float] | None = None
    for size in sizes:
        picks = max(1, int(size * ratio))
        if last is not None:
            reason = _skip(last[1] * (size / last[0]) ** 2, budget)
            if reason:
                out.append({"patches": size, "picks": picks, "status": reason})
                continue
        say(f"sweep: coreset of {picks:,} from {size:,} patches")
        x = training_patches(size).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, radius = greedy_kcenter_with_radius(x, picks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out.append({"patches": size, "picks": picks, "dim": PROJECTION_DIM, "seconds": round(seconds, 3),
                    "patches_per_s": size / seconds, "covering_radius": round(radius, 4), "status": "ok"})
        last = (size, seconds)
        del x
    return out


def run_sweep(model: Any, images: torch.Tensor, device: torch.device, max_rows: int, budget: float,
              say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    from kernels._threads import torch_threads

    bank_sizes = [s for s in BANK_ROWS if s <= max_rows]
    coreset_sizes = [s for s in CORESET_ROWS if s <= max_rows]
    with torch_threads(1):  # one model worker's view of the scoring stage
        banks = bank_sweep(model, images, bank_sizes, budget, say)
    cores = coreset_sweep(device, coreset_sizes, budget, say)
    return {"bank": banks, "coreset": cores, "max_rows": max_rows, "budget_s": budget, "pick_ratio": PICK_RATIO,
            "notes": "bank: scoring of one 8-image micro-batch on one thread (a CPU model worker), synthetic banks "
                     "resampled from the model's bank; coreset: greedy k-center on a Gaussian mixture"}
