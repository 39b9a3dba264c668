"""Kernel benchmarks: sizes x variants, with the ceiling beside them, as a table and as JSON.

    python benchmarks/kernels.py coreset [--device cpu] [--rows 190000] [--picks 19000] [--verify]
    python benchmarks/kernels.py knn [--device cpu|cuda] [--quick] [--knn-data NPZ] [--bank-sizes 1000,2000]
    python benchmarks/kernels.py mahalanobis [--device cpu|cuda] [--quick]
    python benchmarks/kernels.py all --device cuda --out DIR      (what benchmarks/device_kernels.sh runs)

Every run writes benchmarks/results/kernels_<op>_<device>.json (or into --out) holding the machine,
GPU name, date, library versions, the command and one record per (size, variant). On a shared CPU
the load average before and after is recorded too: other processes make wall times noisy, so
process CPU time is recorded beside wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # not benchmarks/: this file's name would shadow the kernels package

from benchmarks.kernels_cases import coreset_cases, knn_cases, mahalanobis_cases  # noqa: E402


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(records: list[dict[str, Any]]) -> None:
    cols = ["case", "variant", "wall_s", "cpu_s", "rate", "ceiling", "of_ceiling", "check"]
    rows = [[_fmt(r.get(c)) for c in cols] for r in records]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


CASES: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "knn": knn_cases,
    "mahalanobis": mahalanobis_cases,
    "coreset": coreset_cases,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=[*CASES, "all"])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--smoke", action="store_true",
                    help="with --quick --device cpu and TRITON_INTERPRET=1: run the GPU cases in the interpreter")
    ap.add_argument("--rows", type=int, default=None, help="coreset: rows (default 190000 on cpu, 1M on cuda)")
    ap.add_argument("--picks", type=int, default=None, help="coreset: picks (default rows / 10)")
    ap.add_argument("--features", type=Path, default=None, help="coreset/knn: a .npy of real feature rows")
    ap.add_argument("--knn-data", type=Path, default=None,
                    help="knn on cpu: a .npz with bank, near (normal-image patches), far (defect-image patches)")
    ap.add_argument("--bank-sizes", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="knn on cpu: cells vs dense blocks on bank subsets of these sizes (comma-separated)")
    ap.add_argument("--verify", action="store_true", help="coreset: also run the brute force in full")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    ops = list(CASES) if args.op == "all" else [args.op]
    args.out.mkdir(parents=True, exist_ok=True)
    for op in ops:
        info = machine_info(args.device)
        info["load_average_before"] = os.getloadavg()
        suffix = "_smoke" if args.smoke else "_quick" if args.quick else ""
        suffix += "_small_banks" if op == "knn" and args.bank_sizes else ""
        path = args.out / f"kernels_{op}_{args.device}{suffix}.json"

        def write(records: list[dict[str, Any]], done: bool = False) -> None:
            # Written after every size too, so a run cut short by a time limit keeps what it measured.
            doc = {"machine": {**info, "complete": done}, "op": op, "records": records}
            path.write_text(json.dumps(doc, indent=1) + "\n")

        args.on_progress = write
        records = CASES[op](args)
        info["load_average_after"] = os.getloadavg()
        print_table(records)
        write(records, done=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
