"""LoRA dropout on CUDA as one Triton kernel whose seed is read from a device tensor.

The fused LoRA layer (fastlora) draws each block's dropout mask from a seed and draws it again in
the backward pass instead of keeping it. torch's generators take their seed from the host
(`manual_seed(int)`), so a step captured as a CUDA graph (graphed.py) would replay the seed it was
captured with: the same masks every step. Here the seed is loaded by the kernel from a tensor on the
device, which the host refills before each micro-batch (outside any graph), plus a constant salt per
layer and block: the kernel is the same every replay, the masks are not. One pass over the input,
as torch's dropout takes; Philox counters from Triton's `tl.rand`. The CPU, and a CUDA box without
Triton, keep torch's generator (fastlora.dropped); a graph then refuses dropout.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Any

BLOCK = 1024


@cache
def available() -> bool:
    """Triton is importable (it comes with torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


@cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def drop(x_ptr, out_ptr, seed_ptr, salt, n, p, scale, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        keep = tl.rand(tl.load(seed_ptr) + salt, offs) >= p
        x = tl.load(x_ptr + offs, mask=inside)
        tl.store(out_ptr + offs, tl.where(keep, x * scale, 0.0).to(x.dtype), mask=inside)

    return drop


def dropped(x: Any, p: float, seed: Any, salt: int) -> Any:
    """x with dropout p: element i kept (and scaled by 1 / (1 - p)) where Philox(seed + salt, i)
    is at least p. `seed` is a one-element int64 tensor on x's device; the same seed and salt give
    the same mask."""
    import triton

    x = x.contiguous()
    out = x.new_empty(x.shape)
    n = x.numel()
    assert n <= 2**31 - BLOCK, "int32 offsets: one block of rows at a time (fastlora.DROP_ROWS)"
    _kernel()[(triton.cdiv(n, BLOCK),)](x, out, seed, salt, n, p, 1.0 / (1.0 - p), BLOCK=BLOCK)
    return out
