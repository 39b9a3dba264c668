"""The CUDA feed's loader workers, run on a CPU: several batches at once give exactly the batches,
rows, errors and pixels that the single loader thread gives, in the same order."""

from __future__ import annotations

import threading

import pytest
import torch
from imagegen import broken_files, valid_files, write_files

from engine.inputs.decoders import PillowDecoder
from engine.inputs.sources import Record, Shard
from engine.scan.cuda_feed import decoder_threads, feed_workers, load_batches
from engine.scan.loader import load_batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Shard]:
    folder = tmp_path_factory.mktemp("feed")
    files = {**valid_files(), **{name: data for name, (data, _) in broken_files().items()}}
    paths = write_files(folder, files)
    records = [Record(i, str(p), str(p)) for i, p in enumerate(sorted(paths))]
    records.append(Record(len(records), "", ""))  # a row without a path
    return [Shard(0, 0, records[:11]), Shard(1, 11, records[11:])]


def _batches(shards: list[Shard], size: int):
    for shard in shards:
        for start in range(0, len(shard.records), size):
            yield shard, shard.records[start : start + size], start + size >= len(shard.records)


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_loader_equals_the_single_loader(shards: list[Shard], workers: int) -> None:
    decoder = PillowDecoder(torch.device("cpu"))
    expected = [load_batch(s, r, decoder, 32, 10**8, last) for s, r, last in _batches(shards, 4)]
    made: list[str] = []

    def new_decoder() -> PillowDecoder:
        made.append(threading.current_thread().name)
        return PillowDecoder(torch.device("cpu"))

    got = list(load_batches(_batches(shards, 4), new_decoder, 32, 10**8, torch.device("cpu"), workers))
    assert len(got) == len(expected) and len(made) <= workers and len(set(made)) == len(made)  # one per thread
    assert any(b.errors for b in got) and sum(len(b.ok) for b in got) > 10
    for a, b in zip(got, expected, strict=True):
        assert (a.shard.id, [r.position for r in a.records], a.last_in_shard) == (
            b.shard.id, [r.position for r in b.records], b.last_in_shard)  # fmt: skip
        assert a.ok == b.ok and a.errors == b.errors and a.sizes == b.sizes
        assert torch.equal(a.images, b.images)


def test_a_stopped_feed_ends_without_loading_everything(shards: list[Shard]) -> None:
    stop = threading.Event()
    feed = load_batches(_batches(shards, 2), lambda: PillowDecoder(torch.device("cpu")), 32, 10**8,
                        torch.device("cpu"), 1, stop)  # fmt: skip
    first = next(feed)
    stop.set()
    rest = list(feed)
    assert first.records and len(rest) < len(list(_batches(shards, 2))) - 1


def test_worker_and_thread_counts() -> None:
    assert feed_workers(3) == 3 and 1 <= feed_workers(0) <= 8
    assert decoder_threads(1, 1) >= 1 and decoder_threads(10**6, 4) == 4
