"""`vade demo`: generate a small dataset, fit, evaluate, scan and report, and say where it all went."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.api import fit
from engine.config import load_config
from engine.datasets import train_images
from engine.demo_data import make_demo_dataset


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

    from engine.evaluate import evaluate, format_table

    metrics = evaluate(model, data, "weave")
    print(format_table(metrics))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written = [f"model:   {model_dir}/", f"metrics: {out / 'metrics.json'}"]
    scan_dir = out / "scan"
    try:
        from engine.pipeline import scan
    except ImportError:
        scan = None
    if scan is not None:
        if scan_dir.exists():
            shutil.rmtree(scan_dir)
        scan(model_dir, str(data / "weave" / "test"), scan_dir, device=device, quiet=True)
        written += [f"maps:    {scan_dir / 'maps.zarr'}", f"scores:  {scan_dir / 'scores.parquet'}"]
        try:
            from engine.report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            written.append(f"report:  {write_report(scan_dir)}")
    print("demo outputs:\n  " + "\n  ".join(written))
    return 0
