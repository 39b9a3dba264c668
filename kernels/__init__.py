"""Scoring kernels: each op is a Triton kernel plus a torch reference behind one `backend=` switch.

auto   -> Triton on CUDA tensors, torch elsewhere
triton -> Triton; on CPU tensors this needs TRITON_INTERPRET=1 (tests only)
torch  -> the plain torch implementation
"""

from __future__ import annotations

BACKENDS = ("auto", "triton", "torch")
