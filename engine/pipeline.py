"""The scan loop: shards -> batches decoded in a background thread -> model -> writer thread.

Three stages run at once: a loader thread reads, inspects, decodes and resizes batch n+1 while the main
thread runs the model on batch n and a writer thread stores batch n-1 (Zarr chunks, then the shard's
Parquet part and completion marker). Queues between them are bounded, so memory is too.

Determinism: the backbone always sees micro-batches of one fixed size per device (MODEL_BATCH, the
last one padded with zeros), and the scoring step runs one image at a time, so an image's score and map
depend neither on --batch-size nor on which images share its batch (kernels may pick a different
reduction order for a different batch shape; a fixed shape keeps every run bitwise identical).
tests/test_scan.py checks scans with batch sizes 1, 5 and 12 for bitwise-equal scores and maps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import __version__
from engine.decode import DEFAULT_MAX_PIXELS, inspect_bytes, read_bytes, resize_batch
from engine.decoders import Decoder, make_decoder
from engine.errors import ConfigError, DecodeError
from engine.progress import Progress
from engine.sources import Record, Shard, iter_shards, open_source, plan, shard_count
from engine.writers import ScanStore, ShardCounts, encode_schema, output_name, rows_schema, shard_rows

_DONE = object()
MODEL_BATCH = {"cpu": 8, "cuda": 64}  # images per backbone call, fixed per device type (determinism)
F16_MAX = 65504.0  # maps are stored as float16: larger values are clipped, not turned into inf


@dataclass
class ScanOptions:
    """How to run a scan (what it computes is fixed by the model and the source)."""

    device: str = "auto"
    decoder: str = "auto"
    batch_size: int = 32  # images decoded and written together; best a multiple of the model batch
    model_batch: int = 0  # images per backbone call; 0 = MODEL_BATCH for the device. Part of the result.
    shard_size: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = 2  # decoded batches waiting for the model
    write_queue: int = 4  # scored batches waiting for the writer
    decode_threads: int = 1  # DALI worker threads; keep light on small CPUs (torch uses the cores)

    def validate(self) -> None:
        checks = (("batch_size", 1), ("shard_size", 1), ("max_pixels", 1), ("decode_threads", 1), ("model_batch", 0))
        for name, low in checks:
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class LoadedBatch:
    """Decoded, resized images of consecutive records of one shard; failures as messages."""

    shard: Shard
    records: list[Record]
    images: torch.Tensor  # (n_ok, 3, S, S) float32 in [0, 1]
    ok: list[int]  # offsets into records of the decoded images, in order
    sizes: dict[int, tuple[int, int]]  # offset -> (width, height) after EXIF orientation
    errors: dict[int, str]  # offset -> what is wrong with the file
    last_in_shard: bool
    seconds: float


@dataclass
class ScoredBatch:
    loaded: LoadedBatch
    raw_scores: np.ndarray  # (n_ok,) float32
    scores: np.ndarray  # (n_ok,) float32, normalised
    maps: np.ndarray  # (n_ok, S, S) float16, normalised
    anomalous: np.ndarray  # (n_ok,) bool


@dataclass
class StageTimes:
    """Seconds spent per stage (loader and writer run in their own threads, overlapped)."""

    decode: float = 0.0
    features: float = 0.0
    scoring: float = 0.0
    write: float = 0.0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def load_batch(
    shard: Shard, records: list[Record], decoder: Decoder, size: int, max_pixels: int, last: bool
) -> LoadedBatch:
    """Read, inspect, decode and resize one batch; each unreadable file becomes an error message."""
    t0 = time.perf_counter()
    errors: dict[int, str] = {}
    items, offsets = [], []
    for offset, record in enumerate(records):
        try:
            if not record.path:
                raise DecodeError("no path given for this input")
            data = read_bytes(record.file)
            items.append((data, inspect_bytes(data, Path(record.file).suffix, max_pixels)))
            offsets.append(offset)
        except DecodeError as exc:
            errors[offset] = str(exc)
    pixels: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    for offset, result in zip(offsets, decoder.decode(items), strict=True):
        if isinstance(result, DecodeError):
            errors[offset] = str(result)
        else:
            pixels.append(result)
            ok.append(offset)
            sizes[offset] = (int(result.shape[1]), int(result.shape[0]))
    images = resize_batch(pixels, size) if pixels else torch.empty((0, 3, size, size))
    return LoadedBatch(shard, records, images, ok, sizes, errors, last, time.perf_counter() - t0)


def _batches(shards: Iterable[Shard], batch_size: int) -> Iterator[tuple[Shard, list[Record], bool]]:
    for shard in shards:
        for start in range(0, len(shard.records), batch_size):
            stop = start + batch_size
            yield shard, shard.records[start:stop], stop >= len(shard.records)


class _Worker(threading.Thread):
    """A daemon thread whose exception is re-raised in the caller by `check()`."""

    def __init__(self, name: str, target: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class ShardWriter:
    """Writes scored batches: maps into Zarr at once, rows collected and written when a shard ends."""

    def __init__(self, store: ScanStore, on_shard_done: Callable[[Shard, ShardCounts], None] | None = None):
        self.store = store
        self.maps = store.maps_array()
        self.extra_names = {name: output_name(name) for name in store.manifest.get("source_columns", [])}
        self.on_shard_done = on_shard_done
        self.seconds = 0.0
        self._columns: dict[str, list[Any]] = {}
        self._counts = ShardCounts()

    def write(self, scored: ScoredBatch) -> None:
        t0 = time.perf_counter()
        loaded = scored.loaded
        first = loaded.records[0].position
        block = np.full((len(loaded.records), *self.maps.shape[1:]), np.nan, dtype=np.float16)
        if loaded.ok:
            block[loaded.ok] = scored.maps
        self.maps[first : first + len(loaded.records)] = block  # error slots stay empty (NaN fill)
        result_of = {offset: i for i, offset in enumerate(loaded.ok)}
        cols = self._columns or {name: [] for name in self.store.schema.names}
        self._columns = cols
        for offset, record in enumerate(loaded.records):
            i = result_of.get(offset)
            width, height = loaded.sizes.get(offset, (None, None))
            cols["path"].append(record.path)
            cols["index"].append(record.position if i is not None else -1)
            cols["score"].append(float(scored.scores[i]) if i is not None else None)
            cols["is_anomalous"].append(bool(scored.anomalous[i]) if i is not None else False)
            cols["status"].append("ok" if i is not None else "error")
            cols["error"].append(None if i is not None else loaded.errors[offset])
            cols["raw_score"].append(float(scored.raw_scores[i]) if i is not None else None)
            cols["width"].append(width)
            cols["height"].append(height)
            cols["position"].append(record.position)
            cols["shard"].append(loaded.shard.id)
            for name, out_name in self.extra_names.items():
                cols[out_name].append(record.extra.get(name))
        self._counts += ShardCounts(len(loaded.ok), len(loaded.errors), int(scored.anomalous.sum()))
        if loaded.last_in_shard:
            table = shard_rows(self.store.schema, cols)
            self.store.finish_shard(loaded.shard.id, loaded.shard.start, table, self._counts)
            if self.on_shard_done:
                self.on_shard_done(loaded.shard, self._counts)
            self._columns, self._counts = {}, ShardCounts()
        self.seconds += time.perf_counter() - t0


def score_batch(model: Any, images: torch.Tensor, model_batch: int, times: StageTimes) -> tuple[np.ndarray, ...]:
    """Raw scores, normalised scores, float16 normalised maps and anomaly flags for a batch.

    Features come from fixed-size micro-batches (zero-padded) and scores from one image at a time, so
    the result for an image does not depend on the batch it came in.
    """
    raw, maps = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], model_batch):
            t0 = time.perf_counter()
            chunk = images[start : start + model_batch]
            real = chunk.shape[0]
            if real < model_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((model_batch - real, *chunk.shape[1:]))])
            feature_maps = model.features(chunk)
            t1 = time.perf_counter()
            for i in range(real):
                out = model.score_features([f[i : i + 1] for f in feature_maps])
                raw.append(out.scores)
                maps.append(out.maps)
            times.features += t1 - t0
            times.scoring += time.perf_counter() - t1
        t1 = time.perf_counter()
        raw_scores = torch.cat(raw)
        norm_maps = model.normalize(torch.cat(maps)).clamp_(-F16_MAX, F16_MAX).to(torch.float16).cpu().numpy()
        norm_scores = model.normalize(raw_scores).float().cpu().numpy()
        raw_np = raw_scores.float().cpu().numpy()
        times.scoring += time.perf_counter() - t1
    return raw_np, norm_scores, norm_maps, raw_np.astype(np.float64) >= float(model.threshold)


def resolve_model_batch(options: ScanOptions, device: torch.device) -> int:
    return options.model_batch or MODEL_BATCH.get(device.type, 8)


def run_shards(
    model: Any,
    shards: Iterable[Shard],
    store: ScanStore,
    options: ScanOptions,
    on_batch: Callable[[int], None] | None = None,
    on_shard_done: Callable[[Shard, ShardCounts], None] | None = None,
) -> StageTimes:
    """Scan `shards` into `store` with decode, model and writes overlapped; returns time per stage."""
    times = StageTimes()
    decoder = make_decoder(options.decoder, model.device, options.batch_size, options.decode_threads)
    size = model.input_size
    model_batch = resolve_model_batch(options, model.device)
    stop = threading.Event()
    loaded_q: queue.Queue = queue.Queue(maxsize=max(1, options.prefetch_batches))
    scored_q: queue.Queue = queue.Queue(maxsize=max(1, options.write_queue))
    writer = ShardWriter(store, on_shard_done)

    def load_all() -> None:
        for shard, records, last in _batches(shards, options.batch_size):
            if not _put(loaded_q, load_batch(shard, records, decoder, size, options.max_pixels, last), stop):
                return
        _put(loaded_q, _DONE, stop)

    def write_all() -> None:
        while (item := scored_q.get()) is not _DONE:
            writer.write(item)

    loader, writer_thread = _Worker("vade-loader", load_all), _Worker("vade-writer", write_all)
    loader.start()
    writer_thread.start()
    try:
        while True:
            try:
                item = loaded_q.get(timeout=0.5)
            except queue.Empty:
                loader.check()
                writer_thread.check()
                continue
            if item is _DONE:
                break
            times.decode += item.seconds
            if item.ok:
                raw, scores, maps, anomalous = score_batch(model, item.images, model_batch, times)
            else:
                raw = scores = np.zeros(0, np.float32)
                maps, anomalous = np.zeros((0, size, size), np.float16), np.zeros(0, bool)
            writer_thread.check()
            if not _put(scored_q, ScoredBatch(item, raw, scores, maps, anomalous), stop):
                break
            times.images += len(item.records)
            if on_batch:
                on_batch(len(item.records))
        scored_q.put(_DONE)
        writer_thread.join()
        writer_thread.check()
        loader.check()
    finally:
        stop.set()
    times.write = writer.seconds
    return times


def run_shard(model: Any, shard: Shard, out_dir: str | Path, options: ScanOptions) -> ShardCounts:
    """Scan one shard into an existing scan folder: the idempotent unit of work (and of retry).

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

    def summary(self) -> str:
        return (
            f"scanned {self.total} images: {self.counts.ok} ok, {self.counts.error} error, "
            f"{self.counts.anomalous} anomalous -> {self.out_dir}"
        )


def _model_fingerprint(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "model.json").read_bytes()).hexdigest()


def _maps_attrs(model: Any, size: int) -> dict[str, Any]:
    meta = model.meta
    return {
        "description": "per-pixel anomaly maps, normalised so that 0.5 is the model's calibrated threshold",
        "rows": "maps[i] belongs to the scores.parquet row whose `index` is i; error rows have index -1 "
        "and no map (their slot reads as NaN)",
        "map_size": [size, size],
        "resize": {
            "policy": "stretch: each image (EXIF orientation applied) was resized to map_size, aspect ratio not kept",
            "method": "bilinear with antialias (images over 16 MP first box-averaged by an integer factor)",
            "to_image": "resize maps[i] to (height, width) from its row: map pixel (y, x) covers image rows "
            "[y*height/H, (y+1)*height/H) and columns [x*width/W, (x+1)*width/W)",
        },
        "threshold_normalised": 0.5,
        "threshold_raw": float(model.threshold),
        "model": {k: meta.get(k) for k in ("method", "backbone", "layers", "input_size", "bank_size")},
        "vade_version": __version__,
    }


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

    `option_overrides` are ScanOptions fields (device="cpu", batch_size=32, ...). Without `progress`,
    a bar goes to stderr unless `quiet`.
    """
    from engine.artifact import load_model

    try:
        options = dataclasses.replace(options or ScanOptions(), **option_overrides)
    except TypeError as exc:
        raise ConfigError(f"unknown scan option: {exc}; known: {[f.name for f in dataclasses.fields(ScanOptions)]}") from exc
    options.validate()
    say = say or (lambda _msg: None)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    src = open_source(source)
    model = load_model(model_dir, device=options.device)
    planned = plan(src)
    size = model.input_size
    schema = rows_schema(src.extra_schema)
    manifest = {
        "vade_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_dir": str(model_dir),
        "model_fingerprint": _model_fingerprint(Path(model_dir)),
        "source": str(source),
        "source_kind": src.kind,
        "source_columns": src.extra_schema.names,
        "count": planned.count,
        "source_fingerprint": planned.fingerprint,
        "shard_size": options.shard_size,
        "shards": shard_count(planned.count, options.shard_size),
        "map_size": size,
        "max_pixels": options.max_pixels,
        "model_batch": resolve_model_batch(options, model.device),
        "device_type": model.device.type,
        "rows_schema": encode_schema(schema),
        "model_meta": model.meta,
    }
    fresh = not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if resume and not fresh:
        store = ScanStore.reopen(out_dir, manifest)
    else:
        store = ScanStore.create(out_dir, manifest, _maps_attrs(model, size))
    n_shards = store.manifest["shards"]
    done = set(store.done_shards())
    counts = ShardCounts()
    for shard_id in done:
        counts += store.done_counts(shard_id)
    times = StageTimes()
    decoder_name = make_decoder(options.decoder, model.device, options.batch_size).name
    if done:
        say(f"resuming: {len(done)} of {n_shards} shards ({counts.total} images) already done")
    if not store.is_complete():
        progress = progress or Progress(planned.count, quiet=quiet)
        progress.begin(planned.count, counts.total)
        pending = (s for s in iter_shards(src, options.shard_size) if s.id not in done)

        def shard_done(_shard: Shard, shard_counts: ShardCounts) -> None:
            nonlocal counts
            counts += shard_counts

        times = run_shards(model, pending, store, options, on_batch=progress.advance, on_shard_done=shard_done)
        progress.close()
        store.consolidate(range(n_shards))
    return ScanResult(
        out_dir, counts, planned.count, n_shards, len(done), time.perf_counter() - t0, times, decoder_name,
        str(model.device),
    )
