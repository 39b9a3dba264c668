"""Distributed scans: the shards of a scan run as Dask tasks over processes, GPUs and machines.

    result = scan_on_cluster(model_dir, source, out_dir, cluster=ClusterRequest(workers=2))
    (ClusterRequest and connect live in engine.distributed.cluster; the worker side in engine.distributed.worker)
    vade scan MODEL_DIR SOURCE --out OUT_DIR --workers 2 | --gpus all | --scheduler tcp://HOST:8786

The driver (this process) opens the scan exactly as the single-process scan does (engine.scan.job:
same plan, same scan.json, same shards), then streams the pending shards to the cluster, keeping one
task in flight per worker thread: the shard plan is never held whole, and a worker that dies takes
only the shard it was running with it. Each task scans one shard on a worker that loaded the model
once (engine.distributed.worker); the driver consolidates scores.parquet at the end, and --resume skips
the shards that have a completion marker, whichever process wrote them.

Faults. A worker killed mid-shard: Dask reruns the shard on another worker, which rewrites all of the
shard's map shards, its part and its marker, so the half-written attempt leaves nothing behind. A shard
that kills a worker every time (a file that crashes the decoder: a segfault, an abort, an OOM kill) ends
in KilledWorker after `allowed_failures` deaths; the driver then splits it into SPLIT_WAYS pieces, and
recursively each piece that kills again, down to single inputs. A single input that still kills its
worker becomes an error row; the other pieces' rows are joined into the shard's one part, in order,
and their maps (sent back, not written: a piece covers part of a map shard) are written by the driver
as the shard's whole map shards, at most one shard's maps in memory per split shard.

Progress: one bar for the whole cluster; workers report images scanned (at most every half second per
task) through a Dask event topic, and a finished task sets its count exactly.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.distributed.poison import PoisonLedger, around
from engine.distributed.worker import PackedShard, scan_piece
from engine.errors import ConfigError
from engine.faults import machine_faults
from engine.inputs.sources import Record, Shard
from engine.scan.batches import StageTimes
from engine.scan.guard import ModelGuard
from engine.scan.job import ScanJob, ScanResult, open_scan, threshold_note
from engine.scan.lock import LOCK_NAME
from engine.scan.options import ScanOptions
from engine.scan.progress import Progress
from engine.scan.store import ShardCounts, check_new_out_dir

SPLIT_WAYS = 4  # a shard that keeps killing workers is cut into this many pieces, recursively
THREAD_REFRESH_S = 5.0  # how often the driver re-reads the cluster's size (workers may join or leave)

__all__ = ["SPLIT_WAYS", "scan_on_cluster"]


# -- the driver --------------------------------------------------------------------------------------
@dataclass
class _ModelFacts:
    """What open_scan reads from a model (the driver never runs it), with the workers' device."""

    input_size: int
    meta: dict
    threshold: float
    device: Any
    tile_spec: Any = None  # a TileSpec for tiled models


@dataclass
class _Split:
    """A shard being scanned in pieces: rows by piece start and maps, until every piece is back."""

    shard: Shard
    waiting: int = 0
    rows: dict = dataclasses.field(default_factory=dict)
    maps: list = dataclasses.field(default_factory=list)  # (first position, maps) of the pieces back
    counts: ShardCounts = dataclasses.field(default_factory=ShardCounts)


@dataclass
class _Task:
    piece: Shard  # the shard itself, or a run of its records (same id, start = first position)
    split: _Split | None  # None for a whole shard
    key: str


class _Tally:
    """Images done for the progress bar: provisional per-task reports, made exact when a task ends."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.reported: dict[str, int] = {}
        self.closed: set[str] = set()
        self.lock = threading.Lock()

    def on_event(self, event: tuple[float, Any]) -> None:  # runs in the client's event-loop thread
        key, images = event[1]
        with self.lock:
            if key not in self.closed:
                self.reported[key] = self.reported.get(key, 0) + images
                self.progress.advance(images)

    def finish(self, key: str, images: int) -> None:
        with self.lock:
            self.progress.advance(images - self.reported.pop(key, 0))
            self.closed.add(key)

    def forget(self, key: str) -> None:
        with self.lock:
            self.progress.advance(-self.reported.pop(key, 0))
            self.closed.add(key)


def _absolute(shard: Shard) -> Shard:
    """The shard with files the workers can open from any working directory (`path` kept as given)."""
    if all(os.path.isabs(r.file) or not r.file for r in shard.records):
        return shard
    records = [
        Record(r.position, r.path, os.path.abspath(r.file) if r.file else r.file, r.extra) for r in shard.records
    ]
    return Shard(shard.id, shard.start, records)


def _pieces(piece: Shard) -> list[Shard]:
    n = len(piece.records)
    cuts = [n * i // SPLIT_WAYS for i in range(SPLIT_WAYS + 1)]
    return [
        Shard(piece.id, piece.records[a].position, piece.records[a:b])
        for a, b in zip(cuts, cuts[1:], strict=False)
        if b > a
    ]


class _Runner:
    """Streams a job's pending shards through a Dask client, one task per worker thread in flight."""

    def __init__(self, client: Any, job: ScanJob, options: ScanOptions, model_dir: str, tally: _Tally, say: Callable):
        self.client, self.job, self.options, self.model_dir = client, job, options, model_dir
        self.tally, self.say = tally, say
        self.token = uuid.uuid4().hex[:12]
        self.topic = f"vade-progress-{self.token}"
        self.out_dir = str(job.store.out_dir.absolute())
        self.shards: Iterator[Shard] = job.pending_shards()
        self.backlog: deque[_Task] = deque()  # pieces of split shards go before new shards
        self.inflight: dict[Any, _Task] = {}
        self.times = StageTimes()
        self.decoder = ""
        self._threads, self._threads_at = 1, 0.0
        self.ledger = PoisonLedger(job.store)  # poison inputs found, kept across driver restarts
        self.guard = ModelGuard(model_dir, job.store.manifest["model_fingerprint"])

    def _window(self) -> int:
        now = time.monotonic()
        if now - self._threads_at > THREAD_REFRESH_S:
            self._threads = max(1, sum(self.client.nthreads().values()))
            self._threads_at = now
        return self._threads

    def _submit(self, task: _Task, done: Any) -> None:
        packed = PackedShard.pack(task.piece, self.job.source.extra_schema)
        future = self.client.submit(
            scan_piece, self.out_dir, self.model_dir, packed, task.split is None, self.options, task.key,
            self.topic, key=task.key, pure=False,
        )  # fmt: skip
        self.inflight[future] = task
        done.add(future)

    def _refill(self, done: Any) -> None:
        while len(self.inflight) < self._window():
            if self.backlog:
                task = self.backlog.popleft()
            else:
                shard = next(self.shards, None)
                if shard is None:
                    return
                known = self.ledger.known(shard.id)
                if known:  # an earlier driver found poison inputs here: scan around them
                    self._around_known(_absolute(shard), known)
                    continue
                task = _Task(_absolute(shard), None, f"vade-shard-{self.token}-{shard.id}")
            self._submit(task, done)

    def _around_known(self, shard: Shard, known: dict[int, str]) -> None:
        runs, poison = around(shard, known)
        split = _Split(shard, waiting=len(runs) + len(poison))
        self.say(f"shard {shard.id}: {len(poison)} input(s) known to kill workers (recorded by an earlier run); "
                 "scanning around them")  # fmt: skip
        for piece in poison:
            rows, counts = _crash_row(self.job, piece, known[piece.start])
            self.tally.finish(f"known-{self.token}-{piece.start}", 1)
            self._piece_done(split, piece, rows, counts, [])
        for sub in reversed(runs):
            self.backlog.appendleft(_Task(sub, split, f"vade-piece-{self.token}-{sub.id}-{sub.start}-{sub.stop}"))

    def run(self) -> StageTimes:
        from distributed import as_completed

        started = time.perf_counter()
        self.client.subscribe_topic(self.topic, self.tally.on_event)
        done = as_completed()
        try:
            self._refill(done)
            for future in done:
                task = self.inflight.pop(future)
                if future.status == "finished":
                    self._finished(task, future.result())
                else:
                    self._failed(task, future.exception())
                future.release()
                self._refill(done)
        finally:
            self.client.unsubscribe_topic(self.topic)
            if self.inflight:
                self.client.cancel(list(self.inflight))
        self.times.loop = time.perf_counter() - started
        return self.times

    def _finished(self, task: _Task, result: Any) -> None:
        self.guard.check()  # the model directory must not change under the scan
        for name in ("decode", "features", "scoring", "write", "images"):
            setattr(self.times, name, getattr(self.times, name) + getattr(result.times, name))
        self.times.add_stages(result.times)
        mine = self.times.workers.setdefault(result.worker, {"images": 0, "tasks": 0, "seconds": 0.0, "stages": {},
                                                             "stage_cpu": {}})  # fmt: skip
        mine["images"] += result.times.images
        mine["tasks"] += 1
        mine["seconds"] += result.times.loop
        for key in ("stages", "stage_cpu"):
            for name, seconds in getattr(result.times, key).items():
                mine[key][name] = mine[key].get(name, 0.0) + seconds
        self.decoder = self.decoder or result.decoder
        self.tally.finish(task.key, result.images)
        if task.split is not None:
            self._piece_done(task.split, task.piece, result.rows, result.counts, result.maps)

    def _piece_done(self, split: _Split, piece: Shard, rows: Any, counts: ShardCounts, maps: list) -> None:
        import numpy as np
        import pyarrow as pa

        split.rows[piece.start] = rows
        split.maps.extend(maps)
        split.counts += counts
        split.waiting -= 1
        if split.waiting == 0:  # every piece is back: the shard's maps (whole map shards), its part, its marker
            shard, size = split.shard, int(self.job.store.manifest["map_size"])
            block = np.full((len(shard.records), size, size), np.nan, dtype=np.float16)
            for first, piece_maps in split.maps:
                block[first - shard.start : first - shard.start + len(piece_maps)] = piece_maps
            self.job.store.write_maps(shard.start, block)
            table = pa.concat_tables([split.rows[start] for start in sorted(split.rows)])
            self.job.store.finish_shard(shard.id, shard.start, table, split.counts)

    def _failed(self, task: _Task, error: BaseException) -> None:
        from distributed import KilledWorker

        self.tally.forget(task.key)
        self._threads_at = 0.0  # a worker died or failed: re-read the cluster's size before submitting again
        if not isinstance(error, KilledWorker):
            if isinstance(error, (ImportError, AttributeError)):
                raise ConfigError(
                    f"a Dask worker cannot run vade's scan task ({type(error).__name__}: {error}); install the same "
                    "vade on every worker machine"
                ) from error
            raise error
        piece = task.piece
        split = task.split or _Split(piece)
        if len(piece.records) == 1:
            record = piece.records[0]
            message = _crash_message(error)
            self.ledger.add(piece.id, record.position, message)  # first: a driver that dies now keeps the finding
            self.say(f"input {record.path} killed the worker each time it was scanned; recorded as an error row")
            rows, counts = _crash_row(self.job, piece, message)
            self.tally.finish(task.key, 1)
            self._piece_done(split, piece, rows, counts, [])
            return
        pieces = _pieces(piece)
        split.waiting += len(pieces) - (0 if task.split is None else 1)
        self.say(
            f"shard {piece.id}: workers died {error.allowed_failures + 1} times running positions "
            f"{piece.start}..{piece.stop - 1}; scanning them in {len(pieces)} pieces to isolate the cause"
        )
        for sub in reversed(pieces):
            self.backlog.appendleft(_Task(sub, split, f"vade-piece-{self.token}-{sub.id}-{sub.start}-{sub.stop}"))


def _crash_message(error: Any) -> str:
    return (
        f"the worker process died each of the {error.allowed_failures + 1} times it scanned this file (the decoder "
        "crashes on it, or it exhausts memory); the file was isolated by splitting its shard"
    )


def _crash_row(job: ScanJob, piece: Shard, message: str) -> tuple[Any, ShardCounts]:
    """The error row for a single input that killed its worker every time; its map slot is set to empty."""
    import numpy as np
    import torch

    from engine.distributed.worker import RowsCollector
    from engine.scan.batches import LoadedBatch, ScoredBatch
    from engine.scan.writer import ShardWriter

    size = int(job.store.manifest["map_size"])
    collector = RowsCollector(job.store)
    loaded = LoadedBatch(piece, piece.records, torch.empty((0, 3, size, size)), [], {}, {0: message}, True, 0.0)
    empty = np.zeros(0, np.float32)
    ShardWriter(collector).write(
        ScoredBatch(loaded, empty, empty, np.zeros((0, size, size), np.float16), empty.astype(bool))
    )
    return collector.rows, collector.counts


def _check_forced_device(options: ScanOptions, forced: str | None) -> None:
    if forced is not None and options.device not in ("auto", forced):
        raise ConfigError(
            f"--gpus runs each worker on its own GPU (which it sees as cuda:0); --device {options.device} "
            "contradicts it: leave --device out"
        )


def _workers_device(client: Any, options: ScanOptions, forced: str | None) -> str:
    """The device type the workers will use (asked of a worker: the driver may have no GPU)."""
    from engine.distributed.worker import worker_device_type

    try:
        return client.submit(worker_device_type, forced or options.device, pure=False).result()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"a Dask worker cannot import vade ({exc}); install the same vade on every worker") from exc


def scan_on_cluster(
    model_dir: str | Path,
    source: str | Path,
    out_dir: str | Path,
    options: ScanOptions | None = None,
    *,
    cluster: Any = None,
    client: Any = None,
    resume: bool = False,
    quiet: bool = True,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
    **option_overrides: Any,
) -> ScanResult:
    """engine.scan.job.scan with the shards run as Dask tasks: on `client`, or on a cluster made from `cluster`.

    Same outputs as the one-process scan; a scan started either way can be resumed either way (with
    the same device type). `cluster` is a ClusterRequest (workers / gpus / scheduler).
    """
    import torch

    from engine.distributed.cluster import connect
    from engine.models.registry import load_model

    try:
        options = dataclasses.replace(options or ScanOptions(), **option_overrides)
    except TypeError as exc:
        raise ConfigError(
            f"unknown scan option: {exc}; known: {[f.name for f in dataclasses.fields(ScanOptions)]}"
        ) from exc
    if (client is None) == (cluster is None):
        raise ConfigError("scan_on_cluster needs exactly one of client= or cluster=")
    options.validate()
    say = say or (lambda _msg: None)
    forced = getattr(cluster, "worker_device", None)
    _check_forced_device(options, forced)
    if not resume and not (Path(out_dir) / LOCK_NAME).exists():  # a locked folder: open_scan names the holder
        check_new_out_dir(Path(out_dir))  # before starting a cluster
    t0 = time.perf_counter()
    with machine_faults(out_dir, model_dir), nullcontext(client) if client is not None else connect(cluster) as live:
        device = _workers_device(live, options, forced)
        if options.device == "auto":  # each worker then uses the device type found on one of them
            options = dataclasses.replace(options, device=device)
        local = load_model(model_dir, device="cpu")
        facts = _ModelFacts(local.input_size, local.meta, float(local.threshold), torch.device(device), local.tile_spec)
        del local
        threads = max(1, sum(live.nthreads().values()))
        job = open_scan(model_dir, source, out_dir, options, resume=resume, model=facts, say=say, workers=threads)
        with job:  # holds OUT_DIR's lock; the workers write its shards under it
            counts, times, decoder = _run_job(job, live, job.options, str(Path(model_dir).absolute()), progress, quiet, say)
    return ScanResult(
        Path(out_dir), counts, job.total, job.shards, len(job.done), time.perf_counter() - t0, times, decoder, device,
        threshold_note(facts.meta),
    )


def _run_job(
    job: ScanJob, live: Any, options: ScanOptions, model_dir: str, progress: Progress | None, quiet: bool, say: Callable
) -> tuple[ShardCounts, StageTimes, str]:
    """Run an opened job's pending shards on the cluster and consolidate: (counts, times, decoder)."""
    counts = job.done_counts()
    if job.done:
        say(f"resuming: {len(job.done)} of {job.shards} shards ({counts.total} images) already done")
    times, decoder = StageTimes(), options.decoder
    if not job.store.is_complete():
        progress = progress or Progress(job.total, quiet=quiet)
        progress.begin(job.total, counts.total)
        workers = len(live.nthreads())
        pending = job.shards - len(job.done)
        say(f"scanning {job.total} images in {pending} shards on {workers} Dask workers ({live.scheduler.address})")
        runner = _Runner(live, job, options, model_dir, _Tally(progress), say)
        times = runner.run()
        decoder = runner.decoder or decoder
        progress.close()
    return job.finish(), times, decoder
