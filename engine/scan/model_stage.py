"""The model stage of a scan: fixed-size micro-batches in, per-image scores and float16 maps out.

On CPUs, W worker threads (W = torch's thread count, i.e. the cores) each take whole micro-batches,
backbone and scoring, with ONE intra-op thread each. Scoring is many small operations and the
backbone a few large ones; OpenMP teams that meet at a barrier after every small op wait on each
other whenever the loader or writer thread takes a core, while independent single-threaded workers
never wait and balance themselves whichever part is heavier (benchmarks/results/scan_cpu_*.json).
On CUDA the work is already asynchronous; it runs in the calling thread.

Determinism is unchanged by the threads: each micro-batch has the same images, the same shape and
one intra-op thread wherever it runs, and results come back in submission order.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine import timing

F16_MAX = 65504.0  # maps are stored as float16: larger values are clipped, not turned into inf
MAX_CPU_WORKERS = 16


@dataclass
class MicroResult:
    """Results for the real (unpadded) images of one micro-batch."""

    raw_scores: np.ndarray  # (n,) float32
    scores: np.ndarray  # (n,) float32, normalised
    maps: np.ndarray  # (n, S, S) float16, normalised
    anomalous: np.ndarray  # (n,) bool


class ModelStage:
    """Submit micro-batches of exactly `model_batch` images (the last may be short: it is zero-padded);
    take their results back in order with `next_result`. Use as a context manager.

    `depth` micro-batches should be kept in flight to keep every worker busy."""

    def __init__(self, model: Any, model_batch: int, times: Any, cpu_threads: int | None = None, tiles: bool = False,
                 clock: timing.StageClock | None = None):  # fmt: skip
        self.model, self.model_batch, self.times = model, model_batch, times
        self.tiles = tiles  # micro-batches of tiles: results are their raw patch grids (model.score_tiles)
        self.pending: deque[tuple[Future | MicroResult, int]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.depth = 1
        if model.device.type == "cpu":
            self.depth = max(1, min(MAX_CPU_WORKERS, cpu_threads or torch.get_num_threads()))
            self._pool = ThreadPoolExecutor(self.depth, "vade-model", _worker_init, (clock,))
            model.prepare_scoring()  # shared read-only state (the kNN index) built once, before the workers

    def __enter__(self) -> ModelStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, images: torch.Tensor) -> None:
        """Queue one micro-batch (at most `model_batch` images)."""
        real = images.shape[0]
        if not 0 < real <= self.model_batch:
            raise ValueError(f"a micro-batch holds 1..{self.model_batch} images, got {real}")
        if real < self.model_batch:
            pad = images.new_zeros((self.model_batch - real, *images.shape[1:]))
            images = torch.cat([images, pad])
        if self._pool is None:
            self.pending.append((self._run(images, real), real))
        else:
            self.pending.append((self._pool.submit(self._run, images, real), real))

    def next_result(self) -> Any:
        """The oldest submitted micro-batch's results (waiting for them if need be): a MicroResult,
        or for tiles the (real, C, h, w) raw grids."""
        job, _ = self.pending.popleft()
        return job.result() if isinstance(job, Future) else job

    def _run(self, images: torch.Tensor, real: int) -> Any:
        if self.tiles:
            return self._run_tiles(images, real)
        model = self.model
        t0 = time.perf_counter()
        with torch.inference_mode():
            with timing.span("backbone"):
                feature_maps = model.features(images)
            t1 = time.perf_counter()
            with timing.span("scoring"):  # the maps' upsampling and blur: a "map" span inside
                out = model.score_features(feature_maps)
                raw = out.scores[:real]
                scores = model.normalize(raw).float().cpu().numpy()
                raw_np = raw.float().cpu().numpy()
            with timing.span("map"):
                maps = model.normalize(out.maps[:real]).clamp_(-F16_MAX, F16_MAX).to(torch.float16).cpu().numpy()
        t2 = time.perf_counter()
        with self._lock:
            self.times.features += t1 - t0
            self.times.scoring += t2 - t1
        return MicroResult(raw_np, scores, maps, raw_np.astype(np.float64) >= float(model.threshold))


    def _run_tiles(self, images: torch.Tensor, real: int) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            with timing.span("backbone"):
                feature_maps = self.model.features(images)
            t1 = time.perf_counter()
            with timing.span("scoring"):
                grids = self.model.tile_grids(feature_maps)[:real]
        t2 = time.perf_counter()
        with self._lock:
            self.times.features += t1 - t0
            self.times.scoring += t2 - t1
        return grids


def _worker_init(clock: timing.StageClock | None) -> None:
    torch.set_num_threads(1)
    timing.attach(clock)


def score_images(model: Any, images: torch.Tensor, model_batch: int, times: Any) -> list[MicroResult]:
    """All of `images` through a ModelStage, one micro-batch after another (benchmarks, tools)."""
    results = []
    with ModelStage(model, model_batch, times) as stage:
        for start in range(0, images.shape[0], model_batch):
            stage.submit(images[start : start + model_batch])
            if len(stage.pending) > stage.depth:
                results.append(stage.next_result())
        while stage.pending:
            results.append(stage.next_result())
    return results
