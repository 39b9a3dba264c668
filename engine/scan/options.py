"""How to run a scan: the options a user sets (what a scan computes is fixed by the model and the source).

Light on purpose (no torch, zarr or pyarrow): the command line builds its flags from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError
from engine.inputs.settings import DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S

MODEL_BATCH = {"cpu": 8, "cuda": 64}  # images per backbone call, fixed per device type (determinism)
# shard_size 0 (the default) = auto: about SHARDS_PER_WORKER shards per worker, a multiple of SHARD_STEP,
# between SHARD_STEP and MAX_AUTO_SHARD images (the unit of resume and of a worker's task)
SHARDS_PER_WORKER = 4
SHARD_STEP = 32
MAX_AUTO_SHARD = 1024


@dataclass
class ScanOptions:
    """How to run a scan (what it computes is fixed by the model and the source)."""

    device: str = "auto"
    decoder: str = "auto"
    batch_size: int = 32  # images decoded and written together; best a multiple of the model batch
    model_batch: int = 0  # images per backbone call; 0 = MODEL_BATCH for the device. Part of the result.
    shard_size: int = 0  # images per shard; 0 = auto_shard_size(input count, worker threads). Not part of the result.
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_batches: int = 2  # decoded batches waiting for the model
    write_queue: int = 4  # scored batches waiting for the writer
    decode_threads: int = 1  # DALI worker threads; keep light on small CPUs (torch uses the cores)
    feed_workers: int = 0  # CUDA only: loader threads, batches decoded at once (0 = min(8, cores))
    read_timeout: float = DEFAULT_READ_TIMEOUT_S  # seconds one file's read may take before it is an error row
    stage_timing: bool = False  # time each stage (engine.timing) into StageTimes.stages: `vade bench`. Not part of the result.

    def validate(self) -> None:
        checks = (("batch_size", 1), ("shard_size", 0), ("max_pixels", 1), ("decode_threads", 1), ("model_batch", 0),
                  ("feed_workers", 0))
        for name, low in checks:
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.read_timeout, bool) or not isinstance(self.read_timeout, (int, float)) or not (
            0 < self.read_timeout < float("inf")
        ):
            raise ConfigError(f"read_timeout must be a number of seconds > 0, got {self.read_timeout!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        from engine.inputs.decoders import check_decoder

        check_decoder(self.decoder, self.device)  # before any output is written



def resolve_model_batch(options: ScanOptions, device_type: str) -> int:
    """Images per backbone call for a device type ("cpu", "cuda"): the option, or MODEL_BATCH's."""
    return options.model_batch or MODEL_BATCH.get(device_type, 8)


def auto_shard_size(count: int, workers: int = 1) -> int:
    """Images per shard for `count` inputs over `workers` worker threads: enough shards to keep every
    worker busy to the end (about SHARDS_PER_WORKER each), no fewer than SHARD_STEP images per shard
    (the per-task cost stays small) and at most MAX_AUTO_SHARD (a lost worker or a kill redoes little)."""
    per_shard = -(-max(count, 1) // (max(workers, 1) * SHARDS_PER_WORKER))
    return min(MAX_AUTO_SHARD, max(SHARD_STEP, -(-per_shard // SHARD_STEP) * SHARD_STEP))
