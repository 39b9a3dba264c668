"""Read a scan's output folder for the report in bounded memory: one streaming pass over scores.parquet.

What is kept, whatever the number of rows: counts; a fine histogram of scores per drift group (exact);
the top-N rows by score; error messages with counts and a few example paths; and a random sample of
at most `sample_rows` rows (score, label, path, map index) for the curves and the contrast images.
Maps are never read here: the report reads only the few it shows, by index.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import DataError

REQUIRED_COLUMNS = ("path", "index", "score", "status")
TIME_COLUMNS = ("timestamp", "time", "datetime", "date", "captured_at", "acquired_at")
NORMAL_LABELS = frozenset({"good", "normal", "ok", "0", "false", "negative"})
MAX_GROUPS = 400  # drift groups drawn; more shards are merged into runs of consecutive shards
MAX_ERROR_MESSAGES = 500
HIST_BINS = 1000
_BATCH_ROWS = 65_536
_MVTEC_DEFECT = r"(?:^|[/\\])test[/\\](?P<defect>[^/\\]+)[/\\][^/\\]+$"  # .../test/<defect>/<file>


@dataclass
class Row:
    """One scanned image shown in the report."""

    path: str
    index: int
    score: float
    raw_score: float | None
    label: str | None


@dataclass
class ScanData:
    out_dir: Path
    n_rows: int = 0
    n_ok: int = 0
    n_error: int = 0
    n_anomalous: int = 0
    scan_meta: dict[str, Any] = field(default_factory=dict)  # scan.json, when present
    model_meta: dict[str, Any] | None = None
    model_meta_source: str = ""
    hist_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    group_kind: str = "shard"  # what the drift groups are: shard | folder | time column NAME
    group_names: list[str] = field(default_factory=list)
    group_hists: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (groups, bins)
    top: list[Row] = field(default_factory=list)
    sample: list[Row] = field(default_factory=list)
    sample_fraction: float = 1.0
    errors: list[tuple[str, int, list[str]]] = field(default_factory=list)  # message, count, examples
    columns: list[str] = field(default_factory=list)

    @property
    def score_hist(self) -> np.ndarray:
        return self.group_hists.sum(axis=0) if self.group_hists.size else np.zeros(max(len(self.hist_edges) - 1, 0))

    @property
    def labelled(self) -> list[Row]:
        return [r for r in self.sample if r.label is not None]


def _read_json(path: Path) -> dict[str, Any] | None:
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
    meta = _read_json(out_dir / "model.json")
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


def _column_labels(values: list[Any]) -> list[str | None]:
    out: list[str | None] = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(None)
        elif isinstance(value, (bool, int, float)):
            out.append("anomalous" if value else "good")
        else:
            text = str(value).strip()
            out.append("good" if text.lower() in NORMAL_LABELS else ("anomalous" if text == "1" else text))
    return out


def _labels(batch: pa.RecordBatch) -> list[str | None]:
    """Defect type per row ('good' = normal): a `defect` or `label` column, else the MVTec path layout."""
    for column in ("defect", "label"):
        if column in batch.schema.names:
            return _column_labels(batch.column(column).to_pylist())
    if not batch.num_rows:
        return []
    # the struct is null (its field "") where the path is not .../test/<defect>/<file>
    found = pc.extract_regex(batch.column("path"), _MVTEC_DEFECT).field("defect").to_pylist()
    return [defect or None for defect in found]


def _time_column(schema: pa.Schema) -> str | None:
    for name in TIME_COLUMNS:
        if name in schema.names and (pa.types.is_timestamp(schema.field(name).type) or pa.types.is_date(schema.field(name).type)):
            return name
    return None


def _micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps or dates as float microseconds since the epoch, NaN where null."""
    as_int = column.cast(pa.timestamp("us")).cast(pa.int64())
    return as_int.to_numpy(zero_copy_only=False).astype(np.float64)


def _first_pass(pf: pq.ParquetFile, time_column: str | None) -> dict[str, Any]:
    """Score range, robust quantiles, shard range and time range: just the numeric columns."""
    columns = ["score", "status"] + (["shard"] if "shard" in pf.schema_arrow.names else [])
    columns += [time_column] if time_column else []
    scores, shard_max, t_min, t_max = [], -1, None, None
    stride = max(1, pf.metadata.num_rows // 200_000)
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        ok = pc.equal(batch.column("status"), "ok")
        values = pc.filter(batch.column("score"), ok).to_numpy(zero_copy_only=False)
        scores.append(values[np.isfinite(values)][::stride])
        if "shard" in columns and batch.num_rows:
            shard_max = max(shard_max, int(pc.max(batch.column("shard")).as_py() or 0))
        if time_column and batch.num_rows:
            micros = _micros(batch.column(time_column))
            micros = micros[~np.isnan(micros)]
            if micros.size:
                t_min = micros.min() if t_min is None else min(t_min, micros.min())
                t_max = micros.max() if t_max is None else max(t_max, micros.max())
    sampled = np.concatenate(scores) if scores else np.zeros(0)
    return {"scores": sampled, "shard_max": shard_max, "t_min": t_min, "t_max": t_max}


def _edges(sampled_scores: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Fine histogram edges covering the bulk (0.1%..99.9%) of the scores, 0, the threshold and the reference."""
    points = [0.0, 1.0]
    if sampled_scores.size:
        points += list(np.quantile(sampled_scores, [0.001, 0.999]))
    if reference is not None and reference.size:
        points += [float(reference.min()), float(reference.max())]
    lo, hi = min(points), max(points)
    pad = 0.05 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, HIST_BINS + 1)


class _Grouper:
    """Maps rows to drift groups: time bins, shard runs, or folders, at most MAX_GROUPS."""

    def __init__(self, kind: str, first: dict[str, Any], time_column: str | None):
        self.kind = kind
        self.names: list[str] = []
        self.folder_ids: dict[str, int] = {}
        if kind == "shard":
            n_shards = first["shard_max"] + 1
            self.per_group = max(1, math.ceil(n_shards / MAX_GROUPS))
            for g in range(math.ceil(n_shards / self.per_group)):
                lo, hi = g * self.per_group, min(n_shards, (g + 1) * self.per_group) - 1
                self.names.append(str(lo) if lo == hi else f"{lo}-{hi}")
        elif kind == "time":
            self.column = time_column
            self.t_min, self.t_max = first["t_min"], first["t_max"]
            span = 0.0 if self.t_min is None else self.t_max - self.t_min
            self.n_bins = 1 if span <= 0 else 24
            self.bin_micros = max(span / self.n_bins, 1.0)
            for b in range(self.n_bins if self.t_min is not None else 0):
                start = np.datetime64(int(self.t_min + b * self.bin_micros), "us")
                self.names.append(str(start)[:19].replace("T", " "))
            self.names.append("no time")

    def assign(self, batch: pa.RecordBatch) -> np.ndarray:
        if self.kind == "shard":
            return batch.column("shard").to_numpy(zero_copy_only=False).astype(np.int64) // self.per_group
        if self.kind == "time":
            if self.t_min is None:
                return np.full(batch.num_rows, len(self.names) - 1)
            offset = _micros(batch.column(self.column)) - self.t_min
            with np.errstate(invalid="ignore"):
                out = np.clip(np.floor(offset / self.bin_micros), 0, self.n_bins - 1)
            return np.where(np.isnan(offset), len(self.names) - 1, out).astype(np.int64)
        folders = pc.replace_substring_regex(batch.column("path"), r"[/\\][^/\\]*$", "").to_pylist()
        ids = np.empty(len(folders), dtype=np.int64)
        for i, folder in enumerate(folders):
            folder = folder or "."
            if folder not in self.folder_ids:
                if len(self.names) < MAX_GROUPS - 1:
                    self.folder_ids[folder] = len(self.names)
                    self.names.append(folder)
                else:
                    if "other folders" not in self.folder_ids:
                        self.folder_ids["other folders"] = len(self.names)
                        self.names.append("other folders")
                    self.folder_ids[folder] = self.folder_ids["other folders"]
            ids[i] = self.folder_ids[folder]
        return ids


def _choose_grouping(requested: str, schema: pa.Schema, first: dict[str, Any]) -> tuple[str, str | None]:
    time_column = _time_column(schema)
    if requested == "auto":
        if time_column and first["t_min"] is not None:
            return "time", time_column
        return ("shard", None) if first["shard_max"] > 0 else ("folder", None)
    if requested == "time":
        if not time_column:
            raise DataError(f"--group-by time: scores.parquet has no timestamp or date column named one of {TIME_COLUMNS}")
        return "time", time_column
    if requested == "shard" and "shard" not in schema.names:
        raise DataError("--group-by shard: scores.parquet has no `shard` column")
    if requested not in ("shard", "folder"):
        raise DataError(f"--group-by must be auto, shard, folder or time; got {requested!r}")
    return requested, None


_PATH_TOKEN = re.compile(r"""'[^']*[/\\][^']*'|"[^"]*[/\\][^"]*"|\S*[/\\]\S*""")


def _error_message(text: str | None) -> str:
    """The first line of an error, file paths replaced: the same failure on two files is one group."""
    lines = (text or "").strip().splitlines()
    if not lines:
        return "unknown error"
    return _PATH_TOKEN.sub("<path>", re.sub(r"\s+", " ", lines[0]))[:300]


def load_scan(out_dir: Path, *, top: int = 24, sample_rows: int = 200_000, group_by: str = "auto", seed: int = 0) -> ScanData:
    """Everything the report shows about OUT_DIR, in memory bounded by top, sample_rows and the groups."""
    out_dir = Path(out_dir)
    scores_path = out_dir / "scores.parquet"
    if not scores_path.is_file():
        hint = " (the scan has not finished: resume it with `vade scan ... --resume`)" if (out_dir / "_parts").is_dir() else ""
        raise DataError(f"{scores_path} not found: OUT_DIR must be the --out folder of a finished `vade scan`{hint}")
    try:
        pf = pq.ParquetFile(scores_path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{scores_path} is not a readable Parquet file: {exc}") from exc
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(f"{scores_path} lacks the columns {missing}; a vade scan writes {list(REQUIRED_COLUMNS)} at least")

    data = ScanData(out_dir=out_dir, columns=names)
    data.scan_meta = _read_json(out_dir / "scan.json") or {}
    data.model_meta, data.model_meta_source = find_model_meta(out_dir, data.scan_meta)
    reference, _ = normal_reference(data.model_meta)
    time_column = _time_column(pf.schema_arrow)
    first = _first_pass(pf, time_column)
    kind, time_column = _choose_grouping(group_by, pf.schema_arrow, first)
    grouper = _Grouper(kind, first, time_column)
    data.group_kind = f"time column {time_column!r}" if kind == "time" else kind
    data.hist_edges = _edges(first["scores"], reference)
    hists = np.zeros((max(len(grouper.names), 1), HIST_BINS), dtype=np.int64)

    n_total = pf.metadata.num_rows
    data.sample_fraction = min(1.0, sample_rows / max(n_total, 1))
    rng = np.random.default_rng(seed)
    top_rows: list[Row] = []
    error_counts: Counter[str] = Counter()
    error_examples: dict[str, list[str]] = {}
    wanted = [c for c in ("path", "index", "score", "raw_score", "status", "error", "is_anomalous", "shard", "label", "defect") if c in names]
    wanted += [time_column] if time_column else []
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
        n = batch.num_rows
        data.n_rows += n
        status = batch.column("status").to_numpy(zero_copy_only=False)
        ok = status == "ok"
        data.n_ok += int(ok.sum())
        data.n_error += int((~ok).sum())
        if "is_anomalous" in batch.schema.names:
            data.n_anomalous += int(pc.sum(pc.and_(batch.column("is_anomalous"), pa.array(ok))).as_py() or 0)
        scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        usable = ok & np.isfinite(scores)
        if "is_anomalous" not in batch.schema.names:
            data.n_anomalous += int((scores[usable] >= 0.5).sum())
        groups = grouper.assign(batch)
        if len(grouper.names) > hists.shape[0]:  # folders found so far
            hists = np.vstack([hists, np.zeros((len(grouper.names) - hists.shape[0], HIST_BINS), np.int64)])
        bins = np.clip(np.searchsorted(data.hist_edges, scores, side="right") - 1, 0, HIST_BINS - 1)
        flat = groups[usable] * HIST_BINS + bins[usable]
        hists += np.bincount(flat, minlength=hists.size).reshape(hists.shape)

        index = batch.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
        with_map = usable & (index >= 0)
        take_top = np.flatnonzero(with_map)
        if take_top.size > top:
            take_top = take_top[np.argpartition(-scores[take_top], top - 1)[:top]]
        take_sample = np.flatnonzero(usable & (rng.random(n) < data.sample_fraction))
        chosen = np.union1d(take_top, take_sample)
        if chosen.size:
            subset = batch.take(pa.array(chosen))
            labels = _labels(subset)
            paths = subset.column("path").to_pylist()
            raw = subset.column("raw_score").to_pylist() if "raw_score" in names else [None] * chosen.size
            in_top, in_sample = np.isin(chosen, take_top), np.isin(chosen, take_sample)
            for j, i in enumerate(chosen):
                row = Row(paths[j], int(index[i]), float(scores[i]), raw[j], labels[j])
                if in_top[j]:
                    top_rows.append(row)
                if in_sample[j]:
                    data.sample.append(row)
            top_rows = sorted(top_rows, key=lambda r: -r.score)[:top]

        if (~ok).any():
            bad = np.flatnonzero(~ok)
            messages = batch.column("error").take(pa.array(bad)).to_pylist() if "error" in names else [None] * bad.size
            bad_paths = batch.column("path").take(pa.array(bad)).to_pylist()
            for message, path in zip(messages, bad_paths):
                key = _error_message(message)
                if key not in error_counts and len(error_counts) >= MAX_ERROR_MESSAGES:
                    key = "(other messages)"
                error_counts[key] += 1
                examples = error_examples.setdefault(key, [])
                if len(examples) < 3:
                    examples.append(path)
    if not {"defect", "label"} & set(names) and not any(r.label == "good" for r in data.sample):
        # A `test/<x>/` folder without `test/good/` is not the MVTec layout: these are no labels.
        for row in data.sample + top_rows:
            row.label = None
    data.top = top_rows
    data.group_names = grouper.names
    data.group_hists = hists[: len(grouper.names)]
    data.errors = [(msg, count, error_examples[msg]) for msg, count in error_counts.most_common()]
    return data
