"""The scan's feed and model stage on CUDA: several loader workers, pinned copies, one host sync per
micro-batch. Used by engine/scan/loop.py only when the model runs on CUDA (the CPU path is unchanged).

    loader workers (W threads)          main thread (model)               copy stream
    read, inspect, decode, resize  ->   features + scoring, micro-batch   D2H of scores and maps into
    batch b, b+1, ... at once;          n while n-1's results copy out    pinned memory; ONE event wait
    CPU pixels -> pinned -> GPU on                                        per micro-batch, when its
    the worker's own stream                                               results are handed on

* `load_batches` runs `engine.scan.loader.load_batch` for up to 2W batches at once in W threads (file
  reads, Pillow decodes and torch ops release the GIL) and yields them in order. Each thread has its
  own decoder (a DALI pipeline is not thread-safe) with `decoder_threads` DALI threads, so JPEGs go to
  the GPU (DALI "mixed", or torchvision nvjpeg in one batched call) and PNGs are decoded by W x
  threads CPU threads, not one. Pixels a CPU decoder made go to the GPU as uint8 through pinned
  memory, and every GPU step of a batch (decode, EXIF turn, resize) runs on the worker's own CUDA
  stream; the worker waits for its own stream, the main thread never does.
* `CudaModelStage` keeps CUDA_DEPTH micro-batches in flight. A micro-batch's raw scores, scores and
  float16 maps are copied to pinned host memory on a copy stream behind one event; `next_result`
  waits on that event alone (was: three blocking .cpu() copies per micro-batch, one in flight).
  Stage times come from CUDA events, read after that wait, so timing adds no sync either.

The per-stage budget for >= 4,000 images/s on the H200 and what was measured on a CPU:
docs/gpu_feed.md, benchmarks/feed_cpu.py (benchmarks/results/feed_cpu.json).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine import timing
from engine.inputs.decoders import Decoder
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S
from engine.inputs.sources import Record, Shard
from engine.scan.batches import LoadedBatch
from engine.scan.loader import load_batch
from engine.scan.model_stage import F16_MAX, MicroResult, ModelStage

MAX_FEED_WORKERS = 8  # loader threads on CUDA (the H200 machine has 16 cores: half feed, half spare)
CUDA_DEPTH = 2  # micro-batches in flight in the model stage on CUDA


def feed_workers(requested: int = 0) -> int:
    """Loader threads: `requested`, or min(MAX_FEED_WORKERS, cores) when 0."""
    return requested if requested > 0 else max(1, min(MAX_FEED_WORKERS, os.cpu_count() or 1))


def decoder_threads(workers: int, requested: int = 1) -> int:
    """DALI threads per loader worker: the cores shared out between the workers, at least `requested`."""
    return max(requested, (os.cpu_count() or 1) // max(1, workers))


class _Uploading:
    """A CPU decoder whose pixels go to the GPU as uint8 (through pinned memory, on the current stream),
    so the resize runs there: a quarter of the bytes of float pixels, and no CPU resize (~0.5 ms of
    CPU per 256 px image, benchmarks/results/feed_cpu.json)."""

    def __init__(self, decoder: Decoder, device: torch.device):
        self.inner, self.name, self.device = decoder, decoder.name, device

    def decode(self, items: list) -> list:
        out = self.inner.decode(items)
        return [r.pin_memory().to(self.device, non_blocking=True) if isinstance(r, torch.Tensor) and not r.is_cuda else r
                for r in out]  # fmt: skip


def _handed_over(images: torch.Tensor, device: torch.device, stream: Any) -> torch.Tensor:
    """Wait (in this worker) for this worker's stream, and let the model's stream use `images` safely."""
    images = images.to(device, non_blocking=True)  # an empty batch is made on the CPU
    images.record_stream(torch.cuda.default_stream(device))  # no reuse of the block while the model reads it
    done = torch.cuda.Event()
    done.record(stream)
    done.synchronize()
    return images


def load_batches(
    batches: Iterable[tuple[Shard, list[Record], bool]],
    new_decoder: Callable[[], Decoder],
    size: int,
    max_pixels: int,
    device: torch.device,
    workers: int,
    stop: threading.Event | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    clock: timing.StageClock | None = None,
) -> Iterator[LoadedBatch]:
    """`load_batch` for each (shard, records, last), `workers` batches at once, yielded in order, on `device`;
    the workers' stage spans go to `clock` when given."""
    local = threading.local()

    def init() -> None:
        torch.set_num_threads(1)  # each worker's resizes stay on its own core
        timing.attach(clock)

    on_cuda = device.type == "cuda"

    def job(shard: Shard, records: list[Record], last: bool) -> LoadedBatch:
        if not hasattr(local, "decoder"):
            decoder = new_decoder()
            local.decoder = _Uploading(decoder, device) if on_cuda and decoder.device.type != "cuda" else decoder
            local.stream = torch.cuda.Stream(device) if on_cuda else None
        t0 = time.perf_counter()
        if not on_cuda:
            return load_batch(shard, records, local.decoder, size, max_pixels, last, read_timeout)
        with torch.cuda.stream(local.stream):  # decode, orientation, resize: this worker's stream
            batch = load_batch(shard, records, local.decoder, size, max_pixels, last, read_timeout)
            batch.images = _handed_over(batch.images, device, local.stream)
        batch.seconds = time.perf_counter() - t0
        return batch

    ahead: deque[Future] = deque()
    with ThreadPoolExecutor(workers, "vade-feed", init) as pool:
        try:
            for item in batches:
                ahead.append(pool.submit(job, *item))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
                if stop is not None and stop.is_set():
                    return
            while ahead:
                yield ahead.popleft().result()
        finally:
            for fut in ahead:
                fut.cancel()


@dataclass
class _InFlight:
    """A micro-batch whose results are still being computed and copied out."""

    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # raw, scores, maps in pinned memory
    events: tuple[Any, Any, Any, Any]  # start, features done, scoring done, copied (CUDA events)
    threshold: float

    def wait(self, times: Any) -> MicroResult:
        start, features, scored, copied = self.events
        copied.synchronize()  # the one host sync of this micro-batch
        times.features += start.elapsed_time(features) / 1000
        times.scoring += features.elapsed_time(scored) / 1000
        timing.add("backbone", start.elapsed_time(features) / 1000)  # device time; the maps are in scoring
        timing.add("scoring", features.elapsed_time(scored) / 1000)
        raw, scores, maps = (t.numpy() for t in self.host)
        return MicroResult(raw, scores, maps, raw.astype(np.float64) >= self.threshold)


class CudaModelStage(ModelStage):
    """ModelStage for a CUDA model: CUDA_DEPTH micro-batches in flight, results copied out asynchronously."""

    def __init__(self, model: Any, model_batch: int, times: Any, depth: int = CUDA_DEPTH):
        super().__init__(model, model_batch, times)
        self.depth = depth
        self._copy = torch.cuda.Stream(model.device)

    def _run(self, images: torch.Tensor, real: int) -> _InFlight:  # type: ignore[override]
        model = self.model
        events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(4))
        compute = torch.cuda.current_stream(model.device)
        with torch.inference_mode(), timing.detached():  # timed by the events, not by host spans
            events[0].record(compute)
            feature_maps = model.features(images)
            events[1].record(compute)
            out = model.score_features(feature_maps)
            raw = out.scores[:real].float()
            maps = model.normalize(out.maps[:real]).clamp_(-F16_MAX, F16_MAX).to(torch.float16)
            scores = model.normalize(raw).float()
            events[2].record(compute)
            host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (raw, scores, maps))
            self._copy.wait_stream(compute)
            with torch.cuda.stream(self._copy):
                for dst, src in zip(host, (raw, scores, maps), strict=True):
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(self._copy)
                events[3].record(self._copy)
        return _InFlight(host, events, float(model.threshold))  # type: ignore[arg-type]

    def next_result(self) -> MicroResult:
        job, _ = self.pending.popleft()
        return job.wait(self.times) if isinstance(job, _InFlight) else job
