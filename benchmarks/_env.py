"""Machine, versions and command for benchmark JSON results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.bench.env import environment as shared_environment


def environment() -> dict:
    """engine.bench.env.environment: shared with `vade bench`."""
    return shared_environment()


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
