"""The worker side of a distributed scan: one Dask task scans one shard, or one piece of a split shard.

A whole shard is written exactly as the single-process scan writes it (its Zarr chunks, then its
Parquet part, then its completion marker), so a rerun after a lost worker rewrites the same bytes.
A piece (a run of a shard's records, made when the shard kept killing workers) returns its rows and
maps; the driver joins a split shard's pieces into the shard's maps (written whole: a piece covers
only part of a map shard), then its one part and marker.

The model is loaded once per worker process, on the first task that needs it, and kept in a
process-wide cache keyed by model folder, model fingerprint (SHA-256 of model.json) and device; tasks
carry only the shard's records and the scan folder, never the model.
"""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine.errors import ConfigError
from engine.faults import ModelChanged
from engine.inputs.sources import Record, Shard
from engine.scan.batches import StageTimes
from engine.scan.loop import run_shards
from engine.scan.options import ScanOptions
from engine.scan.store import ScanStore, ShardCounts

PROGRESS_EVERY_S = 0.5  # a worker reports scanned images to the driver at most this often per task

_models: dict[tuple[str, str, str], Any] = {}
_models_lock = threading.Lock()
models_loaded = 0  # loads in this process (tests check it stays at one per worker)


def drop_models() -> None:
    with _models_lock:
        _models.clear()


def cached_model(model_dir: str, fingerprint: str, device: str) -> Any:
    """This process's copy of the model (bank on its device), loaded on first use and checked against the scan."""
    from engine.artifact import model_fingerprint
    from engine.models.registry import load_model

    global models_loaded
    key = (model_dir, fingerprint, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            found = model_fingerprint(model_dir)
            if found != fingerprint:
                raise ModelChanged(
                    f"the model at {model_dir} on this worker differs from the one the scan was started with "
                    f"(model.json SHA-256 {found[:12]}... != {fingerprint[:12]}...); "
                    "give every worker the same model files"
                )
            _models.clear()  # one model per worker: a long-lived cluster moving to another scan frees the old bank
            model = _models[key] = load_model(model_dir, device=device)
            models_loaded += 1
    return model


def worker_device_type(device: str) -> str:
    """What `device` ("auto", "cpu", "cuda[:N]") means on this worker, as a device type; refuses a missing GPU."""
    import os

    import torch

    from engine.models.base import resolve_device

    kind = resolve_device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Dask worker {os.getpid()} has no usable GPU for --device {device} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, torch {torch.__version__}); "
            "start GPU workers on GPU machines, or use --workers N / --device cpu"
        )
    return kind


class RowsCollector(ScanStore):
    """A ScanStore that keeps a piece's rows and maps in memory instead of writing them: a piece covers
    part of a map shard, so the driver writes the shard's maps whole once every piece is back."""

    def __init__(self, store: ScanStore):
        super().__init__(store.out_dir, store.manifest)
        self.rows: pa.Table | None = None
        self.counts = ShardCounts()
        self.maps: list[tuple[int, np.ndarray]] = []

    def write_maps(self, start: int, block: np.ndarray) -> None:
        self.maps.append((start, block))

    def finish_shard(self, shard_id: int, start: int, rows: pa.Table, counts: ShardCounts) -> None:
        self.rows, self.counts = rows, counts


@dataclass(frozen=True)
class PackedShard:
    """A shard as it travels to a worker: its records' columns in one opaque blob.

    Shipping a Shard of 1,024 Record objects costs ~30 ms per task through Dask on this machine
    (benchmarks/dask_overhead.py), the columns as one blob well under 1 ms.
    """

    id: int
    start: int
    blob: bytes  # pickle of (positions, paths, files or None when equal to paths, extras as an Arrow table or None)

    @classmethod
    def pack(cls, shard: Shard, extra_schema: pa.Schema) -> PackedShard:
        records = shard.records
        paths = [r.path for r in records]
        files = [r.file for r in records]
        extras = pa.Table.from_pylist([r.extra for r in records], schema=extra_schema) if len(extra_schema) else None
        columns = ([r.position for r in records], paths, None if files == paths else files, extras)
        return cls(shard.id, shard.start, pickle.dumps(columns, protocol=5))

    def unpack(self) -> Shard:
        positions, paths, files, extras = pickle.loads(self.blob)
        extra_rows = extras.to_pylist() if extras is not None else [{}] * len(paths)
        files = files if files is not None else paths
        return Shard(
            self.id, self.start, [Record(*fields) for fields in zip(positions, paths, files, extra_rows, strict=True)]
        )


@dataclass
class PieceResult:
    """What a task sends back: counts and timings, and for a piece (not a whole shard) its rows."""

    images: int
    counts: ShardCounts
    times: StageTimes
    decoder: str
    rows: pa.Table | None = None
    worker: str = ""
    maps: list[tuple[int, np.ndarray]] | None = None  # a piece's maps: (first position, block)


@dataclass
class _Reporter:
    """on_batch callback: sends images scanned to the driver's progress bar, at most every PROGRESS_EVERY_S."""

    topic: str | None
    key: str
    pending: int = 0
    last: float = field(default_factory=time.monotonic)

    def __call__(self, images: int) -> None:
        self.pending += images
        now = time.monotonic()
        if self.topic and now - self.last >= PROGRESS_EVERY_S:
            from distributed import get_worker

            get_worker().log_event(self.topic, [self.key, self.pending])
            self.pending, self.last = 0, now


def scan_piece(
    out_dir: str, model_dir: str, packed: PackedShard, whole: bool, options: ScanOptions, key: str, topic: str | None
) -> PieceResult:
    """The task: scan a shard (or, when `whole` is False, a piece of one) into OUT_DIR."""
    from distributed import get_worker

    from engine.inputs.decoders import reused_decoder

    shard = packed.unpack()
    store = ScanStore.open(Path(out_dir))
    manifest = store.manifest
    model = cached_model(model_dir, manifest["model_fingerprint"], options.device)
    if model.device.type != manifest["device_type"]:
        raise ConfigError(
            f"worker {get_worker().address} runs the model on {model.device.type}, but this scan was started "
            f"for {manifest['device_type']} workers (results differ between device types); use workers of one kind"
        )
    target = store if whole else RowsCollector(store)
    counts: list[ShardCounts] = []
    # This worker thread's decoder, kept across tasks: a DALI pipeline is built once, not per task.
    decoder = reused_decoder(options.decoder, model.device, options.batch_size, options.decode_threads)
    times = run_shards(
        model, [shard], target, options, on_batch=_Reporter(topic, key), on_shard_done=lambda _s, c: counts.append(c),
        decoder=decoder,
    )
    rows, maps = (None, None) if whole else (target.rows, target.maps)
    return PieceResult(len(shard.records), counts[0], times, decoder.name, rows, get_worker().address, maps)
