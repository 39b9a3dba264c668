"""Machine, versions and command for benchmark JSON results."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "numpy", "zarr", "dask", "pyarrow", "nvidia-dali-cuda130", "pillow")


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
        },
        "versions": versions,
    }


def write_result(name: str, payload: dict) -> Path:
    out = Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**environment(), **payload}, indent=2) + "\n")
    return out


def record(case, variant, wall, cpu, items, ceiling=None, check=None, **extra) -> dict[str, Any]:
    """One row of a kernel benchmark: times, rate, the ceiling beside it, and a correctness check."""
    rate = items / wall if wall > 0 else None
    rec = {"case": case, "variant": variant, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
           "rate": rate, "ceiling": ceiling, "of_ceiling": (rate / ceiling) if (ceiling and rate) else None,
           "check": check}
    rec.update(extra)
    return rec
