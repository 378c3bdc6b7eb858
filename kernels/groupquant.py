"""Group quantization of saved activations: ``bits``-bit codes per group of elements.

Format (bit-exact twins: :func:`lctriton.kernels.reference.quantize_groups` and
:func:`~lctriton.kernels.reference.dequantize_groups`). A tensor of ``n`` elements, read
flat in its contiguous order and widened to float32 (float64 rounded to nearest), is cut into
groups of ``G`` (a power of two) consecutive elements, the last one padded. Per group:

* ``low`` = the least finite element (+0.0 if it is a zero of either sign) and ``high`` the
  greatest (both 0 if none is finite);
  ``span = high - low``; ``L = 2**bits - 1``;
* ``inv = L / span`` and ``step = span / L``, both correctly rounded; a group with a zero
  span, or so narrow that ``inv`` overflows, has ``inv = step = 0`` (every element restores
  to ``low``); a group holding inf or NaN, or whose span overflows, has ``step = NaN`` and
  restores to NaN throughout, so a non-finite activation cannot pass silently as a finite one;
* each element's code is ``min(int((x - low) * inv + u), L)`` (the float32 operations done
  one at a time, truncation toward zero), 0 for non-finite elements, padding and NaN groups,
  where ``u`` is 0.5 for rounding to nearest and, for stochastic rounding, the hash offset
  ``(h >> 8) * 2**-24``, ``h = mix32((i mod 2**32) ^ mix32((i >> 32) ^ seed))`` of the
  element's flat index ``i`` (``mix32``: xorshift 16, multiply by 0x21F0AAAD, xorshift 15,
  multiply by 0x735A2D97, xorshift 15, all mod 2**32): uniform on [0, 1), so the rounding is
  unbiased and reproducible from the seed (``reference.rounding_noise``);
* codes are packed ``8 / bits`` to a byte, little end first: element ``i`` of the group sits
  at bits ``(i mod (8 / bits)) * bits`` of byte ``i // (8 / bits)``; the groups' bytes are
  laid end to end (``G * bits / 8`` bytes each).

Restoring computes ``low + float32(code) * step`` (two roundings, no fused multiply-add),
rounds it to the tensor's dtype (nearest, ties to even), and NaN for NaN groups.

One program per ``GROUPS`` groups, viewed as ``[GROUPS, G * bits / 8, 8 / bits]``: the group
reductions, the rounding and the packing happen in registers, reading the input once and
writing ``bits / 8`` bytes per element plus 8 bytes per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_device, check_tensor
from lctriton.kernels.encode import to_dtype
from lctriton.kernels.histogram import to_f32
from lctriton.kernels.reference import AQ_MIX, _aq_check_codes, aq_sizes, check_aq_args

__all__ = ["quantize_groups", "dequantize_groups"]

#: Elements per program (before padding); performance only.
_ELEMENTS = 4096
#: The mixer's multipliers, as constants the kernels can read.
AQ_MIX_0: tl.constexpr = tl.constexpr(AQ_MIX[0])
AQ_MIX_1: tl.constexpr = tl.constexpr(AQ_MIX[1])


@triton.jit
def _mix32(x):
    """The rounding hash's mixer on uint32 lanes (wrapping multiplications)."""
    x = x ^ (x >> 16)
    x = x * AQ_MIX_0
    x = x ^ (x >> 15)
    x = x * AQ_MIX_1
    return x ^ (x >> 15)


@triton.jit
def _group_lanes(GROUP: tl.constexpr, GROUPS: tl.constexpr, PER_BYTE: tl.constexpr):
    """This program's groups ``g`` [GROUPS], byte columns ``j`` [GROUP / PER_BYTE], code slots
    ``k`` [PER_BYTE] and the flat index of each element, [GROUPS, GROUP / PER_BYTE, PER_BYTE]."""
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, GROUP // PER_BYTE)
    k = tl.arange(0, PER_BYTE)
    offs = g[:, None, None] * GROUP + j[None, :, None] * PER_BYTE + k[None, None, :]
    return g, j, k, offs


# The seed is a runtime value: a seed of 1 must not turn into a compile-time constant.
@triton.jit(do_not_specialize=["seed"])
def _quantize_groups_kernel(
    x_ptr,  # *f32|f64|f16|bf16 [n]: the tensor, flat
    codes_ptr,  # *uint8 [groups * GROUP * BITS / 8]: out, packed codes
    low_ptr,  # *f32 [groups]: out, group minima
    step_ptr,  # *f32 [groups]: out, group steps (NaN: non-finite group)
    n,
    groups,
    seed,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    KIND: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = GROUP // PER_BYTE
    LEVELS: tl.constexpr = (1 << BITS) - 1
    g, j, k, offs = _group_lanes(GROUP, GROUPS, PER_BYTE)
    valid = offs < n
    v = to_f32(tl.load(x_ptr + offs, mask=valid, other=0), KIND)
    # Non-finite from the bits: the exponent field all ones.
    finite = (v.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
    ok = finite & valid
    lo = tl.min(tl.min(tl.where(ok, v, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(ok, v, float("-inf")), axis=2), axis=1)
    empty = lo == float("inf")
    # A zero minimum is stored as +0.0: the reductions may return either sign.
    lo = tl.where(empty | (lo == 0), 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    span = hi - lo
    bad = tl.max(tl.max((valid & ~finite).to(tl.int32), axis=2), axis=1) != 0
    bad = bad | (span == float("inf"))
    levels = tl.full((GROUPS,), LEVELS, tl.float32)
    inv = tl.div_rn(levels, tl.where(span > 0, span, 1.0))
    flat = (span == 0) | (inv == float("inf")) | bad
    inv = tl.where(flat, 0.0, inv)
    step = tl.where(flat, 0.0, tl.div_rn(span, levels))
    step = tl.where(bad, float("nan"), step)
    lo3 = lo[:, None, None]
    usable = ok & ~bad[:, None, None]
    t = (tl.where(usable, v, lo3) - lo3) * inv[:, None, None]
    if STOCHASTIC:
        s = _mix32((offs >> 32).to(tl.uint32) ^ seed.to(tl.uint32))
        h = _mix32(offs.to(tl.uint32) ^ s)
        t = t + (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    else:
        t = t + 0.5
    q = tl.minimum(t.to(tl.int32), LEVELS)
    q = tl.where(valid, q, 0)
    packed = tl.sum(q << (k * BITS)[None, None, :], axis=2)
    gmask = g < groups
    tl.store(codes_ptr + g[:, None] * BYTES + j[None, :], packed.to(tl.uint8), mask=gmask[:, None])
    tl.store(low_ptr + g, lo, mask=gmask)
    tl.store(step_ptr + g, step, mask=gmask)


@triton.jit
def _quiet_nan(KIND: tl.constexpr):
    """``reference.AQ_NAN_BITS`` of the dtype: conversions would not agree on NaN bits."""
    if KIND == 0:
        r = tl.full((), 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    elif KIND == 1:
        r = tl.full((), 0x7FF8000000000000, tl.uint64).to(tl.float64, bitcast=True)
    elif KIND == 2:
        r = tl.full((), 0x7E00, tl.uint16).to(tl.float16, bitcast=True)
    else:
        r = tl.full((), 0x7FC0, tl.uint16).to(tl.bfloat16, bitcast=True)
    return r


@triton.jit
def _dequantize_groups_kernel(
    codes_ptr,  # *uint8 [groups * GROUP * BITS / 8]: packed codes
    low_ptr,  # *f32 [groups]: group minima
    step_ptr,  # *f32 [groups]: group steps
    out_ptr,  # *f32|f64|f16|bf16 [n]: out, restored values
    n,
    groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    KIND: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = GROUP // PER_BYTE
    LEVELS: tl.constexpr = (1 << BITS) - 1
    g, j, k, offs = _group_lanes(GROUP, GROUPS, PER_BYTE)
    gmask = g < groups
    byte = tl.load(codes_ptr + g[:, None] * BYTES + j[None, :], mask=gmask[:, None], other=0).to(tl.int32)
    lo = tl.load(low_ptr + g, mask=gmask, other=0.0)
    step = tl.load(step_ptr + g, mask=gmask, other=0.0)
    q = (byte[:, :, None] >> (k * BITS)[None, None, :]) & LEVELS
    bad = (step != step)[:, None, None]
    v = lo[:, None, None] + q.to(tl.float32) * tl.where(step != step, 0.0, step)[:, None, None]
    v = tl.where(bad, _quiet_nan(KIND), to_dtype(v, KIND))
    tl.store(out_ptr + offs, v, mask=offs < n)


def _groups_per_program(group_size: int) -> int:
    return max(1, _ELEMENTS // group_size)


def quantize_groups(
    x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group quantization on the GPU (or in the interpreter); see ``reference.quantize_groups``.

    Returns:
        ``(codes, low, step)`` on ``x``'s device.

    Raises:
        TypeError: If ``x`` is not a floating tensor or an integer argument is not an int.
        ValueError: If an argument is out of range or ``x`` lives where no kernel reads it.
    """
    bits, group_size, seed = check_aq_args(bits, group_size, seed)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_KIND:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    flat = check_tensor("x", x)
    n, dev = flat.numel(), flat.device
    groups, nbytes = aq_sizes(n, bits, group_size)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    low = torch.empty(groups, dtype=torch.float32, device=dev)
    step = torch.empty(groups, dtype=torch.float32, device=dev)
    if n == 0:
        return codes, low, step
    per_program = _groups_per_program(group_size)
    _quantize_groups_kernel[(triton.cdiv(groups, per_program),)](
        flat, codes, low, step, n, groups, seed,
        BITS=bits, GROUP=group_size, GROUPS=per_program, STOCHASTIC=bool(stochastic),
        KIND=DTYPE_KIND[x.dtype], enable_fp_fusion=False,
    )
    return codes, low, step


def dequantize_groups(
    codes: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Restore quantized groups on the GPU (or in the interpreter); see
    ``reference.dequantize_groups``.

    Returns:
        Flat tensor of ``numel`` elements of ``dtype`` on ``codes``' device.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If the sizes do not belong together or the tensors live where no kernel
            reads them.
    """
    bits, group_size, _ = check_aq_args(bits, group_size, 0)
    _aq_check_codes(codes, low, step, bits, group_size, numel)
    if dtype not in DTYPE_KIND:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    check_device("codes", codes)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel == 0:
        return out
    groups = low.numel()
    per_program = _groups_per_program(group_size)
    _dequantize_groups_kernel[(triton.cdiv(groups, per_program),)](
        codes.contiguous(), low.contiguous(), step.contiguous(), out, numel, groups,
        BITS=bits, GROUP=group_size, GROUPS=per_program, KIND=DTYPE_KIND[dtype],
        enable_fp_fusion=False,
    )
    return out
