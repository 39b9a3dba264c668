"""`vade bench` results: the JSON document and the table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.bench.stages import STAGES


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _stage_table(stages: dict[str, dict]) -> list[str]:
    lines = [f"  {'stage':<10} {'img/s':>10} {'ms/img':>9} {'share':>7}   {'CPU img/s':>10} {'CPU ms/img':>10} {'share':>7}"]
    for name in STAGES:
        row = stages.get(name, {})
        per, cpu_per = row.get("s_per_image"), row.get("cpu_s_per_image")
        lines.append(f"  {name:<10} {_num(row.get('images_per_s')):>10} {_num(per * 1000 if per else None, 2):>9} "
                     f"{row.get('share', 0) * 100:>6.1f}%   {_num(row.get('cpu_images_per_s')):>10} "
                     f"{_num(cpu_per * 1000 if cpu_per else None, 2):>10} {row.get('cpu_share', 0) * 100:>6.1f}%")  # fmt: skip
    return lines


def table(result: dict[str, Any]) -> str:
    """A readable summary of a bench result (the scan's part, the sweep's, or both)."""
    lines = _scan_lines(result) if "scan" in result else [f"vade bench --sweep-only; model: {result['model']['description']}"]
    if result.get("sweep"):
        lines += ["", *_sweep_lines(result["sweep"])]
    return "\n".join(lines)


def _scan_lines(result: dict[str, Any]) -> list[str]:
    scan = result["scan"]
    e2e = scan["end_to_end"]
    usage = e2e["usage"]
    m = result["machine"]
    lines = [
        f"vade bench: {scan['images']} images ({result['inputs']['description']}) on {scan['device']}, "
        f"decoder {scan['decoder']}; {m['cpu']} x{m['cores']}" + (f", {m['gpu']}" if m.get("gpu") else ""),
        f"model: {result['model']['description']}",
        "",
        f"end to end (a real `vade scan`, start-up included): {_num(e2e['images_per_s'])} img/s, "
        f"{_num(e2e['s_per_image'] * 1000, 2)} ms/img, {e2e['seconds']:.2f} s; loop alone {_num(e2e['loop_images_per_s'])} img/s",
        f"  utilisation: process CPU{' (the driver; workers are in the machine figure)' if scan.get('workers') else ''} "
        f"{_num(usage['process_cpu'] * 100 if usage['process_cpu'] is not None else None)}% "
        f"of {m['cores']} cores, machine CPU {_num(usage['machine_cpu'] * 100 if usage['machine_cpu'] is not None else None)}%"
        + (f", GPU {usage['gpu'] * 100:.0f}%" if usage.get("gpu") is not None else ""),
        f"per stage (thread-seconds of the instrumented scan, wall then CPU; stages overlap {scan['stage_timing_run']['overlap']}x):",
        *_stage_table(scan["stages"]),
    ]
    if "cluster_start_s" in scan:
        lines.append(f"  cluster started in {scan['cluster_start_s']:.1f} s (not in the end-to-end time); per worker:")
    for address, row in (scan.get("workers") or {}).items():
        lines.append(f"  worker {address}: {row['images']} images in {row['tasks']} tasks, "
                     f"{_num(row['images_per_s'])} img/s of busy time")  # fmt: skip
    base = result.get("baseline")
    if base and base.get("status") == "ok":
        agree, same, feat = base["agreement"], base["agreement_same_pixels"], base["agreement_same_features"]
        lines += [
            "",
            f"baseline (Pillow decode+resize, fp32 unfused backbone, torch.cdist, full-size blur): "
            f"{_num(base['images_per_s'])} img/s -> vade end to end is {base['ratio_end_to_end']:.2f}x, "
            f"loop {base['ratio_loop']:.2f}x",
            f"  raw image scores, baseline vs vade: max |diff| {agree['max_abs_diff']:.3g} "
            f"(rel {agree['max_rel_diff']:.3g}) over {agree['images']} images",
            f"    on vade's pixels (fp32 vs the model's {base['model_precision']} backbone): {same['max_abs_diff']:.3g} "
            f"(rel {same['max_rel_diff']:.3g}); on vade's features (the search alone): {feat['max_abs_diff']:.3g} "
            f"(rel {feat['max_rel_diff']:.3g}), {feat['images']} images",
        ]
    elif base:
        lines += ["", f"baseline: {base['status']}"]
    ceil = result.get("ceilings")
    if ceil:
        g, c, d = ceil["gemm"], ceil["copy"], ceil["decode"]
        decode = ", ".join(f"{k.split('_')[0]} {_num(v)}" for k, v in d.items() if k.endswith("images_per_s"))
        lines += ["", f"ceilings: GEMM fp32 {_num(g['fp32_gflops'])} GFLOP/s, bf16 {_num(g['bf16_gflops'])} GFLOP/s "
                      f"(n={g['n']}); copy {_num(c['memory_gb_s'], 2)} GB/s"
                      + (f", host->device {_num(c['host_to_device_gb_s'], 2)} GB/s" if "host_to_device_gb_s" in c else "")
                      + f"; decode alone ({d['decoder']}, 1 thread) img/s: {decode}"]  # fmt: skip
    return lines


def _sweep_lines(sweep: dict[str, Any]) -> list[str]:
    if "status" in sweep:
        return [f"sweep: {sweep['status']}"]
    lines = ["sweep: scoring vs bank size (one thread)",
             f"  {'bank rows':>10} {'img/s':>9} {'ms/img':>9} {'index build s':>14}"]
    for row in sweep["bank"]:
        if row["status"] != "ok":
            lines.append(f"  {row['bank_rows']:>10,} {row['status']}")
            continue
        lines.append(f"  {row['bank_rows']:>10,} {_num(row['scoring_images_per_s']):>9} "
                     f"{_num(row['scoring_s_per_image'] * 1000, 2):>9} {row['index_build_s']:>14.2f}")
    lines += [f"sweep: coreset (greedy k-center, {sweep['pick_ratio']:.0%} picked, 128 dims)",
              f"  {'patches':>10} {'picks':>8} {'seconds':>9} {'patches/s':>11}"]
    for row in sweep["coreset"]:
        if row["status"] != "ok":
            lines.append(f"  {row['patches']:>10,} {row['picks']:>8,} {row['status']}")
            continue
        lines.append(f"  {row['patches']:>10,} {row['picks']:>8,} {row['seconds']:>9.2f} {_num(row['patches_per_s'], 0):>11}")
    return lines


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return path
