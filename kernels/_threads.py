"""Run a block of many small torch operations on a set number of CPU threads.

The CPU paths (the coreset's pick rounds, the kNN index) issue thousands of operations on small
tensors per call. Splitting those over OpenMP threads gains nothing, and when the cores are shared
with other busy processes the waiting threads made them many times slower (an earlier coreset search
of small steps: 9 s on one thread, 172 s on two, on the same loaded machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block (process-wide), then restore it."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
