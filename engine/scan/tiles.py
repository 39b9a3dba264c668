"""The scan's tiled path: tiles of many images through fixed-size micro-batches, stitched per image.

The loader sends each LoadedBatch, then its images' TileChunks. Tiles are gathered across images and
batches into full micro-batches of the model stage (only the very last one of a run is padded), so a
tile's patch grid does not depend on which tiles share its micro-batch. Results come back in order;
each tile's grid goes to its image's GridStitcher, and when an image's last tile is in, the model
finishes it (score and map from the stitched grid). Batches leave, whole, in the order they came.
Memory: the tiles waiting for a micro-batch, the micro-batches in flight, and one stitched grid per
image not yet finished (tiles are never all held: a 100 MP image streams through).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import timing
from engine.features.stitch import GridStitcher
from engine.scan.batches import LoadedBatch, ScoredBatch, StageTimes, TileChunk
from engine.scan.model_stage import F16_MAX, ModelStage


@dataclass
class _Pending:
    """A batch whose images are being scored: a stitcher per image still open, results per image done."""

    batch: LoadedBatch
    stitchers: dict[int, GridStitcher]
    results: dict[int, tuple[float, np.ndarray]] = field(default_factory=dict)  # offset -> (raw, float16 map)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.batch.ok)


class TileBatcher:
    """add(batch) then its chunks with add_tiles(chunk); flush() at the end. `emit` gets ScoredBatches."""

    def __init__(self, stage: ModelStage, times: StageTimes, emit: Callable[[ScoredBatch], None]):
        self.stage, self.model_batch, self.times, self.emit = stage, stage.model_batch, times, emit
        self.model = stage.model
        self.waiting: deque[_Pending] = deque()
        self.open: dict[int, _Pending] = {}  # id(batch) -> its pending record, until handed back
        self.unscored: list[torch.Tensor] = []
        self.unscored_from: list[tuple[_Pending, int, int]] = []  # (batch, image offset, tile index) per tile
        self.in_flight: deque[list[tuple[_Pending, int, int]]] = deque()  # provenance per micro-batch

    def add(self, batch: LoadedBatch) -> None:
        pending = _Pending(batch, {offset: GridStitcher(batch.layouts[offset]) for offset in batch.ok})
        self.waiting.append(pending)
        self.open[id(batch)] = pending
        self._hand_back()

    def add_tiles(self, chunk: TileChunk) -> None:
        pending = self.open[id(chunk.batch)]
        self.unscored.append(chunk.tiles)
        self.unscored_from += [(pending, chunk.offset, chunk.first + k) for k in range(chunk.tiles.shape[0])]
        self._submit(len(self.unscored_from) // self.model_batch * self.model_batch)
        self._score(keep_in_flight=self.stage.depth)

    def flush(self) -> None:
        """Score every tile left (the last micro-batch padded) and hand back every batch."""
        self._submit(len(self.unscored_from))
        self._score(keep_in_flight=0)

    def _submit(self, take: int) -> None:
        if not take:
            return
        tiles = self.unscored[0] if len(self.unscored) == 1 else torch.cat(self.unscored)
        for start in range(0, take, self.model_batch):
            stop = min(take, start + self.model_batch)
            self.stage.submit(tiles[start:stop])
            self.in_flight.append(self.unscored_from[start:stop])
        self.unscored = [tiles[take:]] if take < tiles.shape[0] else []
        self.unscored_from = self.unscored_from[take:]

    def _score(self, keep_in_flight: int) -> None:
        while len(self.stage.pending) > keep_in_flight:
            grids = self.stage.next_result()
            for k, (pending, offset, index) in enumerate(self.in_flight.popleft()):
                stitcher = pending.stitchers[offset]
                stitcher.add(index, grids[k])
                if stitcher.complete:
                    pending.results[offset] = self._finish(stitcher)
                    del pending.stitchers[offset]
            self._hand_back()
        self._hand_back()

    def _finish(self, stitcher: GridStitcher) -> tuple[float, np.ndarray]:
        with torch.inference_mode(), timing.span("map"):  # stitched grid -> score and map
            out = self.model.finish_tiled(stitcher.result(), stitcher.layout)
            amap = self.model.normalize(out.map).clamp_(-F16_MAX, F16_MAX).to(torch.float16).cpu().numpy()
        return float(out.score), amap

    def _hand_back(self) -> None:
        while self.waiting and self.waiting[0].done:
            pending = self.waiting.popleft()
            del self.open[id(pending.batch)]
            self.emit(scored_batch(self.model, pending.batch, [pending.results[o] for o in pending.batch.ok]))


def scored_batch(model: Any, batch: LoadedBatch, results: list[tuple[float, np.ndarray]]) -> ScoredBatch:
    """A tiled batch's results as a ScoredBatch: maps as a list, each at its layout's map shape."""
    raw = np.array([r for r, _ in results], dtype=np.float32)
    scores = model.normalize(torch.from_numpy(raw)).float().numpy() if raw.size else raw
    anomalous = raw.astype(np.float64) >= float(model.threshold)
    return ScoredBatch(batch, raw, scores, [m for _, m in results], anomalous)
