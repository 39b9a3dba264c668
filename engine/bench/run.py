"""`vade bench` from start to end: inputs, model, the real scan by stage, the baseline, ceilings, sweep."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, DataError
from engine.scan.options import ScanOptions


@dataclass
class BenchRequest:
    model_dir: str | None = None
    source: str | None = None
    device: str = "auto"
    decoder: str = "auto"
    images: int = 200
    image_size: int = 512
    cluster: Any = None  # a ClusterRequest, or None for one process
    sweep: bool = False
    sweep_only: bool = False
    sweep_max: int = 4_000_000
    sweep_budget: float = 300.0
    baseline: bool = True
    keep: str | None = None  # keep the work folder here (inputs, model, scans)

    def validate(self) -> None:
        if self.images < 1:
            raise ConfigError(f"--images must be >= 1, got {self.images}")
        if not 32 <= self.image_size <= 8192:
            raise ConfigError(f"--image-size must be 32..8192 px, got {self.image_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.sweep_max < 1000 or self.sweep_budget <= 0:
            raise ConfigError("--sweep-max must be >= 1000 rows and --sweep-budget > 0 seconds")


def _source_paths(source: str, limit: int) -> list[Path]:
    """The first `limit` inputs of SOURCE (any form `vade scan` takes), refused when it has none."""
    from engine.inputs.sources import open_source

    src = open_source(source)
    paths = []
    for record in src.records():
        paths.append(Path(record.file))
        if len(paths) >= limit:
            break
    if not paths:
        raise DataError(f"SOURCE {source} holds no images to benchmark")
    return paths


def _check_model(model_dir: str) -> None:
    from engine.artifact import read_meta

    read_meta(Path(model_dir))


def run_bench(req: BenchRequest, command: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    """Everything `vade bench` measures, as one JSON-ready dict."""
    req.validate()
    if req.model_dir is not None:
        _check_model(req.model_dir)  # a bad MODEL_DIR: one line before any slow work
    work = Path(req.keep) if req.keep else Path(tempfile.mkdtemp(prefix="vade-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(req, work, command, say)
    finally:
        if not req.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(req: BenchRequest, work: Path, command: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    from engine.bench import ceilings, stages, synthetic
    from engine.bench.env import environment, load_average
    from engine.models.base import resolve_device
    from engine.models.registry import load_model

    device = resolve_device(req.device)
    result: dict[str, Any] = environment(command)
    if req.source is None:
        say(f"writing {req.images} synthetic {req.image_size} px images (JPEG and PNG, a defect in every "
            f"{synthetic.DEFECT_EVERY}th)")  # fmt: skip
        paths = synthetic.make_images(work / "inputs", req.images, req.image_size)
        inputs = {"kind": "synthetic", "count": len(paths), "side_px": req.image_size,
                  "description": f"synthetic {req.image_size} px, JPEG+PNG, {len(paths) // synthetic.DEFECT_EVERY} defects"}
    else:
        paths = _source_paths(req.source, req.images)
        inputs = {"kind": "source", "source": req.source, "count": len(paths),
                  "description": f"the first {len(paths)} of {req.source}"}  # fmt: skip
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{p.absolute()}\n" for p in paths), encoding="utf-8")
    result["inputs"] = inputs
    if req.model_dir is None:
        say(f"fitting the default model (vade fit's defaults: PatchCore, Lite0, 512 px tiles) on "
            f"{synthetic.TRAIN_IMAGES} synthetic normals")  # fmt: skip
        model_dir = synthetic.fit_default_model(work, req.image_size, str(device))
        made = "default: "
    else:
        model_dir, made = Path(req.model_dir), ""
    model = load_model(model_dir, device=device)
    result["model"] = {"dir": str(model_dir) if req.model_dir else None, "method": model.method,
                       "backbone": model.cfg.backbone, "input_size": model.input_size,
                       "bank_size": int(model.bank.shape[0]) if hasattr(model, "bank") else None,
                       "precision": model.cfg.precision, "tiled": model.tile_spec is not None,
                       "description": f"{made}{model.method} {model.cfg.backbone} {model.input_size} px, "
                                      f"{model.cfg.precision}" + (f", bank {int(model.bank.shape[0]):,} rows"
                                                                  if hasattr(model, "bank") else "")}  # fmt: skip
    if not req.sweep_only:
        options = ScanOptions(device=req.device, decoder=req.decoder)
        say("scanning: once with stage timing, once plain (end to end)")
        scan = stages.measure(model_dir, listing, work, options, req.cluster)
        result["scan"] = scan
        if req.baseline:
            result["baseline"] = _baseline(model, paths, scan, say)
        say("ceilings: GEMM, memory copy, decode alone")
        result["ceilings"] = ceilings.measure(paths, device, req.decoder)
    if req.sweep or req.sweep_only:
        from engine.bench.sweep import run_sweep
        from engine.inputs.decode import read_rgb, to_tensor

        if not hasattr(model, "bank"):
            result["sweep"] = {"status": "the sweep needs a PatchCore model"}
        else:  # a tiled model's scoring runs per tile: the images squashed to one tile each stand in
            images = to_tensor([read_rgb(p) for p in paths[:8]], model.input_size)
            result["sweep"] = run_sweep(model, images, device, req.sweep_max, req.sweep_budget, say)
            result["sweep"]["unit"] = "tile" if model.tile_spec is not None else "image"
    result["machine"]["load_average_after"] = load_average()  # other users' load shows here
    return result


def _baseline(model: Any, paths: list[Path], scan: dict, say: Callable[[str], None]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from engine.bench import baseline

    reason = baseline.supported(model)
    if reason:
        return {"status": f"skipped: {reason}"}
    say("baseline: Pillow, fp32 backbone, torch.cdist on the same images")
    peer = baseline.run_baseline(model, paths)
    table = pq.read_table(Path(scan["out_dir"]) / "scores.parquet", columns=["path", "raw_score", "status"]).to_pylist()
    vade = {str(Path(r["path"])): float(r["raw_score"]) for r in table if r["status"] == "ok"}
    peer_scores = {str(Path(p).absolute()): s for p, s in peer.pop("scores").items()}
    peer_pixels, own_features = baseline.same_pixels_scores(model, paths[: baseline.SAME_PIXELS_IMAGES])
    absolute = lambda scores: {str(Path(p).absolute()): s for p, s in scores.items()}  # noqa: E731
    e2e = scan["end_to_end"]
    return {
        "status": "ok",
        **peer,
        "ratio_end_to_end": e2e["images_per_s"] / peer["images_per_s"],
        "ratio_loop": e2e["loop_images_per_s"] / peer["images_per_s"],
        "agreement": baseline.agreement(vade, peer_scores),
        "agreement_same_pixels": baseline.agreement(vade, absolute(peer_pixels)),
        "agreement_same_features": baseline.agreement(vade, absolute(own_features)),
        "model_precision": model.cfg.precision,
        "what": "Pillow decode + resize, fp32 NCHW backbone with BatchNorm, torch.cdist brute-force nearest "
                "neighbours and reweighting against the same bank (tile by tile for a tiled model, grids "
                "blended as vade blends them), full-size upsample + blur; one process, "
                "torch's default threads; no writes",
    }
