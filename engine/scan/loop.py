"""The scan loop: shards -> batches decoded in a background thread -> model -> writer thread.

engine.scan.job is the public face (scan, open_scan, run_shard); this module is the machinery.

Stages run at once: a loader thread reads, inspects, decodes and resizes batch n+1 while the main
thread runs the model on batch n (on CPUs in worker threads of its own, engine/scan/model_stage.py)
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
from typing import Any

import numpy as np
import torch

from engine import timing
from engine.inputs.decoders import Decoder, make_decoder
from engine.inputs.sources import Record, Shard
from engine.scan.batches import LoadedBatch, ScoredBatch, StageTimes, TileChunk
from engine.scan.loader import load_batch, load_tiled_batches, tile_chunks_of
from engine.scan.model_stage import MicroResult, ModelStage
from engine.scan.options import ScanOptions, resolve_model_batch
from engine.scan.store import ScanStore, ShardCounts
from engine.scan.tiles import TileBatcher
from engine.scan.writer import ShardWriter

_DONE = object()
WRITER_GRACE_S = 60.0  # on an early stop, how long the writer may take to finish the batch it is writing


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


def run_shards(
    model: Any,
    shards: Iterable[Shard],
    store: ScanStore,
    options: ScanOptions,
    on_batch: Callable[[int], None] | None = None,
    on_shard_done: Callable[[Shard, ShardCounts], None] | None = None,
    decoder: Decoder | None = None,
) -> StageTimes:
    """Scan `shards` into `store` with decode, model and writes overlapped; returns time per stage.

    decoder: one to reuse (a Dask worker keeps its DALI pipeline across tasks); default: a new one."""
    times = StageTimes()
    started = time.perf_counter()
    clock = _stage_clock(options, model.device)
    decoder = decoder or make_decoder(options.decoder, model.device, options.batch_size, options.decode_threads)
    size = model.input_size
    model_batch = resolve_model_batch(options, model.device.type)
    stop = threading.Event()
    loaded_q: queue.Queue = queue.Queue(maxsize=max(1, options.prefetch_batches))
    scored_q: queue.Queue = queue.Queue(maxsize=max(1, options.write_queue))
    writer = ShardWriter(store, on_shard_done)

    tiles = model.tile_spec
    on_cuda = model.device.type == "cuda"

    def load_tiled() -> bool:
        for shard, records, last in _batches(shards, options.batch_size):
            for batch in load_tiled_batches(shard, records, decoder, options.max_pixels, last, tiles, options.read_timeout):
                # the batch, then its tiles: one group of decoded images and a few chunks in memory
                if not _put(loaded_q, batch, stop):
                    return False
                for chunk in tile_chunks_of(batch, model_batch):
                    if not _put(loaded_q, chunk, stop):
                        return False
        return True

    def load_all() -> None:
        torch.set_num_threads(1)  # this thread's resizes only: the model owns the cores
        timing.attach(clock)
        if tiles is not None:
            if not load_tiled():
                return
            _put(loaded_q, _DONE, stop)
            return
        if on_cuda:  # several loader workers, pinned copies (engine/scan/cuda_feed.py)
            loaded: Iterable[LoadedBatch] = cuda_feed.load_batches(
                _batches(shards, options.batch_size), cuda_decoder, size, options.max_pixels, model.device, workers, stop,
                options.read_timeout, clock,
            )
        else:
            loaded = (load_batch(shard, records, decoder, size, options.max_pixels, last, options.read_timeout)
                      for shard, records, last in _batches(shards, options.batch_size))  # fmt: skip
        for batch in loaded:
            if not _put(loaded_q, batch, stop):
                return
        _put(loaded_q, _DONE, stop)

    def write_all() -> None:
        timing.attach(clock)
        while True:
            try:
                item = scored_q.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():  # the loop stopped early (an interruption, a fault): write no more
                    return
                continue
            if item is _DONE or stop.is_set():
                return
            writer.write(item)

    if on_cuda:
        from engine.scan import cuda_feed

        workers = cuda_feed.feed_workers(options.feed_workers)
        threads = cuda_feed.decoder_threads(workers, options.decode_threads)
        first = [decoder]  # the caller's (or the one made above) goes to the first worker

        def cuda_decoder() -> Decoder:
            return first.pop() if first else make_decoder(options.decoder, model.device, options.batch_size, threads)

    loader, writer_thread = _Worker("vade-loader", load_all), _Worker("vade-writer", write_all)
    loader.start()
    writer_thread.start()
    def emit(scored: ScoredBatch) -> None:
        _put_while_alive(scored_q, scored, writer_thread)
        times.images += len(scored.loaded.records)
        if on_batch:
            on_batch(len(scored.loaded.records))

    if tiles is not None:  # the tiled path on any device (the CUDA feed's stage scores whole images)
        stage = ModelStage(model, model_batch, times, tiles=True, clock=clock)
        gather: _MicroBatcher | TileBatcher = TileBatcher(stage, times, emit)
    else:
        stage = (cuda_feed.CudaModelStage(model, model_batch, times) if on_cuda
                 else ModelStage(model, model_batch, times, clock=clock))
        gather = _MicroBatcher(stage, times, emit)
    with timing.attached(clock):  # this thread: the CUDA stage's event times, the tiles' stitching
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
                if isinstance(item, TileChunk):
                    gather.add_tiles(item)
                    continue
                times.decode += item.seconds
                gather.add(item)
            gather.flush()
            _put_while_alive(scored_q, _DONE, writer_thread)
            writer_thread.join()
            writer_thread.check()
            loader.check()
        finally:
            stop.set()
            writer_thread.join(timeout=WRITER_GRACE_S)  # a batch being written is finished: a clean stopping point
            stage.close()
    times.write = writer.seconds
    times.loop = time.perf_counter() - started
    if clock is not None:
        times.stages, times.stage_cpu = clock.totals(), clock.cpu_totals()
    return times


def _stage_clock(options: ScanOptions, device: torch.device) -> timing.StageClock | None:
    """A clock for the stages when asked for; on CUDA a span waits for its thread's stream at its end,
    so it measures the device work it queued (the instrumented run overlaps less than a plain one)."""
    if not options.stage_timing:
        return None
    return timing.StageClock((lambda: torch.cuda.current_stream().synchronize()) if device.type == "cuda" else None)
