"""The model stage of a scan: fixed-size micro-batches in, per-image scores and float16 maps out.

On CPUs the stage is itself two stages: a backbone thread computes the features of micro-batch n+1
while the calling thread scores micro-batch n (nearest-neighbour search or Mahalanobis, map, scores).
Scoring is many small single-threaded operations, and the backbone is a few large ones, so on a
2-core machine one core each beats both on both cores: OpenMP threads that meet at a barrier after
every small op wait on each other whenever the loader or writer thread takes a core
(benchmarks/results/scan_cpu_*.json). On CUDA the backbone is already asynchronous; both run in the
calling thread.

Determinism is unchanged by the threads: each micro-batch has the same images, the same shape and the
same thread count wherever it runs.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

F16_MAX = 65504.0  # maps are stored as float16: larger values are clipped, not turned into inf


@dataclass
class MicroResult:
    """Results for the real (unpadded) images of one micro-batch."""

    raw_scores: np.ndarray  # (n,) float32
    scores: np.ndarray  # (n,) float32, normalised
    maps: np.ndarray  # (n, S, S) float16, normalised
    anomalous: np.ndarray  # (n,) bool


class ModelStage:
    """Submit micro-batches of exactly `model_batch` images (the last may be short: it is zero-padded);
    take their results back in order with `next_result`. Use as a context manager."""

    def __init__(self, model: Any, model_batch: int, times: Any, cpu_threads: int | None = None):
        self.model, self.model_batch, self.times = model, model_batch, times
        self.pending: deque[tuple[Future | list[torch.Tensor], int]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._caller_threads = torch.get_num_threads()
        if model.device.type == "cpu":
            threads = cpu_threads or self._caller_threads
            # Scoring keeps one core; the backbone gets the rest (at least one).
            self._pool = ThreadPoolExecutor(1, "vade-backbone", torch.set_num_threads, (max(1, threads - 1),))
            torch.set_num_threads(1)

    def __enter__(self) -> ModelStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            torch.set_num_threads(self._caller_threads)

    def submit(self, images: torch.Tensor) -> None:
        """Queue one micro-batch for the backbone (at most `model_batch` images)."""
        real = images.shape[0]
        if not 0 < real <= self.model_batch:
            raise ValueError(f"a micro-batch holds 1..{self.model_batch} images, got {real}")
        if real < self.model_batch:
            pad = images.new_zeros((self.model_batch - real, *images.shape[1:]))
            images = torch.cat([images, pad])
        if self._pool is None:
            self.pending.append((self._features(images), real))
        else:
            self.pending.append((self._pool.submit(self._features, images), real))

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.features(images)
        self.times.features += time.perf_counter() - t0
        return out

    def next_result(self) -> MicroResult:
        """Score the oldest submitted micro-batch (waiting for its features if need be)."""
        job, real = self.pending.popleft()
        feature_maps = job.result() if isinstance(job, Future) else job
        t0 = time.perf_counter()
        model = self.model
        with torch.inference_mode():
            out = model.score_features(feature_maps)
            raw = out.scores[:real]
            maps = model.normalize(out.maps[:real]).clamp_(-F16_MAX, F16_MAX).to(torch.float16).cpu().numpy()
            scores = model.normalize(raw).float().cpu().numpy()
            raw_np = raw.float().cpu().numpy()
        self.times.scoring += time.perf_counter() - t0
        return MicroResult(raw_np, scores, maps, raw_np.astype(np.float64) >= float(model.threshold))


def score_images(model: Any, images: torch.Tensor, model_batch: int, times: Any) -> list[MicroResult]:
    """All of `images` through a ModelStage, one micro-batch after another (benchmarks, tools)."""
    results = []
    with ModelStage(model, model_batch, times) as stage:
        for start in range(0, images.shape[0], model_batch):
            stage.submit(images[start : start + model_batch])
            if len(stage.pending) > 1:
                results.append(stage.next_result())
        while stage.pending:
            results.append(stage.next_result())
    return results
