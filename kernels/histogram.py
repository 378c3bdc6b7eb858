"""Pass 1 of the ``lc/1`` codec: the fine-key histogram of a tensor's delta, in one read.

Format (bit-exact twin: :func:`lctriton.kernels.reference.lc_histogram`): ``d = x - base`` in
float32 (float16 and bfloat16 widened first; float64 subtracted in float64, then rounded to
float32); the fine key of ``d`` is ``bits(d) >> 19`` (sign, exponent, top 4 mantissa bits);
every non-finite delta takes the fine key 0x0FF0; the output holds the number of elements of
each of the 8192 fine keys, as int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_pair, perf_configs

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


@triton.autotune(
    configs=perf_configs([triton.Config({"BLOCK": b}, num_warps=w) for b in (4096, 8192, 2048) for w in (8, 4)]),
    key=["n", "KIND", "HAS_BASE"],
    reset_to_zero=["hist_ptr"],
)
@triton.jit
def _lc_histogram_kernel(
    x_ptr,  # *f32|f64|f16|bf16 [n]: the tensor
    base_ptr,  # same type [n]: its base (unused when HAS_BASE is false)
    hist_ptr,  # *int64 [8192]: fine-key counts, accumulated (zeroed by the launcher)
    n,  # number of elements
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,  # dtype code, see _runtime.DTYPE_KIND
    BLOCK: tl.constexpr,  # elements per program; performance only (autotuned)
):
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2**31 on large tensors
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    b = x
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
    d = delta_f32(x, b, HAS_BASE, KIND)
    keys = fine_keys(d)
    # Lanes past n hold d = +0.0, whose fine key is 0; the launcher takes them off bin 0,
    # which keeps the kernel free of the histogram mask that older triton lacks.
    counts = tl.histogram(keys, 8192)
    tl.atomic_add(hist_ptr + tl.arange(0, 8192), counts.to(tl.int64))


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
    if b is None:
        b = flat  # any pointer: the kernel does not read it without a base
    hist = torch.zeros(NUM_FINE_KEYS, dtype=torch.int64, device=x.device)
    if n == 0:
        return hist

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    _lc_histogram_kernel[grid](flat, b, hist, n, HAS_BASE=base is not None, KIND=DTYPE_KIND[x.dtype])
    hist[0] -= hist.sum() - n  # the padding lanes of the last program, all counted as key 0
    return hist
