"""kNN against a bank that stays in host memory: stream it to the GPU in chunks.

    topk_streamed(queries[Q, D] on CUDA, bank[M, D] on the CPU, k, search) -> (dist[Q, k], idx[Q, k]) on CUDA

`search(queries, chunk, k, chunk_sq_norms, precision=...)` is the on-device top-k (kernels.knn passes its
fused kernel), so this module knows nothing of kernels and kernels.knn imports it, not the reverse.

The bank is cut into chunks of `chunk_rows`; each chunk is copied into one of two pinned host
buffers (skipped when the bank is itself in pinned memory: its slices are sent as they are), sent to
the GPU on a copy stream, and searched by the fused kernel on the compute stream
while the next chunk is copied; the chunks' (distance, index) lists are merged with one top-k.
GPU memory held: two chunks plus Q x k per chunk. Bank norms, when given, are sliced per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Search = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Rows per streamed chunk: 256k rows x 1,536 dims x 4 bytes = 1.5 GiB per buffer.
DEFAULT_CHUNK_ROWS = 262_144


def topk_streamed(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    search: Search,
    bank_sq_norms: torch.Tensor | None = None,
    *,
    precision: str = "exact",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    query_owner: torch.Tensor | None = None,
    bank_owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of CUDA `queries` against a host `bank` (arguments already checked by the caller);
    `query_owner` / `bank_owner` are passed to `search` per chunk (the bank owner sliced)."""
    if (query_owner is None) != (bank_owner is None):
        raise ValueError("query_owner and bank_owner go together: give both or neither")
    device = queries.device
    n_bank, dim = bank.shape
    chunk_rows = max(chunk_rows, k)
    # A pinned, row-contiguous bank is sent straight from its own memory: no staging copy on the CPU.
    direct = bank.is_pinned() and bank.stride(1) == 1 and bank.stride(0) == dim
    staging = 0 if direct else 2
    host = [torch.empty((chunk_rows, dim), dtype=bank.dtype, pin_memory=True) for _ in range(staging)]
    dev = [torch.empty((chunk_rows, dim), dtype=bank.dtype, device=device) for _ in range(2)]
    copied = [torch.cuda.Event() for _ in range(2)]
    used = [torch.cuda.Event() for _ in range(2)]
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    starts = list(range(0, n_bank, chunk_rows))
    # A chunk smaller than k cannot fill a list: merge it together with the one before.
    if len(starts) > 1 and n_bank - starts[-1] < k:
        starts.pop()

    def send(j: int) -> None:
        slot = j % 2
        lo, hi = starts[j], (starts[j + 1] if j + 1 < len(starts) else n_bank)
        if hi - lo > chunk_rows:  # the merged tail chunk
            dev[slot] = torch.empty((hi - lo, dim), dtype=bank.dtype, device=device)
            if not direct:
                host[slot] = torch.empty((hi - lo, dim), dtype=bank.dtype, pin_memory=True)
        if direct:
            src = bank[lo:hi]
        else:
            src = host[slot][: hi - lo]
            src.copy_(bank[lo:hi])  # pageable -> pinned on the CPU
        with torch.cuda.stream(copy_stream):
            copy_stream.wait_event(used[slot])  # the kernel that read this buffer is done
            dev[slot][: hi - lo].copy_(src, non_blocking=True)
            copied[slot].record(copy_stream)

    results_d, results_i = [], []
    send(0)
    for j, lo in enumerate(starts):
        slot = j % 2
        hi = starts[j + 1] if j + 1 < len(starts) else n_bank
        if j + 1 < len(starts):
            if j >= 1 and not direct:
                copied[(j + 1) % 2].synchronize()  # chunk j-1 left the pinned buffer: reuse it
            send(j + 1)
        compute.wait_event(copied[slot])
        chunk = dev[slot][: hi - lo]
        norms = None if bank_sq_norms is None else bank_sq_norms[lo:hi].to(device, non_blocking=True)
        owners = {} if bank_owner is None else dict(
            query_owner=query_owner, bank_owner=bank_owner[lo:hi].to(device, non_blocking=True))
        d, i = search(queries, chunk, min(k, hi - lo), norms, precision=precision, **owners)
        used[slot].record(compute)
        results_d.append(d)
        results_i.append(i + lo)
    d = torch.cat(results_d, 1)
    i = torch.cat(results_i, 1)
    d, pos = torch.topk(d, k, dim=1, largest=False)
    return d, i.gather(1, pos)
