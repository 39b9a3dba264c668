"""Per-stage and end-to-end figures of the real scan (engine.scan), run to a temporary OUT_DIR.

Two scans of the same inputs: one with ScanOptions.stage_timing (spans around read, inspect, decode,
resize, backbone, scoring, map, write in the real loop, engine.timing) for the breakdown, and one
plain for the end-to-end rate (start-up, listing, consolidation included), so the spans' cost
(and on CUDA their stream waits) does not touch the headline number.

A stage's figure is thread-seconds: the loader, the model workers and the writer run at once, so the
stages' seconds add up to more than the wall time; `share` is a stage's part of their sum, and
`overlap` = their sum / the loop's wall time says how many threads were busy on average. Each stage
has wall seconds (in the thread, waits and preemption by other processes included) and CPU seconds
(the thread's CPU time: what the stage costs a core, steady on a loaded machine; `cpu_images_per_s`).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from engine.bench.usage import Usage
from engine.scan.options import ScanOptions

STAGES = ("read", "inspect", "decode", "resize", "backbone", "scoring", "map", "write")


def run_scan(model_dir: Path, source: Path, out_dir: Path, options: ScanOptions, client: Any = None) -> tuple[Any, dict]:
    """A real scan (one process, or through a Dask `client`); (its ScanResult, machine usage)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    with Usage(options.device if options.device != "auto" else _auto_device()) as usage:
        if client is None:
            from engine.scan.job import scan

            result = scan(model_dir, source, out_dir, options, quiet=True)
        else:
            from engine.distributed.driver import scan_on_cluster

            result = scan_on_cluster(model_dir, source, out_dir, options, client=client, quiet=True)
    return result, usage.result()


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_rows(stages: dict[str, float], images: int, cpu: dict[str, float] | None = None) -> dict[str, dict]:
    """Per stage: seconds (thread-seconds), s per image, images/s, share of all stages' seconds; the
    same from CPU seconds when given."""
    total = sum(stages.get(name, 0.0) for name in STAGES)
    cpu = cpu or {}
    cpu_total = sum(cpu.get(name, 0.0) for name in STAGES)
    rows = {}
    for name in STAGES:
        seconds, cpu_s = stages.get(name, 0.0), cpu.get(name, 0.0)
        rows[name] = {
            "seconds": round(seconds, 4),
            "s_per_image": seconds / images if images else None,
            "images_per_s": images / seconds if seconds > 0 else None,
            "share": round(seconds / total, 4) if total > 0 else 0.0,
            "cpu_seconds": round(cpu_s, 4),
            "cpu_s_per_image": cpu_s / images if images else None,
            "cpu_images_per_s": images / cpu_s if cpu_s > 0 else None,
            "cpu_share": round(cpu_s / cpu_total, 4) if cpu_total > 0 else 0.0,
        }
    return rows


def measure(model_dir: Path, source: Path, work: Path, options: ScanOptions, cluster: Any = None) -> dict[str, Any]:
    """The instrumented scan's stages and the plain scan's end-to-end rate, with machine usage of each.

    On a cluster (a ClusterRequest) both scans run on one cluster, started once (its start-up is
    reported apart: `cluster_start_s`), so its workers are the same in both."""
    if cluster is None:
        return _measure(model_dir, source, work, options, None)
    import time

    from engine.distributed.cluster import connect

    t0 = time.perf_counter()
    with connect(cluster) as client:
        started = time.perf_counter() - t0
        out = _measure(model_dir, source, work, options, client)
    out["cluster_start_s"] = round(started, 3)
    return out


def _measure(model_dir: Path, source: Path, work: Path, options: ScanOptions, client: Any) -> dict[str, Any]:
    timed, timed_usage = run_scan(model_dir, source, work / "scan_timed", dataclasses.replace(options, stage_timing=True),
                                  client)  # fmt: skip
    plain, plain_usage = run_scan(model_dir, source, work / "scan", options, client)
    images = plain.counts.ok
    times = timed.times
    loop_sum = sum(times.stages.get(name, 0.0) for name in STAGES)
    out: dict[str, Any] = {
        "images": plain.total,
        "ok": plain.counts.ok,
        "errors": plain.counts.error,
        "anomalous": plain.counts.anomalous,
        "device": plain.device,
        "decoder": plain.decoder,
        "shards": plain.shards,
        "end_to_end": {
            "seconds": round(plain.seconds, 4),
            "images_per_s": images / plain.seconds if plain.seconds > 0 else None,
            "s_per_image": plain.seconds / images if images else None,
            "loop_seconds": round(plain.times.loop, 4),
            "loop_images_per_s": images / plain.times.loop if plain.times.loop > 0 else None,
            "usage": plain_usage,
        },
        "stages": stage_rows(times.stages, timed.counts.ok, times.stage_cpu),
        "stage_timing_run": {
            "seconds": round(timed.seconds, 4),
            "loop_seconds": round(times.loop, 4),
            "overlap": round(loop_sum / times.loop, 3) if times.loop > 0 else None,
            "usage": timed_usage,
        },
        "out_dir": str(work / "scan"),
    }
    if times.workers:
        out["workers"] = worker_rows(plain.times.workers, timed.times.workers)
    return out


def worker_rows(plain: dict[str, dict], timed: dict[str, dict]) -> dict[str, dict]:
    """Per worker of a cluster scan: images, tasks, busy seconds and images/s (plain run), stages (timed run)."""
    rows = {}
    for address in sorted(set(plain) | set(timed)):
        p = plain.get(address, {"images": 0, "tasks": 0, "seconds": 0.0})
        t = timed.get(address, {"images": 0, "stages": {}})
        rows[address] = {
            "images": p["images"],
            "tasks": p["tasks"],
            "busy_seconds": round(p["seconds"], 4),
            "images_per_s": p["images"] / p["seconds"] if p["seconds"] > 0 else None,
            "stages": stage_rows(t.get("stages", {}), t.get("images", 0), t.get("stage_cpu", {})),
        }
    return rows
