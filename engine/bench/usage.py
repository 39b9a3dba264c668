"""How busy the machine was during a measured run: this process's CPU share, the whole machine's, the GPU's.

    with Usage(device) as usage: run()
    usage.result()  # {"process_cpu": 0.93, "machine_cpu": 0.97, "gpu": 0.81 or None, ...}

process_cpu = CPU seconds of this process and its waited-for children / (wall x cores); machine_cpu
= busy share of all cores from /proc/stat (other users' load included: it says how loaded the machine
was); gpu = mean of torch.cuda.utilization() (or nvidia-smi) sampled every SAMPLE_S, where readable.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from typing import Any

SAMPLE_S = 0.2


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores, or None where /proc/stat is not readable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def _gpu_reader(device: str) -> Any:
    """A function returning the GPU's utilisation in percent, or None when it cannot be read."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        torch.cuda.utilization()
        return torch.cuda.utilization
    except Exception:  # noqa: BLE001 - pynvml missing or the driver refuses: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def smi() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5)  # fmt: skip
        return float(out.stdout.strip().splitlines()[0])

    try:
        smi()
    except Exception:  # noqa: BLE001 - unreadable: no GPU figure
        return None
    return smi


class Usage:
    """Context manager measuring CPU (and GPU) use over its block."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._gpu = _gpu_reader(device)
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Usage:
        self._wall, self._cpu, self._stat = time.perf_counter(), _cpu_seconds(), _proc_stat()
        if self._gpu is not None:
            self._thread = threading.Thread(target=self._sample, name="vade-bench-gpu", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self._samples.append(float(self._gpu()))
            except Exception:  # noqa: BLE001 - a failed read is a missing sample
                pass

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = _cpu_seconds() - self._cpu
        stat = _proc_stat()
        self.machine = None
        if stat is not None and self._stat is not None and stat[1] > self._stat[1]:
            self.machine = (stat[0] - self._stat[0]) / (stat[1] - self._stat[1])
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def result(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "process_cpu": round(self.cpu / (self.wall * cores), 3) if self.wall > 0 else None,
            "machine_cpu": None if self.machine is None else round(self.machine, 3),
            "gpu": round(sum(self._samples) / len(self._samples) / 100, 3) if self._samples else None,
            "gpu_samples": len(self._samples),
        }
