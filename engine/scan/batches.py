"""The records that flow between the scan's stages: loader -> model -> writer, and the time they took.

Plain data (tensors and arrays), defined below every stage so that each stage imports them and none
imports another stage for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engine.inputs.sources import Record, Shard
    from engine.tiling import TileLayout


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
    # Tiled models: `images` is empty; each decoded image's layout, and its scaled pixels until the
    # loader has cut them into TileChunks (only the loader thread touches `scaled`).
    layouts: dict[int, TileLayout] = field(default_factory=dict)
    scaled: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TileChunk:
    """Consecutive tiles of one decoded image of a LoadedBatch, sent after the batch itself."""

    batch: LoadedBatch
    offset: int  # the image's offset in batch.records
    first: int  # index of the first tile in the image's layout
    tiles: torch.Tensor  # (n, 3, T, T) float32 in [0, 1]


@dataclass
class ScoredBatch:
    loaded: LoadedBatch
    raw_scores: np.ndarray  # (n_ok,) float32
    scores: np.ndarray  # (n_ok,) float32, normalised
    maps: np.ndarray  # (n_ok, S, S) float16, normalised (tiled: each map at [:map_h, :map_w], NaN around)
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
    # With ScanOptions.stage_timing: thread-seconds per fine stage (engine.timing: read, inspect,
    # decode, resize, backbone, scoring, map, write); on a cluster summed over tasks.
    stages: dict[str, float] = field(default_factory=dict)
    stage_cpu: dict[str, float] = field(default_factory=dict)  # the same stages' CPU seconds
    # On a cluster: per worker address, {"images", "tasks", "seconds" (its tasks' loop time summed), "stages"}.
    workers: dict[str, dict] = field(default_factory=dict)

    def add_stages(self, other: StageTimes) -> None:
        """Add another run's stage seconds (a cluster task's) to these."""
        for mine, theirs in ((self.stages, other.stages), (self.stage_cpu, other.stage_cpu)):
            for name, seconds in theirs.items():
                mine[name] = mine.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}
