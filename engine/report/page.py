"""`vade report OUT_DIR`: one self-contained HTML page about a scan (no network, no scripts).

Sections: run summary; score histogram with the threshold; ROC / PR per defect type where labels are
known (a `defect` or `label` column, or the MVTec layout .../test/<defect>/...); the most anomalous
images with their map overlays, and a few typical ones for contrast; drift per shard / folder / time
bin against the fit-time normal scores (engine.report.drift); errors grouped by message.
Memory is bounded (engine.report.data): one streaming pass over scores.parquet, and only the maps
shown are read from maps.zarr, by index.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.report import plots
from engine.report.data import Row, ScanData, load_scan
from engine.report.drift import DriftResult, GroupDrift, drift
from engine.report.meta import normal_reference

MAX_CURVES = 8  # defect types drawn (by count); the table lists all
MAX_DRIFT_ROWS = 40
TILE_BOX = 164  # pixels per picture in a tile

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:8px 0 2px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:.9em}nav a{margin-right:14px;color:#2a5db0;text-decoration:none;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;background:#fff}td,th{border:1px solid #e2e2e2;padding:4px 8px;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}.card{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:1.35em}.card span{color:#666;font-size:.8em}
.grid{display:flex;flex-wrap:wrap;gap:10px}.tile{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px;font-size:.8em;width:338px}
.tile img{display:block;max-width:100%}.tile .path{color:#666;overflow-wrap:anywhere}.bad{color:#b22}.flag{background:#fde8e8}
.scale{display:inline-block;width:160px;height:10px;vertical-align:middle;border:1px solid #ccc}
.note{color:#555;font-size:.88em;max-width:900px}img.plot{max-width:100%;background:#fff}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


_SPEED_KEYS = ("images_per_second", "throughput_images_per_second")
_SECONDS_KEYS = ("seconds", "elapsed_s", "wall_s", "scan_seconds", "duration_s")


def _scan_number(scan_meta: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    """A timing figure the scan recorded, at the top of scan.json or under "timing"/"stats" (not the model's)."""
    for tree in (scan_meta, scan_meta.get("timing"), scan_meta.get("stats")):
        if isinstance(tree, dict):
            for key in keys:
                value = tree.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    return float(value)
    return None


def _throughput_from_file_times(data: ScanData) -> float | None:
    """Rows / (scores.parquet written - scan.json "created"): wall clock, model loading included."""
    try:
        created = datetime.fromisoformat(str(data.scan_meta["created"]))
        finished = (data.out_dir / "scores.parquet").stat().st_mtime
    except (KeyError, ValueError, OSError):
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    seconds = finished - created.timestamp()
    return data.n_rows / seconds if seconds > 0 else None


def _summary(data: ScanData) -> str:
    meta = data.model_meta or {}
    config = meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}
    calibration = meta.get("calibration", {}) if isinstance(meta.get("calibration"), dict) else {}
    per_second = _scan_number(data.scan_meta, _SPEED_KEYS)
    seconds = _scan_number(data.scan_meta, _SECONDS_KEYS)
    if per_second is None and seconds:
        per_second = data.n_rows / seconds
    speed_label = "images / s (scan)"
    if per_second is None:
        per_second = _throughput_from_file_times(data)
        speed_label = "images / s (scan, from file times)"
    anomalous_share = data.n_anomalous / data.n_ok if data.n_ok else float("nan")
    cards = [
        (f"{data.n_rows:,}", "images"),
        (f"{data.n_ok:,}", "scored ok"),
        (f"{data.n_error:,}", "errors"),
        (f"{data.n_anomalous:,} ({anomalous_share:.1%})", "anomalous"),
        (_fmt(per_second, 1) if per_second else "not recorded", speed_label),
    ]
    card_html = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)
    model_rows = [
        ("method", meta.get("method")),
        ("backbone", meta.get("backbone")),
        ("layers", ", ".join(map(str, meta.get("layers", []))) or None),
        ("input size", meta.get("input_size")),
        ("memory bank size", meta.get("bank_size")),
        ("threshold (raw score)", _fmt(meta.get("threshold"), 5) if meta.get("threshold") is not None else None),
        ("calibrated on", _calibrated_on(calibration)),
        ("target false-alarm rate", calibration.get("target_rate", config.get("target_false_alarm_rate"))),
        ("certified false-alarm rate", _certified(calibration)),
        ("model history", _history(meta.get("history"))),
        ("vade version", meta.get("vade_version")),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in model_rows if v not in (None, ""))
    if not data.model_meta:
        rows = (
            '<tr><td class="bad">The scan output holds no model record (looked for OUT_DIR/model.json, '
            "scan.json and the maps.zarr attributes): model details and the fit-time normal scores are unknown.</td></tr>"
        )
    source = data.scan_meta.get("source")
    extra = f"<p class='sub'>source: {_e(source)}</p>" if source else ""
    return (
        f'<h2 id="summary">Run summary</h2><div class="cards">{card_html}</div>{extra}'
        f"<table>{rows}</table>"
        f"<p class='sub'>model record: {_e(data.model_meta_source or 'none')}</p>"
    )


def _calibrated_on(calibration: dict) -> str | None:
    source = calibration.get("source")
    n = calibration.get("n", len(calibration.get("normal_scores_normalized") or []))
    return f"{source}, {n} normal images" if source else None


def _certified(calibration: dict) -> str | None:
    """The threshold's guarantee, in words (engine.calibration), or that the model has none."""
    if not calibration:
        return None
    return calibration.get("statement") or "none: a quantile of the hold-out (model from before conformal thresholds)"


def _history(history: object) -> str | None:
    if not isinstance(history, list) or not history:
        return None
    return "; ".join(f"{e.get('event')} {str(e.get('when') or '')[:10]} on {e.get('images')} images "
                     f"(vade {e.get('vade_version')})" for e in history if isinstance(e, dict))


def false_alarm_note(flagged: int, good: int, calibration: dict) -> str:
    """The realised false-alarm rate on labelled normal images, its exact 95% interval, and what it
    says about the target (engine.calibration.clopper_pearson)."""
    from engine.calibration import clopper_pearson

    lo, hi = clopper_pearson(flagged, good)
    line = (f"False alarms on the {good:,} labelled good images: {flagged:,} ({flagged / good:.1%}; "
            f"95% Clopper-Pearson interval {lo:.1%} to {hi:.1%}).")
    target = calibration.get("target_rate")
    certified = calibration.get("certified_rate")
    n = calibration.get("n")
    if target is None or certified is None:
        return line + " The model's threshold has no certified rate (recalibrate with <code>vade calibrate</code>)."
    line += f" Target {target:.1%}; the threshold certifies {certified:.1%} from {n} normal images."
    if not calibration.get("sufficient", True):
        line += (f" {n} calibration images cannot certify {target:.1%} (that takes {max(1, round(1 / target - 1))}): "
                 f"the threshold is their maximum, and a rate near {certified:.1%} is what it promises.")
    if lo > max(target, certified):
        line += (" <b>The realised rate is above what the threshold promises</b>: these good images do not look like "
                 "the calibration images (new site, lighting, product variant) — recalibrate on normal images from "
                 "here with <code>vade calibrate</code>.")
    return line


def _scores_section(data: ScanData, reference: np.ndarray | None, ref_quantiles: dict | None) -> str:
    if not data.n_ok:
        return '<h2 id="scores">Scores</h2><p>No image was scored.</p>'
    uri = plots.histogram(data.hist_edges, data.score_hist, reference, ref_quantiles)
    return (
        '<h2 id="scores">Score distribution</h2>'
        f'<img class="plot" alt="histogram of image scores with the threshold at 0.5" src="{uri}">'
        "<p class='note'>Scores are normalised so that 0.5 is the model's calibrated threshold and 0 the median "
        "score of the normal images held out at fit time. The green band is where 90% of those normal images scored.</p>"
    )


def _label_section(data: ScanData) -> str:
    from sklearn.metrics import (  # only where labels exist: a slow import
        precision_recall_curve,
        roc_curve,
    )

    from engine.evaluation import metrics

    rows = data.labelled
    if not rows:
        return (
            '<h2 id="labels">Labelled accuracy</h2><p class="note">No labels: add a <code>label</code> or '
            "<code>defect</code> column to the manifest, or scan an MVTec-layout <code>test/</code> folder.</p>"
        )
    labels = np.array([r.label for r in rows])
    scores = np.array([r.score for r in rows])
    good = labels == "good"
    defects = sorted(set(labels[~good].tolist()), key=lambda d: -(labels == d).sum())
    table, curves = [], []
    for name in ["all", *defects]:
        subset = np.ones(len(rows), bool) if name == "all" else good | (labels == name)
        y = (~good[subset]).astype(int)
        s = scores[subset]
        auroc = metrics.image_auroc(y, s)
        f1, f1_threshold = metrics.f1_max_threshold(y, s)
        flagged = s >= 0.5
        recall = flagged[y == 1].mean() if (y == 1).any() else float("nan")
        false_alarms = flagged[y == 0].mean() if (y == 0).any() else float("nan")
        table.append((name, int((y == 1).sum()), int((y == 0).sum()), auroc, f1, f1_threshold, recall, false_alarms))
        if not np.isnan(auroc) and len(curves) <= MAX_CURVES:
            fpr, tpr, _ = roc_curve(y, s)
            precision, rec, _ = precision_recall_curve(y, s)
            curves.append((f"{name}, AUROC {auroc:.3f}, F1-max {f1:.3f}", fpr, tpr, rec, precision))
    body = "".join(
        f"<tr><td>{_e(n)}</td><td class='num'>{a}</td><td class='num'>{g}</td><td class='num'>{_fmt(au)}</td>"
        f"<td class='num'>{_fmt(f1)}</td><td class='num'>{_fmt(t)}</td><td class='num'>{_fmt(r)}</td>"
        f"<td class='num'>{_fmt(fa)}</td></tr>"
        for n, a, g, au, f1, t, r, fa in table
    )
    plot = f'<img class="plot" alt="ROC and precision-recall curves" src="{plots.roc_pr(curves)}">' if curves else ""
    sampled = "" if data.sample_fraction >= 1 else f" Computed on a random sample of {len(rows):,} labelled rows."
    meta = data.model_meta or {}
    calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    n_good = int(good.sum())
    far = f"<p class='note'>{false_alarm_note(int((scores[good] >= 0.5).sum()), n_good, calibration)}</p>" if n_good else ""
    return (
        '<h2 id="labels">Labelled accuracy</h2>'
        "<table><tr><th>defect type (vs good)</th><th>anomalous</th><th>good</th><th>AUROC</th><th>F1-max</th>"
        "<th>score at F1-max</th><th>recall at 0.5</th><th>false alarms at 0.5</th></tr>"
        f"{body}</table>{plot}<p class='note'>Each defect type is measured against all good images. "
        f"\"at 0.5\" uses the model's calibrated threshold, as <code>is_anomalous</code> does.{sampled}</p>{far}"
    )


def _resolve_image(path: str, data: ScanData) -> Path | None:
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    bases = [Path.cwd(), data.out_dir.parent]
    source = data.scan_meta.get("source")
    if isinstance(source, str):
        source_path = Path(source)
        bases.append(source_path if source_path.is_dir() else source_path.parent)
    for base in bases:
        if (base / candidate).is_file():
            return base / candidate
    return None


def _tiles(rows: list[Row], data: ScanData, maps: Any) -> str:
    out = []
    for rank, row in enumerate(rows, 1):
        amap = None
        if maps is not None and 0 <= row.index < maps.shape[0]:
            amap = np.asarray(maps[row.index], dtype=np.float32)  # one chunk: one image's map
            if row.map_shape is not None:  # a map that keeps the image's shape: the rest is NaN
                amap = amap[: row.map_shape[0], : row.map_shape[1]]
        image_path = _resolve_image(row.path, data)
        rgb = plots.load_thumbnail(image_path, TILE_BOX) if image_path is not None else None
        label = f" &middot; {_e(row.label)}" if row.label else ""
        raw = f" (raw {row.raw_score:.4g})" if row.raw_score is not None else ""
        out.append(
            f'<div class="tile"><img alt="image and anomaly map {rank}" src="{plots.tile(rgb, amap, TILE_BOX)}">'
            f"<b>#{rank} score {row.score:.3f}</b>{raw}{label}<div class='path' title='{_e(row.path)}'>{_e(row.path)}</div></div>"
        )
    return f'<div class="grid">{"".join(out)}</div>'


def _typical(data: ScanData, count: int, exclude: set[int]) -> list[Row]:
    """Rows scoring nearest the median of the scan: what normal looks like here."""
    candidates = [r for r in data.sample if r.index >= 0 and r.index not in exclude]
    if not candidates or count <= 0:
        return []
    median = float(np.median([r.score for r in candidates]))
    return sorted(candidates, key=lambda r: abs(r.score - median))[:count]


def _images_section(data: ScanData, contrast: int) -> str:
    maps = None
    try:
        import zarr

        maps = zarr.open_array(data.out_dir / "maps.zarr" / "maps", mode="r")
    except Exception:  # noqa: BLE001 - the report still shows the images and scores
        maps = None
    note = "" if maps is not None else "<p class='bad'>maps.zarr could not be opened: images shown without overlays.</p>"
    typical = _typical(data, contrast, {r.index for r in data.top})
    scale = (
        f"<p class='note'>Left: the image; right: its anomaly map over it, on one scale for all images "
        f"<span class='scale' style='background:{plots.colour_scale_css()}'></span>: dark = typical normal (0), "
        "orange = the threshold (0.5), yellow = far above it; transparent below 0.25. The cyan line encloses "
        "the pixels at or above the threshold.</p>"
    )
    return (
        f'<h2 id="anomalous">Most anomalous images</h2>{note}{scale}{_tiles(data.top, data, maps)}'
        f'<h2 id="typical">Typical images, for contrast</h2><p class="note">Scored nearest the median of this scan.</p>'
        f"{_tiles(typical, data, maps)}"
    )


def _p_value(p: float | None) -> str:
    if p is None:
        return ""
    return "&lt;1e-12" if p < 1e-12 else f"{p:.2g}"


def _drift_flag(group: GroupDrift) -> str:
    if not group.flagged:
        return ""
    return "DRIFT &uarr; (higher scores)" if group.median_shift >= 0 else "DRIFT &darr; (lower scores)"


def _drift_section(data: ScanData, result: DriftResult) -> str:
    if not result.groups or not data.n_ok:
        return '<h2 id="drift">Drift</h2><p>No scored images.</p>'
    label = f"drift group ({data.group_kind})"
    plot = plots.drift_plot(result, label)
    shown = result.flagged[:MAX_DRIFT_ROWS] + [g for g in result.groups if not g.flagged][: max(0, MAX_DRIFT_ROWS - len(result.flagged))]
    shown = sorted(shown, key=lambda g: result.groups.index(g))
    rows = "".join(
        f"<tr class='{'flag' if g.flagged else ''}'><td>{_e(g.name)}</td><td class='num'>{g.n:,}</td>"
        f"<td class='num'>{_fmt(g.quantiles[0.05])}</td><td class='num'>{_fmt(g.quantiles[0.5])}</td>"
        f"<td class='num'>{_fmt(g.quantiles[0.95])}</td><td class='num'>{g.median_shift:+.3f}</td>"
        f"<td class='num'>{_fmt(g.share_above_threshold)}</td>"
        f"<td class='num'>{_fmt(g.statistic)}</td><td class='num'>{_p_value(g.p_value)}</td>"
        f"<td>{_drift_flag(g)}</td></tr>"
        for g in shown
    )
    more = f"<p class='sub'>{len(result.groups) - len(shown)} more groups not listed (all drawn above).</p>" if len(shown) < len(result.groups) else ""
    return (
        f'<h2 id="drift">Drift by {_e(data.group_kind)}</h2>'
        f"<p class='note'><b>{len(result.flagged)} of {len(result.groups)} groups flagged.</b> Statistic: {_e(result.statistic_name)}; "
        f"compared with {_e(result.reference)}; flagged when {_e(result.rule)}. Median shift is the group's median "
        "minus the reference median. A group flagged &uarr; has drifted towards the threshold (new lighting, "
        "camera, product variant: expect false alarms) or holds many anomalous images; &darr; means its images "
        "score lower than the fit-time normals (e.g. the training images themselves, or a change that hides detail).</p>"
        f'<img class="plot" alt="score quantiles per group" src="{plot}">'
        "<table><tr><th>group</th><th>images</th><th>5%</th><th>median</th><th>95%</th><th>median shift</th>"
        "<th>share &ge; 0.5</th>"
        f"<th>statistic</th><th>p</th><th></th></tr>{rows}</table>{more}"
    )


def _errors_section(data: ScanData) -> str:
    if not data.errors:
        return '<h2 id="errors">Errors</h2><p>No errors: every image was read and scored.</p>'
    rows = "".join(
        f"<tr><td>{_e(msg)}</td><td class='num'>{count:,}</td><td>{'<br>'.join(_e(p) for p in examples)}</td></tr>"
        for msg, count, examples in data.errors
    )
    return (
        f'<h2 id="errors">Errors ({data.n_error:,} image{"s" if data.n_error != 1 else ""})</h2>'
        f"<table><tr><th>message</th><th>images</th><th>examples</th></tr>{rows}</table>"
    )


def render(data: ScanData, *, contrast: int = 8) -> str:
    """The whole page as one string."""
    reference, ref_quantiles = normal_reference(data.model_meta)
    drift_result = drift(data.hist_edges, data.group_hists, data.group_names, reference, ref_quantiles)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sampled = (
        f"<p class='note'>This scan has {data.n_rows:,} rows; the curves and the typical images use a random sample "
        f"of {data.sample_fraction:.2%} of them. Counts, histograms, drift and the most anomalous images use every row.</p>"
        if data.sample_fraction < 1
        else ""
    )
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [("summary", "Summary"), ("scores", "Scores"), ("labels", "Labels"), ("anomalous", "Anomalous"), ("drift", "Drift"), ("errors", "Errors")]
    )
    sections = [
        _summary(data),
        _scores_section(data, reference, ref_quantiles),
        _label_section(data),
        _images_section(data, contrast),
        _drift_section(data, drift_result),
        _errors_section(data),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>vade report: {_e(data.out_dir.name)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>vade scan report</h1><div class='sub'>{_e(data.out_dir)} &middot; generated {generated} by vade {__version__}</div>"
        f"<nav>{nav}</nav>{sampled}{''.join(sections)}</main></body></html>"
    )


def build_report(
    out_dir: str | Path,
    *,
    out: str | Path | None = None,
    top: int = 24,
    contrast: int = 8,
    group_by: str = "auto",
    sample_rows: int = 200_000,
) -> Path:
    """Write the report of the scan in OUT_DIR (default OUT_DIR/report.html); returns its path."""
    data = load_scan(Path(out_dir), top=top, sample_rows=sample_rows, group_by=group_by)
    page = render(data, contrast=contrast)
    target = Path(out) if out else Path(out_dir) / "report.html"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
