"""End-to-end CPU scan throughput on ../shared/data, with time per stage, written as JSON.

    PYTHONPATH=. python benchmarks/scan_cpu.py [--model MODEL_DIR] [--category bottle] [--split all|test]
                                               [--repeat 1]

Fits the default model (PatchCore, efficientnet_lite0, 256 px) on DATA/<category>/train/good unless
--model is given, then scans every train and test image of the category (--split test: the test
images only, as the peer's test loop; mostly defective, so slower to score) from a list file (masks
not included) with the default scan settings. Reports:
  - images/s end to end (model load, planning and consolidation included) and in the scan loop;
  - seconds per stage: decode (loader thread), features (backbone thread on CPUs), scoring (main
    thread), write (writer thread); all four overlap;
  - decode-only images/s per decoder on the same files, one thread, for scale.
The machine's load average is recorded: on a shared machine, wall-clock numbers move with it; the
process's CPU seconds per image do not, and give an estimate for an idle machine (CPU s / cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.inputs.datasets import list_images  # noqa: E402
from engine.inputs.decode import resize_batch  # noqa: E402
from engine.inputs.decoders import make_decoder  # noqa: E402
from engine.inputs.inspection import inspect_bytes, read_bytes  # noqa: E402
from engine.scan.job import scan  # noqa: E402
from engine.scan.options import ScanOptions  # noqa: E402


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("vade", "torch", "numpy", "pillow", "zarr", "pyarrow", "nvidia-dali-cuda130", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    from engine import __version__

    out["vade"] = __version__
    return out


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): what the scan consumed, whatever the load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _git() -> dict[str, object]:
    import subprocess

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in run("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": run("rev-parse", "--short", "HEAD").strip(), "uncommitted_changes": changed}


def _machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def decode_only(files: list[Path], size: int, decoder_name: str, batch: int) -> float:
    """Images/s for read + inspect + decode + resize, no model."""
    decoder = make_decoder(decoder_name, torch.device("cpu"), batch)
    t0 = time.perf_counter()
    for start in range(0, len(files), batch):
        items = []
        for path in files[start : start + batch]:
            data = read_bytes(path)
            items.append((data, inspect_bytes(data, path.suffix)))
        resize_batch([px for px in decoder.decode(items) if isinstance(px, torch.Tensor)], size)
    return len(files) / (time.perf_counter() - t0)


def model_only(model_dir: Path, files: list[Path], batch: int) -> float:
    """Images/s of the model alone (features + scoring, as the scan calls it) on pre-decoded images."""
    from engine.inputs.decode import read_rgb, to_tensor
    from engine.models.registry import load_model
    from engine.scan.batches import StageTimes
    from engine.scan.model_stage import score_images
    from engine.scan.options import MODEL_BATCH

    model = load_model(model_dir, device="cpu")
    images = to_tensor([read_rgb(p) for p in files], model.input_size)
    score_images(model, images[: MODEL_BATCH["cpu"]], MODEL_BATCH["cpu"], StageTimes())  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(files), batch):
        score_images(model, images[start : start + batch], MODEL_BATCH["cpu"], StageTimes())
    return len(files) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "mvtec_bottle"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--model", help="an existing model folder (default: fit the default model first)")
    parser.add_argument("--split", choices=["all", "test"], default="all",
                        help="scan train + test images, or only the test split (as the peer's test loop)")
    parser.add_argument("--repeat", type=int, default=1, help="list every image this many times")
    parser.add_argument("--batch-size", type=int, default=ScanOptions.batch_size)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    cat = Path(args.data).resolve() / args.category
    files = (list_images(cat / "train") if args.split == "all" else []) + list_images(cat / "test")
    work = Path(tempfile.mkdtemp(prefix="vade_bench_"))
    fit_seconds = None
    if args.model:
        model_dir = Path(args.model)
    else:
        from engine.api import fit
        from engine.config import FitConfig

        t0 = time.perf_counter()
        model = fit(list_images(cat / "train" / "good"), FitConfig(device="cpu"))
        fit_seconds = time.perf_counter() - t0
        model_dir = work / "model"
        model.save(model_dir)
        del model
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in files) * args.repeat, encoding="utf-8")
    load_before = list(os.getloadavg())

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    result = scan(
        model_dir, listing, work / "scan", device="cpu", decoder=args.decoder, batch_size=args.batch_size
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    load_after = list(os.getloadavg())
    times = result.times
    stage = times.as_dict()
    n = result.total
    from engine.models.registry import load_model

    size = load_model(model_dir).input_size
    decode_rates = {name: round(decode_only(files[:120], size, name, args.batch_size), 1) for name in ("pillow", "dali")}
    model_rate = model_only(model_dir, files[:64], args.batch_size)
    report = {
        "benchmark": "scan_cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**_machine(), "load_average_before_scan": load_before, "load_average_after_scan": load_after},
        "versions": _versions(),
        "git": _git(),
        "data": {"category": args.category, "split": args.split, "images": n, "unique_images": len(files),
                 "repeat": args.repeat},
        "model": {"dir": str(model_dir), "fit_seconds": fit_seconds, "input_size": size},
        "settings": {"decoder": result.decoder, "batch_size": args.batch_size, "device": result.device},
        "result": {
            "images": n,
            "ok": result.counts.ok,
            "error": result.counts.error,
            "wall_seconds": round(wall, 3),
            "images_per_second_end_to_end": round(n / wall, 2),
            # CPU time this process used (all threads), independent of other processes' load; on an
            # otherwise idle machine wall time approaches cpu_seconds / cores when the work parallelises
            "cpu_seconds": round(cpu, 2),
            "cpu_ms_per_image": round(cpu / n * 1e3, 1),
            "idle_machine_estimate_images_per_second": round(n / (cpu / (os.cpu_count() or 1)), 2),
            "seconds_per_stage": stage,
            "ms_per_image_per_stage": {k: round(v / n * 1e3, 2) for k, v in stage.items() if k != "images"},
            # on CPUs the backbone thread and scoring overlap, so their sum exceeds the loop time
            "model_ms_per_image": round((times.features + times.scoring) / n * 1e3, 2),
            "scan_loop_images_per_second": round(n / times.loop, 2),
            "decode_only_images_per_second": decode_rates,
            "model_only_images_per_second": round(model_rate, 2),
            # 1.0 = the scan loop runs as fast as the model alone: decode and writes fully hidden
            "scan_loop_vs_model_only": round(n / times.loop / model_rate, 3),
        },
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scan_cpu_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["result"], indent=2))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
