"""The scan loop: shards -> batches decoded in a background thread -> model -> writer thread.

engine.pipeline is the public face (scan, open_scan, run_shard); this module is the machinery.

Stages run at once: a loader thread reads, inspects, decodes and resizes batch n+1 while the main
thread runs the model on batch n (on CPUs in worker threads of its own, engine/model_stage.py)
and a writer thread stores batch n-1 (Zarr chunks, then the shard's Parquet part and completion
marker). Queues between them are bounded, so memory is too.

Determinism: the model always sees micro-batches of one fixed size per device (MODEL_BATCH, the last
one padded with zeros), so an image's score and map depend neither on --batch-size nor on which images
share its batch: kernels may pick a different reduction order for a different batch shape, but with a
fixed shape every row is computed the same way wherever it sits (scoring per image instead costs 1.6x).
tests/test_scan.py checks scans with batch sizes 1, 5 and 12 for bitwise-equal scores and maps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.decode import DEFAULT_MAX_PIXELS, ImageInfo, inspect_bytes, read_bytes, resize_batch
from engine.decoders import Decoder, check_decoder, make_decoder
from engine.errors import ConfigError, DecodeError
from engine.model_stage import MicroResult, ModelStage
from engine.sources import Record, Shard
from engine.writers import ScanStore, ShardCounts, ShardWriter  # noqa: F401 - ShardWriter re-exported

_DONE = object()
MODEL_BATCH = {"cpu": 8, "cuda": 64}  # images per backbone call, fixed per device type (determinism)
DECODE_PIXEL_BUDGET = 64_000_000  # decoded full-size pixels held at once by the loader (~200 MB as RGB)


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
        check_decoder(self.decoder, self.device)  # before any output is written


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
    loop: float = 0.0  # wall time of the whole loop (stages overlap, so this is less than their sum)
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
        except Exception as exc:  # noqa: BLE001 - one file never stops a scan
            errors[offset] = _unexpected(exc)
    resized: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    for group in _pixel_groups(items):  # bounded: full-size pixels of one group at a time
        try:
            done = _decode_group(decoder, [items[k] for k in group], size)
        except Exception:  # noqa: BLE001 - retry the files one by one to find the one that fails
            done = [r for k in group for r in _decode_group_safely(decoder, [items[k]], size)]
        for k, result in zip(group, done, strict=True):
            if isinstance(result, str):
                errors[offsets[k]] = result
            else:
                tensor, width, height = result
                resized.append(tensor)
                ok.append(offsets[k])
                sizes[offsets[k]] = (width, height)
    images = torch.stack(resized) if resized else torch.empty((0, 3, size, size))
    return LoadedBatch(shard, records, images, ok, sizes, errors, last, time.perf_counter() - t0)


def _unexpected(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory while decoding this image; lower --max-pixels or add memory"
    return f"unexpected error while decoding: {type(exc).__name__}: {exc}"


def _decode_group(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int
) -> list[str | tuple[torch.Tensor, int, int]]:
    """Per item: an error message, or (resized image, width, height)."""
    out: list[str | tuple[torch.Tensor, int, int]] = []
    pixels: list[torch.Tensor] = []
    for result in decoder.decode(items):
        if isinstance(result, DecodeError):
            out.append(str(result))
        else:
            pixels.append(result)
            out.append((result, int(result.shape[1]), int(result.shape[0])))
    images = iter(resize_batch(pixels, size) if pixels else [])
    return [r if isinstance(r, str) else (next(images), r[1], r[2]) for r in out]


def _decode_group_safely(
    decoder: Decoder, items: list[tuple[bytes, ImageInfo]], size: int
) -> list[str | tuple[torch.Tensor, int, int]]:
    try:
        return _decode_group(decoder, items, size)
    except Exception as exc:  # noqa: BLE001 - one file never stops a scan
        return [_unexpected(exc)]


def _pixel_groups(items: list[tuple[bytes, ImageInfo]]) -> Iterator[list[int]]:
    """Consecutive item indices in groups of at most DECODE_PIXEL_BUDGET pixels (a big image alone)."""
    group: list[int] = []
    pixels = 0
    for k, (_, info) in enumerate(items):
        if group and pixels + info.width * info.height > DECODE_PIXEL_BUDGET:
            yield group
            group, pixels = [], 0
        group.append(k)
        pixels += info.width * info.height
    if group:
        yield group


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


def _put_while_alive(q: queue.Queue, item: Any, consumer: _Worker) -> None:
    """Put into a bounded queue, re-raising the consumer's error instead of waiting on a dead thread."""
    while True:
        consumer.check()
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


class _MicroBatcher:
    """Gathers decoded images across batches into full model micro-batches; hands back whole batches.

    Only the very last micro-batch of a run is padded, whatever --batch-size is, and batches leave in
    the order they came. The model stage's workers keep their micro-batches across batch boundaries.
    """

    def __init__(self, stage: ModelStage, times: StageTimes, emit: Callable[[ScoredBatch], None]):
        self.stage, self.model_batch, self.times, self.emit = stage, stage.model_batch, times, emit
        self.waiting: deque[LoadedBatch] = deque()  # batches whose results are not all in yet
        self.unscored: list[torch.Tensor] = []
        self.n_unscored = 0
        self.results: deque[MicroResult] = deque()  # scored, not yet handed back
        self.n_results = 0

    def add(self, batch: LoadedBatch) -> None:
        self.waiting.append(batch)
        if batch.ok:
            self.unscored.append(batch.images)
            self.n_unscored += len(batch.ok)
        self._submit(self.n_unscored // self.model_batch * self.model_batch)
        self._score(keep_in_flight=self.stage.depth)

    def flush(self) -> None:
        """Score everything left (the last micro-batch padded) and hand back every batch."""
        self._submit(self.n_unscored)
        self._score(keep_in_flight=0)

    def _submit(self, take: int) -> None:
        if not take:
            return
        images = self.unscored[0] if len(self.unscored) == 1 else torch.cat(self.unscored)
        for start in range(0, take, self.model_batch):
            self.stage.submit(images[start : min(take, start + self.model_batch)])
        self.unscored = [images[take:]] if take < len(images) else []
        self.n_unscored -= take

    def _score(self, keep_in_flight: int) -> None:
        while len(self.stage.pending) > keep_in_flight:
            result = self.stage.next_result()
            self.results.append(result)
            self.n_results += len(result.raw_scores)
            self._hand_back()
        self._hand_back()

    def _hand_back(self) -> None:
        while self.waiting and len(self.waiting[0].ok) <= self.n_results:
            batch = self.waiting.popleft()
            self.emit(ScoredBatch(batch, *self._take(len(batch.ok))))

    def _take(self, count: int) -> tuple[np.ndarray, ...]:
        """The next `count` results (raw, scores, maps, anomalous), in order."""
        parts: list[tuple[np.ndarray, ...]] = []
        need = count
        while need:
            head = self.results[0]
            n = len(head.raw_scores)
            cols = (head.raw_scores, head.scores, head.maps, head.anomalous)
            if n <= need:
                parts.append(cols)
                self.results.popleft()
                need -= n
            else:
                parts.append(tuple(c[:need] for c in cols))
                self.results[0] = MicroResult(*(c[need:] for c in cols))
                need = 0
        self.n_results -= count
        if not parts:
            size = self.stage.model.input_size
            return (np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, size, size), np.float16),
                    np.zeros(0, bool))
        return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


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
    started = time.perf_counter()
    decoder = make_decoder(options.decoder, model.device, options.batch_size, options.decode_threads)
    size = model.input_size
    model_batch = resolve_model_batch(options, model.device)
    stop = threading.Event()
    loaded_q: queue.Queue = queue.Queue(maxsize=max(1, options.prefetch_batches))
    scored_q: queue.Queue = queue.Queue(maxsize=max(1, options.write_queue))
    writer = ShardWriter(store, on_shard_done)

    def load_all() -> None:
        torch.set_num_threads(1)  # this thread's resizes only: the model owns the cores
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
    def emit(scored: ScoredBatch) -> None:
        _put_while_alive(scored_q, scored, writer_thread)
        times.images += len(scored.loaded.records)
        if on_batch:
            on_batch(len(scored.loaded.records))

    stage = ModelStage(model, model_batch, times)
    gather = _MicroBatcher(stage, times, emit)
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
            gather.add(item)
        gather.flush()
        _put_while_alive(scored_q, _DONE, writer_thread)
        writer_thread.join()
        writer_thread.check()
        loader.check()
    finally:
        stop.set()
        stage.close()
    times.write = writer.seconds
    times.loop = time.perf_counter() - started
    return times
