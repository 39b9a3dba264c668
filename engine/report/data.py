"""Read a scan's output folder for the report in bounded memory: one streaming pass over scores.parquet.

What is kept, whatever the number of rows: counts; a fine histogram of scores per drift group (exact);
the top-N rows by score; error messages with counts and a few example paths; and a random sample of
at most `sample_rows` rows (score, label, path, map index) for the curves and the contrast images.
Maps are never read here: the report reads only the few it shows, by index.
"""

from __future__ import annotations

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
from engine.report.meta import find_model_meta, normal_reference, read_json

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
    map_shape: tuple[int, int] | None = None  # (map_height, map_width) of maps that keep the image's shape


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


# Quoted text with a "/" in it, bare tokens with a "/", Windows paths. A lone backslash is usually an
# escape in a repr (b'hello\n'), not a path.
_PATH_TOKEN = re.compile(r"""'[^'\n]*/[^'\n]*'|"[^"\n]*/[^"\n]*"|\S*/\S*|\b[A-Za-z]:\\\S*""")
_BYTES_REPR = re.compile(r"\bb'(?:[^'\\]|\\.)*'|\bb\"(?:[^\"\\]|\\.)*\"")  # a file's first bytes


def _error_message(text: str | None) -> str:
    """The first line of an error, file paths replaced: the same failure on two files is one group."""
    lines = (text or "").strip().splitlines()
    if not lines:
        return "unknown error"
    message = _BYTES_REPR.sub("<bytes>", re.sub(r"\s+", " ", lines[0]))
    return _PATH_TOKEN.sub("<path>", message)[:300]


class _Accumulator:
    """Folds record batches of scores.parquet into a ScanData; memory bounded by top, sample and groups."""

    def __init__(self, data: ScanData, grouper: _Grouper, top: int, seed: int):
        self.data, self.grouper, self.top = data, grouper, top
        self.hists = np.zeros((max(len(grouper.names), 1), HIST_BINS), dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.top_rows: list[Row] = []
        self.error_counts: Counter[str] = Counter()
        self.error_examples: dict[str, list[str]] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        data = self.data
        ok = batch.column("status").to_numpy(zero_copy_only=False) == "ok"
        scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        usable = ok & np.isfinite(scores)
        data.n_rows += batch.num_rows
        data.n_ok += int(ok.sum())
        data.n_error += int((~ok).sum())
        if "is_anomalous" in batch.schema.names:
            flagged = batch.column("is_anomalous").to_numpy(zero_copy_only=False)
            data.n_anomalous += int((ok & (flagged == True)).sum())  # noqa: E712 - nulls are not anomalous
        else:
            data.n_anomalous += int((scores[usable] >= 0.5).sum())
        self._histogram(batch, scores, usable)
        self._keep_rows(batch, scores, usable)
        if (~ok).any():
            self._errors(batch, np.flatnonzero(~ok))

    def _histogram(self, batch: pa.RecordBatch, scores: np.ndarray, usable: np.ndarray) -> None:
        groups = self.grouper.assign(batch)
        if len(self.grouper.names) > self.hists.shape[0]:  # new folders in this batch
            extra = np.zeros((len(self.grouper.names) - self.hists.shape[0], HIST_BINS), np.int64)
            self.hists = np.vstack([self.hists, extra])
        bins = np.clip(np.searchsorted(self.data.hist_edges, scores, side="right") - 1, 0, HIST_BINS - 1)
        flat = groups[usable] * HIST_BINS + bins[usable]
        self.hists += np.bincount(flat, minlength=self.hists.size).reshape(self.hists.shape)

    def _keep_rows(self, batch: pa.RecordBatch, scores: np.ndarray, usable: np.ndarray) -> None:
        """The batch's best rows (candidates for the top N) and its share of the random sample."""
        index = batch.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
        take_top = np.flatnonzero(usable & (index >= 0)) if self.top > 0 else np.zeros(0, np.int64)
        if take_top.size > self.top:
            take_top = take_top[np.argpartition(-scores[take_top], self.top - 1)[: self.top]]
        take_sample = np.flatnonzero(usable & (self.rng.random(batch.num_rows) < self.data.sample_fraction))
        chosen = np.union1d(take_top, take_sample)
        if not chosen.size:
            return
        subset = batch.take(pa.array(chosen))
        labels = _labels(subset)
        paths = subset.column("path").to_pylist()
        has_raw = "raw_score" in batch.schema.names
        raw = subset.column("raw_score").to_pylist() if has_raw else [None] * chosen.size
        in_top, in_sample = np.isin(chosen, take_top), np.isin(chosen, take_sample)
        shaped = "map_height" in batch.schema.names
        heights = subset.column("map_height").to_pylist() if shaped else [None] * chosen.size
        widths = subset.column("map_width").to_pylist() if shaped else [None] * chosen.size
        for j, i in enumerate(chosen):
            shape = (heights[j], widths[j]) if heights[j] and widths[j] else None
            row = Row(paths[j], int(index[i]), float(scores[i]), raw[j], labels[j], shape)
            if in_top[j]:
                self.top_rows.append(row)
            if in_sample[j]:
                self.data.sample.append(row)
        self.top_rows = sorted(self.top_rows, key=lambda r: -r.score)[: self.top]

    def _errors(self, batch: pa.RecordBatch, bad: np.ndarray) -> None:
        take = pa.array(bad)
        has_error = "error" in batch.schema.names
        messages = batch.column("error").take(take).to_pylist() if has_error else [None] * bad.size
        for message, path in zip(messages, batch.column("path").take(take).to_pylist()):
            key = _error_message(message)
            if key not in self.error_counts and len(self.error_counts) >= MAX_ERROR_MESSAGES:
                key = "(other messages)"
            self.error_counts[key] += 1
            examples = self.error_examples.setdefault(key, [])
            if len(examples) < 3:
                examples.append(path)

    def finish(self, label_columns: bool) -> ScanData:
        data = self.data
        if not label_columns and not any(r.label == "good" for r in data.sample):
            # A `test/<x>/` folder without `test/good/` is not the MVTec layout: these are no labels.
            for row in data.sample + self.top_rows:
                row.label = None
        data.top = self.top_rows
        data.group_names = self.grouper.names
        data.group_hists = self.hists[: len(self.grouper.names)]
        data.errors = [(m, c, self.error_examples[m]) for m, c in self.error_counts.most_common()]
        return data


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
    data.scan_meta = read_json(out_dir / "scan.json") or {}
    data.model_meta, data.model_meta_source = find_model_meta(out_dir, data.scan_meta)
    reference, _ = normal_reference(data.model_meta)
    first = _first_pass(pf, _time_column(pf.schema_arrow))
    kind, time_column = _choose_grouping(group_by, pf.schema_arrow, first)
    grouper = _Grouper(kind, first, time_column)
    data.group_kind = f"time column {time_column!r}" if kind == "time" else kind
    data.hist_edges = _edges(first["scores"], reference)
    data.sample_fraction = min(1.0, sample_rows / max(pf.metadata.num_rows, 1))

    accumulator = _Accumulator(data, grouper, top, seed)
    wanted = [c for c in ("path", "index", "score", "raw_score", "status", "error", "is_anomalous", "shard", "label", "defect",
                          "map_height", "map_width") if c in names]
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted + ([time_column] if time_column else [])):
        accumulator.add(batch)
    return accumulator.finish(label_columns=bool({"defect", "label"} & set(names)))
