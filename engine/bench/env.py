"""Machine, versions, command and date for benchmark JSON (`vade bench` and benchmarks/ scripts)."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "numpy", "zarr", "dask", "pyarrow", "nvidia-dali-cuda130", "pillow", "torchvision")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or ""


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(command: list[str] | None = None) -> dict:
    """date, command, machine (CPU, cores, torch threads, GPU, Python, load average) and package versions."""
    import torch

    from engine import __version__

    versions = {"vade": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command if command is not None else [Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "load_average_1_5_15": load_average(),
        },
        "versions": versions,
    }
