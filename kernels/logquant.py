"""The ``lq/1`` pass: log-domain quantization of optimizer moments against a decayed base.

Format (bit-exact twins: :func:`lctriton.kernels.reference.lq_symbols` and
:func:`~lctriton.kernels.reference.lq_reconstruct`):

* prediction ``p = roundto_dtype(float32(base) * scale)`` (float64 tensors: ``base *
  float64(scale)``), or the base itself where it is not finite;
* each value's symbol is ``key_to_symbol[fine_key(value)]`` (fine key: ``bits(f32) >> 19``,
  0x0FF0 for non-finite values), and 0 where the prediction's fine key maps to the same
  symbol;
* the reconstruction is ``p`` for symbol 0, else ``roundto_dtype(representatives[symbol])``.

One program per ``BLOCK`` elements: the pass is elementwise, reading ``x`` and ``base`` once
and writing the symbols (one byte each), the reconstruction and a per-program flag for
non-finite reconstructions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_device, check_pair
from lctriton.kernels.encode import is_nonfinite, round_bf16, to_dtype
from lctriton.kernels.histogram import NUM_FINE_KEYS, fine_keys, to_f32, widen_bf16

__all__ = ["lq_symbols", "lq_reconstruct"]

#: Elements per program; performance only.
_BLOCK = 1024


@triton.jit
def _predict(b, scale, KIND: tl.constexpr):
    """The base times ``scale``, rounded to the dtype; the base itself where not finite."""
    if KIND == 0:
        p = b * scale
    elif KIND == 1:
        p = b * scale.to(tl.float64)
    elif KIND == 2:
        p = (b.to(tl.float32) * scale).to(tl.float16)
    else:
        p = round_bf16(widen_bf16(b) * scale)
    return tl.where(is_nonfinite(b, KIND), b, p)


@triton.jit
def _lq_symbols_kernel(
    x_ptr,  # *f32|f64|f16|bf16 [n]: the tensor
    base_ptr,  # same type [n]: its base (unused without HAS_BASE)
    lut_ptr,  # *uint8 [8192]: symbol of each fine key (all >= 1)
    rep_ptr,  # *f32 [nsym]: value of each symbol
    sym_ptr,  # *uint8 [n]: out, symbols
    recon_ptr,  # same type as x [n]: out, reconstruction
    nonfinite_ptr,  # *int8 [programs]: out, 1 when the block's reconstruction has inf or NaN
    n,
    nsym,
    scale_ptr,  # *f32 [1]: factor applied to the base
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    sym = tl.load(lut_ptr + fine_keys(to_f32(x, KIND)), mask=mask, other=0).to(tl.int32)
    rep = tl.load(rep_ptr + tl.minimum(sym, nsym - 1), mask=mask, other=0.0)
    r = to_dtype(rep, KIND)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
        p = _predict(b, tl.load(scale_ptr), KIND)
        same = tl.load(lut_ptr + fine_keys(to_f32(p, KIND)), mask=mask, other=0).to(tl.int32) == sym
        sym = tl.where(same, 0, sym)
        r = tl.where(same, p, r)
    tl.store(sym_ptr + offs, sym.to(tl.uint8), mask=mask)
    tl.store(recon_ptr + offs, r, mask=mask)
    bad = (is_nonfinite(r, KIND) & mask).to(tl.int32)
    tl.store(nonfinite_ptr + pid, tl.max(bad, axis=0).to(tl.int8))


@triton.jit
def _lq_reconstruct_kernel(
    sym_ptr,  # *uint8 [n]: symbols
    rep_ptr,  # *f32 [nsym]: value of each symbol
    base_ptr,  # same type as out [n]: the base (unused without HAS_BASE)
    out_ptr,  # out [n]
    n,
    nsym,
    scale_ptr,  # *f32 [1]: factor applied to the base
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sym = tl.load(sym_ptr + offs, mask=mask, other=0).to(tl.int32)
    r = to_dtype(tl.load(rep_ptr + tl.minimum(sym, nsym - 1), mask=mask, other=0.0), KIND)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
        r = tl.where(sym == 0, _predict(b, tl.load(scale_ptr), KIND), r)
    tl.store(out_ptr + offs, r, mask=mask)


def _scale(scale: float, device: torch.device) -> torch.Tensor:
    """The scale as a one-element float32 tensor: a float argument would be specialized or
    passed at another width depending on the Triton version and its value."""
    return torch.tensor([scale], dtype=torch.float32, device=device)


def lq_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    scale: float,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The lq/1 pass on the GPU (or in the interpreter); see ``reference.lq_symbols``.

    Returns:
        ``(symbols, reconstruction, nonfinite)`` on ``x``'s device.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If sizes, devices or the table are wrong.
    """
    flat, b = check_pair(x, base)
    if key_to_symbol.numel() != NUM_FINE_KEYS:
        raise ValueError(f"key_to_symbol must have {NUM_FINE_KEYS} entries, got {key_to_symbol.numel()}")
    dev = x.device
    lut = key_to_symbol.to(device=dev, dtype=torch.uint8).contiguous()
    if not bool(lut.all()):
        raise ValueError("key_to_symbol must map every fine key to a symbol of 1 or more")
    reps = representatives.to(device=dev, dtype=torch.float32).contiguous()
    n = flat.numel()
    symbols = torch.empty(n, dtype=torch.uint8, device=dev)
    recon = torch.empty(n, dtype=x.dtype, device=dev)
    if n == 0:
        return symbols, recon, False
    programs = triton.cdiv(n, _BLOCK)
    nonfinite = torch.zeros(programs, dtype=torch.int8, device=dev)
    _lq_symbols_kernel[(programs,)](
        flat, flat if b is None else b, lut, reps, symbols, recon, nonfinite, n, reps.numel(), _scale(scale, dev),
        HAS_BASE=b is not None, KIND=DTYPE_KIND[x.dtype], BLOCK=_BLOCK, enable_fp_fusion=False,
    )
    return symbols, recon, bool(nonfinite.any())


def lq_reconstruct(
    symbols: torch.Tensor,
    representatives: torch.Tensor,
    base: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """lq/1 decode on the symbols' device (see ``reference.lq_reconstruct``).

    Raises:
        TypeError: If ``dtype`` is not a lossy dtype.
        ValueError: If sizes or devices are wrong.
    """
    if dtype not in DTYPE_KIND:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    check_device("symbols", symbols)
    sym = symbols.contiguous().reshape(-1)
    dev = sym.device
    n = sym.numel()
    out = torch.empty(n, dtype=dtype, device=dev)
    if n == 0:
        return out
    b = None if base is None else base.to(dev).contiguous().reshape(-1)
    if b is not None and b.numel() != n:
        raise ValueError(f"base has {b.numel()} elements, the symbols {n}")
    reps = representatives.to(device=dev, dtype=torch.float32).contiguous()
    _lq_reconstruct_kernel[(triton.cdiv(n, _BLOCK),)](
        sym, reps, out if b is None else b, out, n, reps.numel(), _scale(scale, dev),
        HAS_BASE=b is not None, KIND=DTYPE_KIND[dtype], BLOCK=_BLOCK, enable_fp_fusion=False,
    )
    return out
