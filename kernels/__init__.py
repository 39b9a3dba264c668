"""Scoring kernels: each op is a Triton kernel plus a torch reference behind one `backend=` switch.

auto   -> Triton on CUDA tensors, torch elsewhere
triton -> Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before Triton's import (tests)
torch  -> the plain torch implementation

CPU fast paths that keep the exact results: kernels.knn_index.KnnIndex (kNN against a fixed bank)
and kernels.coreset_cpu (lazy greedy k-center, used by greedy_kcenter on CPU tensors).
"""

from __future__ import annotations

BACKENDS = ("auto", "triton", "torch")
