"""Scan a collection: plan it, run its shards (resumably), consolidate. The public scan API.

    result = scan(model_dir, source, out_dir, device="cpu")        # one process, the default
    job = open_scan(model_dir, source, out_dir, options, resume=True)  # a driver that runs shards itself
    for shard in job.pending_shards(): run_shard(job.model, shard, out_dir, options)   # anywhere
    job.finish()

A shard is the unit of work and of retry: run_shard writes its Zarr chunks, then its Parquet part,
then its completion marker, and rerunning it rewrites the same values. open_scan creates OUT_DIR (or
reopens it with --resume, refusing a different model, input or setting); finish() consolidates the
parts into scores.parquet. The single-process scan streams all pending shards through one overlapped
loop (engine.scan.loop) so decoding never stalls between shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import __version__
from engine.artifact import model_fingerprint
from engine.errors import ConfigError
from engine.faults import machine_faults
from engine.inputs.decoders import make_decoder
from engine.inputs.listing import LISTING_NAME, ListingSource, write_listing
from engine.inputs.sources import Shard, Source, iter_shards, open_source, shard_count
from engine.scan.batches import StageTimes
from engine.scan.guard import ModelGuard
from engine.scan.lock import LOCK_NAME, ScanLock
from engine.scan.loop import run_shards
from engine.scan.options import (
    MODEL_BATCH,
    ScanOptions,
    auto_shard_size,
    resolve_model_batch,
)
from engine.scan.progress import Progress
from engine.scan.store import (
    ScanStore,
    ShardCounts,
    check_new_out_dir,
    encode_schema,
    is_bookkeeping,
    rows_schema,
)

__all__ = ["MODEL_BATCH", "ScanJob", "ScanOptions", "ScanResult", "open_scan", "run_shard", "scan"]


def run_shard(model: Any, shard: Shard, out_dir: str | Path, options: ScanOptions) -> ShardCounts:
    """Scan one shard into a scan folder made by open_scan: the idempotent unit of work and of retry.

    Writes the shard's Zarr chunks, then its Parquet part, then its completion marker; rerunning it
    rewrites the same values. Returns the shard's counts.
    """
    store = ScanStore.open(Path(out_dir))
    counts: list[ShardCounts] = []
    run_shards(model, [shard], store, options, on_shard_done=lambda _s, c: counts.append(c))
    return counts[0]


@dataclass
class ScanResult:
    out_dir: Path
    counts: ShardCounts
    total: int
    shards: int
    shards_skipped: int
    seconds: float
    times: StageTimes
    decoder: str
    device: str
    threshold_note: str = ""  # what the threshold promises (engine.calibration), from the model's record

    def summary(self) -> str:
        line = (
            f"scanned {self.total} images: {self.counts.ok} ok, {self.counts.error} error, "
            f"{self.counts.anomalous} anomalous -> {self.out_dir}"
        )
        return f"{line}\n{self.threshold_note}" if self.threshold_note else line


def threshold_note(meta: dict) -> str:
    """How sure the threshold is, from a model's model.json record: n, requested and certified rate."""
    cal = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    if cal.get("statement"):
        return f"anomalous = above the threshold: {cal['statement']}"
    n = len(cal.get("normal_scores") or [])
    return (f"anomalous = above the threshold, a quantile of {n} {cal.get('source', 'hold-out')} scores: no certified "
            "false-alarm rate (model from before conformal thresholds; `vade calibrate` gives one)")


@dataclass
class ScanJob:
    """An opened scan: its model, source, output store and the shards already done."""

    model: Any
    source: Source
    store: ScanStore
    options: ScanOptions
    done: set[int]
    lock: ScanLock | None = None  # held from open_scan to close(): one writer per OUT_DIR

    def close(self) -> None:
        """Release OUT_DIR's lock (also done when the job is garbage-collected or the process ends)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> ScanJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total(self) -> int:
        return int(self.store.manifest["count"])

    @property
    def shards(self) -> int:
        return int(self.store.manifest["shards"])

    def done_counts(self) -> ShardCounts:
        counts = ShardCounts()
        for shard_id in self.store.done_shards():
            counts += self.store.done_counts(shard_id)
        return counts

    def pending_shards(self) -> Iterator[Shard]:
        """Shards without a completion marker, in order, one shard's records in memory at a time."""
        if self.store.is_complete():
            return iter(())
        return (s for s in iter_shards(self.source, self.options.shard_size) if s.id not in self.done)

    def finish(self) -> ShardCounts:
        """Consolidate scores.parquet once every shard is done; returns the scan's counts."""
        if not self.store.is_complete():
            missing = sorted(set(range(self.shards)) - set(self.store.done_shards()))
            if missing:
                raise ConfigError(f"cannot consolidate {self.store.out_dir}: shards {missing[:10]} are not done")
            self.store.consolidate(range(self.shards))
        (self.store.out_dir / LISTING_NAME).unlink(missing_ok=True)
        return self.done_counts()


def map_slot(model: Any) -> int:
    """Side of each image's slot in maps.zarr: the input size (whole-image models) or map_size (tiled)."""
    return int(model.input_size) if model.tile_spec is None else int(model.tile_spec.map_size)


def _maps_attrs(model: Any, size: int) -> dict[str, Any]:
    meta = model.meta
    spec = model.tile_spec
    if spec is None:
        resize = {
            "policy": "stretch: each image (EXIF orientation applied) was resized to map_size, aspect ratio not kept",
            "method": "bilinear with antialias (images over 16 MP first box-averaged by an integer factor)",
            "to_image": "resize maps[i] to (height, width) from its row: map pixel (y, x) covers image rows "
            "[y*height/H, (y+1)*height/H) and columns [x*width/W, (x+1)*width/W)",
        }
    else:
        scale = "short side to the tile size" if spec.scale <= 0 else f"by {spec.scale:g}"
        resize = {
            "policy": f"tiled: each image (EXIF orientation applied) resized {scale}, cut into {spec.tile} px tiles "
            f"overlapping by {spec.overlap:g}, patch grids stitched; the map keeps the image's aspect ratio, long "
            f"side at most {spec.map_size}",
            "method": "bilinear with antialias (images over 16 MP first box-averaged by an integer factor)",
            "to_image": "the map of row r is maps[r.index][:r.map_height, :r.map_width] (the rest of the slot is NaN); "
            "resize it to (height, width): map pixel (y, x) covers image rows [y*height/map_height, "
            "(y+1)*height/map_height) and columns [x*width/map_width, (x+1)*width/map_width)",
        }
    return {
        "description": "per-pixel anomaly maps, normalised so that 0.5 is the model's calibrated threshold",
        "rows": "maps[i] belongs to the scores.parquet row whose `index` is i; error rows have index -1 "
        "and no map (their slot reads as NaN)",
        "map_size": [size, size],
        "resize": resize,
        "threshold_normalised": 0.5,
        "threshold_raw": float(model.threshold),
        "model": {k: meta.get(k) for k in ("method", "backbone", "layers", "input_size", "bank_size")},
        "vade_version": __version__,
    }


def _is_fresh(out_dir: Path) -> bool:
    return not out_dir.exists() or (out_dir.is_dir() and not any(not is_bookkeeping(p.name) for p in out_dir.iterdir()))


def open_scan(
    model_dir: str | Path,
    source: str | Path,
    out_dir: str | Path,
    options: ScanOptions,
    *,
    resume: bool = False,
    model: Any = None,
    say: Callable[[str], None] | None = None,
    workers: int = 1,
) -> ScanJob:
    """Load the model, plan SOURCE (one streaming pass) and create OUT_DIR, or reopen it to resume.

    shard_size 0 resolves to auto_shard_size(count, workers) for a new scan and to the stored size on
    resume; job.options holds the resolved value. Takes OUT_DIR's lock first (engine.scan.lock): a second scan into it is refused (ScanLocked); the
    job holds the lock until close()."""
    options.validate()
    out_dir = Path(out_dir)
    if not resume and not (out_dir / LOCK_NAME).exists():
        check_new_out_dir(out_dir)  # before any slow work (a locked folder: the lock says more)
    lock = ScanLock.acquire(out_dir, say)
    try:
        job = _open_locked(model_dir, source, out_dir, options, resume, model, workers)
    except BaseException:
        lock.release()
        raise
    job.lock = lock
    return job


def _open_locked(
    model_dir: str | Path, source: str | Path, out_dir: Path, options: ScanOptions, resume: bool, model: Any,
    workers: int,
) -> ScanJob:  # fmt: skip
    from engine.models.registry import load_model

    if not resume:
        check_new_out_dir(out_dir)  # again, under the lock
    src = open_source(source)
    model = model if model is not None else load_model(model_dir, device=options.device)
    for stale in out_dir.glob(LISTING_NAME + ".tmp-*"):  # left by a scan killed while planning
        stale.unlink(missing_ok=True)
    listing = out_dir / LISTING_NAME
    tmp = listing.with_name(f"{LISTING_NAME}.tmp-{os.getpid()}")
    try:
        job = _create_or_reopen(model_dir, source, out_dir, options, resume, model, src, tmp, workers)
        os.replace(tmp, listing)  # shards are cut from what was listed, not from a second walk
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    job.source = ListingSource(src, listing)
    return job


def _create_or_reopen(
    model_dir: str | Path, source: str | Path, out_dir: Path, options: ScanOptions, resume: bool, model: Any,
    src: Source, listing: Path, workers: int,
) -> ScanJob:  # fmt: skip
    planned = write_listing(src, listing)
    reopening = resume and not _is_fresh(out_dir)
    if not options.shard_size:
        stored = _stored_shard_size(out_dir) if reopening else None
        options = dataclasses.replace(options, shard_size=stored or auto_shard_size(planned.count, workers))
    manifest = {
        "vade_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_dir": str(model_dir),
        "model_fingerprint": model_fingerprint(model_dir),
        "source": str(source),
        "source_kind": src.kind,
        "source_columns": src.extra_schema.names,
        "count": planned.count,
        "source_fingerprint": planned.fingerprint,
        "shard_size": options.shard_size,
        "shards": shard_count(planned.count, options.shard_size),
        "map_size": map_slot(model),
        "max_pixels": options.max_pixels,
        "model_batch": resolve_model_batch(options, model.device.type),
        "device_type": model.device.type,
        "rows_schema": encode_schema(rows_schema(src.extra_schema, map_shapes=model.tile_spec is not None)),
        "model_meta": model.meta,
    }
    if reopening:
        store = ScanStore.reopen(out_dir, manifest)
    else:
        store = ScanStore.create(out_dir, manifest, _maps_attrs(model, map_slot(model)))
    return ScanJob(model, src, store, options, set(store.done_shards()))


def _stored_shard_size(out_dir: Path) -> int | None:
    """The shard size a scan to resume was started with (its scan.json), if readable."""
    try:
        return int(json.loads((out_dir / "scan.json").read_text(encoding="utf-8"))["shard_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # ScanStore.reopen says what is wrong with the folder


def scan(
    model_dir: str | Path,
    source: str | Path,
    out_dir: str | Path,
    options: ScanOptions | None = None,
    *,
    resume: bool = False,
    quiet: bool = True,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
    **option_overrides: Any,
) -> ScanResult:
    """Score every input of SOURCE with the model in MODEL_DIR into OUT_DIR (maps.zarr + scores.parquet).

    One process, shards streamed through one overlapped loop. `option_overrides` are ScanOptions
    fields (device="cpu", batch_size=32, ...). Without `progress`, a bar goes to stderr unless `quiet`.
    """
    try:
        options = dataclasses.replace(options or ScanOptions(), **option_overrides)
    except TypeError as exc:
        known = [f.name for f in dataclasses.fields(ScanOptions)]
        raise ConfigError(f"unknown scan option: {exc}; known: {known}") from exc
    say = say or (lambda _msg: None)
    t0 = time.perf_counter()
    with machine_faults(out_dir, model_dir), open_scan(model_dir, source, out_dir, options, resume=resume, say=say) as job:
        counts = job.done_counts()
        if job.done:
            say(f"resuming: {len(job.done)} of {job.shards} shards ({counts.total} images) already done")
        times = StageTimes()
        if not job.store.is_complete():
            progress = progress or Progress(job.total, quiet=quiet)
            progress.begin(job.total, counts.total)
            guard = ModelGuard(model_dir, job.store.manifest["model_fingerprint"])
            times = run_shards(
                job.model, job.pending_shards(), job.store, options, on_batch=progress.advance,
                on_shard_done=lambda _shard, _counts: guard.check(),
            )  # fmt: skip
            progress.close()
        counts = job.finish()
    decoder = make_decoder(options.decoder, job.model.device, options.batch_size).name
    return ScanResult(
        Path(out_dir), counts, job.total, job.shards, len(job.done), time.perf_counter() - t0, times, decoder,
        str(job.model.device), threshold_note(getattr(job.model, "meta", {}) or {}),
    )
