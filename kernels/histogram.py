"""Pass 1 of the ``lc/1`` codec: the fine-key histogram of a tensor's delta, in one read.

Format (bit-exact twin: :func:`lctriton.kernels.reference.lc_histogram`): ``d = x - base`` in
float32 (float16 and bfloat16 widened first; float64 subtracted in float64, then rounded to
float32); the fine key of ``d`` is ``bits(d) >> 19`` (sign, exponent, top 4 mantissa bits);
every non-finite delta takes the fine key 0x0FF0; the output holds the number of elements of
each of the 8192 fine keys, as int64.

Layout: one program per 4096 elements adds 1 per element to an int32 table of the 8192 keys
with relaxed atomics; tensors of more than 2**30 elements are counted in segments of 2**30,
each into a fresh int32 table summed into the int64 result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_pair

__all__ = ["NUM_FINE_KEYS", "lc_histogram"]

NUM_FINE_KEYS = 8192
_FINE_SHIFT = 19


@triton.jit
def widen_bf16(v):
    """bfloat16 -> float32 through the bits: exact, NaN payloads included, on every backend."""
    return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def to_f32(v, KIND: tl.constexpr):
    """Loaded values as float32: exact for 16-bit types, rounded to nearest for float64."""
    if KIND == 3:
        r = widen_bf16(v)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def delta_f32(x, b, HAS_BASE: tl.constexpr, KIND: tl.constexpr):
    """Step 1: the float32 delta of loaded values (KIND: 0 f32, 1 f64, 2 f16, 3 bf16)."""
    if HAS_BASE:
        if KIND == 0:
            d = x - b
        elif KIND == 1:
            d = (x - b).to(tl.float32)
        else:
            d = to_f32(x, KIND) - to_f32(b, KIND)
    else:
        d = to_f32(x, KIND)
    return d


@triton.jit
def fine_keys(d):
    """Step 2: ``bits(d) >> 19``; every non-finite delta takes the key of +inf (0x0FF0)."""
    u = d.to(tl.uint32, bitcast=True)
    return tl.where((u & 0x7F800000) == 0x7F800000, 0x0FF0, u >> 19).to(tl.int32)


@triton.jit
def _lc_histogram_kernel(
    x_ptr,  # *f32|f64|f16|bf16 [n]: the tensor
    base_ptr,  # same type [n]: its base (unused when HAS_BASE is false)
    hist_ptr,  # *int32 [8192]: fine-key counts, accumulated (zeroed by the launcher)
    n,  # number of elements, below 2**31 (the launcher splits larger tensors)
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,  # dtype code, see _runtime.DTYPE_KIND
    BLOCK: tl.constexpr,  # elements per program; performance only
):
    # One relaxed atomic per element, straight into the global table. A per-program
    # tl.histogram of 8192 bins costs far more: its lowering visits every bin for each warp's
    # elements. On an H100 at 2**28 elements: 108 ms for tl.histogram in a persistent grid
    # (no per-block table atomics), 32.6 ms here (benchmarks/histogram_study.py).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    b = x
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
    keys = fine_keys(delta_f32(x, b, HAS_BASE, KIND))
    tl.atomic_add(hist_ptr + keys, tl.full([BLOCK], 1, tl.int32), mask=mask, sem="relaxed")


#: Elements per program of pass 1, and its warps: the configuration measured on an H100.
_BLOCK = 4096
_WARPS = 8
#: Elements per launch: each launch counts into an int32 table, which cannot overflow below 2**31.
_SEGMENT = 1 << 30


def lc_histogram(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Pass 1 on the GPU (or in the interpreter): fine-key counts of ``x - base``.

    Args:
        x: float32, float64, float16 or bfloat16 tensor, any shape, on CUDA.
        base: Tensor of the same shape, dtype and device, or None for a zero base.

    Returns:
        int64 tensor of 8192 counts on ``x``'s device.

    Raises:
        TypeError: If ``x`` or ``base`` has the wrong type or dtype.
        ValueError: If ``base`` differs in shape or device, or the device cannot run kernels.
    """
    flat, b = check_pair(x, base)
    n = flat.numel()
    hist = torch.zeros(NUM_FINE_KEYS, dtype=torch.int64, device=x.device)
    part = torch.empty(NUM_FINE_KEYS, dtype=torch.int32, device=x.device)
    for start in range(0, n, _SEGMENT):
        count = min(_SEGMENT, n - start)
        part.zero_()
        xs = flat[start : start + count]
        bs = xs if b is None else b[start : start + count]  # any pointer when there is no base
        _lc_histogram_kernel[(triton.cdiv(count, _BLOCK),)](
            xs, bs, part, count, HAS_BASE=base is not None, KIND=DTYPE_KIND[x.dtype], BLOCK=_BLOCK, num_warps=_WARPS
        )
        hist += part
    return hist
