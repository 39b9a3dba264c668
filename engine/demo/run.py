"""`vade demo`: generate a small dataset, fit, evaluate, scan and report, and say where it all went."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.api import fit, scan
from engine.config import load_config
from engine.demo.dataset import make_demo_dataset
from engine.evaluation.evaluate import evaluate, format_table
from engine.inputs.datasets import train_images
from engine.report.page import build_report


def run_demo(out: Path, device: str = "auto", say: Callable[[str], None] = print) -> int:
    out = Path(out)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    make_demo_dataset(data)
    say(f"demo dataset (synthetic woven texture, 3 defect types) written to {data}/weave")
    model_dir = out / "model"
    model = fit(train_images(data, "weave"), load_config(overrides={"device": device}), progress=say)
    model.save(model_dir)
    say(f"model written to {model_dir}")

    metrics = evaluate(model, data, "weave")
    print(format_table(metrics))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    scan_dir = out / "scan"
    if scan_dir.exists():
        shutil.rmtree(scan_dir)
    result = scan(model_dir, str(data / "weave" / "test"), scan_dir, device=device, quiet=True)
    c = result.counts
    say(f"scanned {result.total} test images: {c.ok} ok, {c.error} errors, {c.anomalous} anomalous")
    report = build_report(scan_dir)
    print(
        "demo outputs:\n"
        f"  data:    {data / 'weave'}\n"
        f"  model:   {model_dir}/ (model.safetensors + model.json)\n"
        f"  metrics: {out / 'metrics.json'}\n"
        f"  maps:    {scan_dir / 'maps.zarr'}\n"
        f"  scores:  {scan_dir / 'scores.parquet'}\n"
        f"  report:  {report}"
    )
    return 0
