"""Where a scan's model record lives, and the fit-time normal scores in it (the drift reference)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _maps_attrs(out_dir: Path) -> dict[str, Any]:
    try:
        import zarr

        return dict(zarr.open_array(out_dir / "maps.zarr" / "maps", mode="r").attrs)
    except Exception:  # noqa: BLE001 - no or unreadable maps: nothing recorded there
        return {}


def find_model_meta(out_dir: Path, scan_meta: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The model's metadata for this scan, and where it came from. In order of preference:

    OUT_DIR/model.json (a copy); scan.json's "model_meta"; the model directory scan.json names, when its
    model.json still has the SHA-256 recorded as "model_fingerprint" (the very model that scanned);
    the summary in the maps' attributes ("model" + "threshold_raw": no fit-time normal scores).
    """
    meta = read_json(out_dir / "model.json")
    if meta is not None:
        return meta, "model.json in the scan folder"
    if isinstance(scan_meta.get("model_meta"), dict):
        return scan_meta["model_meta"], "scan.json"
    model_dir, fingerprint = scan_meta.get("model_dir"), scan_meta.get("model_fingerprint")
    if isinstance(model_dir, str) and isinstance(fingerprint, str):
        candidates = [Path(model_dir)] + ([] if Path(model_dir).is_absolute() else [out_dir.parent / model_dir])
        for directory in candidates:
            try:
                blob = (directory / "model.json").read_bytes()
            except OSError:
                continue
            if hashlib.sha256(blob).hexdigest() == fingerprint:
                meta = json.loads(blob)
                if isinstance(meta, dict):
                    return meta, f"{directory / 'model.json'} (the model directory of the scan, fingerprint checked)"
    attrs = _maps_attrs(out_dir)
    if isinstance(attrs.get("model"), dict):
        meta = dict(attrs["model"])
        if "threshold" not in meta and attrs.get("threshold_raw") is not None:
            meta["threshold"] = attrs["threshold_raw"]
        return meta, "maps.zarr attributes (summary only: no fit-time normal scores)"
    return None, ""


def normal_reference(meta: dict[str, Any] | None) -> tuple[np.ndarray | None, dict[float, float] | None]:
    """Fit-time normal scores on the report's scale (0.5 = threshold): (sample or None, quantiles or None)."""
    if not meta:
        return None, None
    calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    for values in (calibration.get("normal_scores_normalized"), meta.get("normal_scores_normalized"), meta.get("normal_scores")):
        if isinstance(values, list) and values:
            sample = np.asarray(values, dtype=np.float64)
            return np.sort(sample[np.isfinite(sample)]), None
    quantiles = meta.get("normal_score_quantiles") or calibration.get("normal_score_quantiles")
    if isinstance(quantiles, dict) and quantiles:
        return None, {float(q): float(v) for q, v in sorted(quantiles.items(), key=lambda kv: float(kv[0]))}
    return None, None
