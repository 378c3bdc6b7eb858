"""Pass 2 of the ``lc/1`` codec: symbols, reconstruction and the packed Huffman stream.

Format (bit-exact twin: :func:`lctriton.kernels.reference.lc_encode`): each element's symbol
is ``key_to_symbol[bits(d) >> 19]``; its reconstruction is the base itself for symbol 0 and
``round_to_dtype(base + representatives[symbol])`` otherwise (float32 addition, float64 for
float64; bfloat16 rounded to nearest even on the float32 bits). Symbols are cut into chunks of
``chunk_symbols``; each chunk's canonical Huffman codes are written most significant bit first
into its own run of 64-bit words, starting on a fresh word; ``chunk_bits`` records each
chunk's bit length.

Two kernels, one program per chunk:

* ``_lc_symbols_kernel`` reads ``x`` and ``base`` once, writes the symbols (one byte each),
  the reconstruction, each chunk's bit length and whether it holds a non-finite value;
* the launcher turns bit lengths into each chunk's first word (a prefix sum over chunks);
* ``_lc_pack_kernel`` reads the symbols back and ORs each code into its word(s). A chunk's
  words belong to its program alone, and OR is order-free, so the stream is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_pair
from lctriton.kernels.histogram import NUM_FINE_KEYS, delta_f32, fine_keys, widen_bf16

from lctriton.huffman import canonical_codes

__all__ = ["lc_encode", "lc_symbols", "reconstruct", "is_nonfinite", "round_bf16", "to_dtype"]

#: Elements a program handles per step of its loop over the chunk; performance only.
_STEP = 1024


@triton.jit
def round_bf16(v):
    """float32 -> bfloat16, round to nearest, ties to even, on the bits (finite and inf)."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_dtype(v, KIND: tl.constexpr):
    """float32 values as the tensor's dtype (nearest, ties to even)."""
    if KIND == 0:
        r = v
    elif KIND == 1:
        r = v.to(tl.float64)
    elif KIND == 2:
        r = v.to(tl.float16)
    else:
        r = round_bf16(v)
    return r


@triton.jit
def reconstruct(b, rep, sym, HAS_BASE: tl.constexpr, KIND: tl.constexpr):
    """Step 4: the base for symbol 0, else the base plus the symbol's value, rounded."""
    if HAS_BASE:
        if KIND == 0:
            r = b + rep
        elif KIND == 1:
            r = b + rep.to(tl.float64)
        elif KIND == 2:
            r = (b.to(tl.float32) + rep).to(tl.float16)
        else:
            r = round_bf16(widen_bf16(b) + rep)
        r = tl.where(sym == 0, b, r)
    else:
        r = to_dtype(tl.where(sym == 0, 0.0, rep), KIND)  # the base is +0.0
    return r


@triton.jit
def is_nonfinite(r, KIND: tl.constexpr):
    """Exponent field all ones, from the bits (no libdevice)."""
    if KIND == 0:
        bad = (r.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000
    elif KIND == 1:
        bad = (r.to(tl.uint64, bitcast=True) & 0x7FF0000000000000) == 0x7FF0000000000000
    elif KIND == 2:
        bad = (r.to(tl.uint16, bitcast=True) & 0x7C00) == 0x7C00
    else:
        bad = (r.to(tl.uint16, bitcast=True) & 0x7F80) == 0x7F80
    return bad


@triton.jit
def _lc_symbols_kernel(
    x_ptr,  # *f32|f64|f16|bf16 [n]: the tensor
    base_ptr,  # same type [n]: its base (unused without HAS_BASE)
    lut_ptr,  # *uint8 [8192]: symbol of each fine key
    rep_ptr,  # *f32 [nsym]: value of each symbol
    len_ptr,  # *uint8 [nsym]: code length of each symbol
    sym_ptr,  # *uint8 [n]: out, symbols
    recon_ptr,  # same type as x [n]: out, reconstruction
    chunk_bits_ptr,  # *int64 [nchunks]: out, bits of each chunk
    nonfinite_ptr,  # *int8 [nchunks]: out, 1 when the chunk's reconstruction has inf or NaN
    n,  # number of elements
    CHUNK: tl.constexpr,  # symbols per chunk: part of the format
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    STEP: tl.constexpr,  # elements per loop step; performance only, divides CHUNK
):
    chunk = tl.program_id(0).to(tl.int64)
    bits = tl.zeros((STEP,), dtype=tl.int64)
    bad = tl.zeros((STEP,), dtype=tl.int32)
    for j in range(0, CHUNK, STEP):
        offs = chunk * CHUNK + j + tl.arange(0, STEP)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0)
        b = x
        if HAS_BASE:
            b = tl.load(base_ptr + offs, mask=mask, other=0)
        d = delta_f32(x, b, HAS_BASE, KIND)
        key = fine_keys(d)
        sym = tl.load(lut_ptr + key, mask=mask, other=0).to(tl.int32)
        rep = tl.load(rep_ptr + sym, mask=mask, other=0.0)
        r = reconstruct(b, rep, sym, HAS_BASE, KIND)
        tl.store(sym_ptr + offs, sym.to(tl.uint8), mask=mask)
        tl.store(recon_ptr + offs, r, mask=mask)
        bits += tl.load(len_ptr + sym, mask=mask, other=0).to(tl.int64)
        bad = bad | (is_nonfinite(r, KIND) & mask).to(tl.int32)
    tl.store(chunk_bits_ptr + chunk, tl.sum(bits, axis=0))
    tl.store(nonfinite_ptr + chunk, tl.max(bad, axis=0).to(tl.int8))


@triton.jit
def _lc_pack_kernel(
    sym_ptr,  # *uint8 [n]: symbols
    len_ptr,  # *uint8 [nsym]: code length of each symbol
    code_ptr,  # *uint64 [nsym]: canonical code of each symbol
    word_off_ptr,  # *int64 [nchunks]: first stream word of each chunk
    words_ptr,  # *uint64 [nwords]: out, the stream (zeroed by the launcher)
    n,
    CHUNK: tl.constexpr,
    STEP: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    bitpos = tl.load(word_off_ptr + chunk) * 64
    for j in range(0, CHUNK, STEP):
        offs = chunk * CHUNK + j + tl.arange(0, STEP)
        mask = offs < n
        sym = tl.load(sym_ptr + offs, mask=mask, other=0).to(tl.int32)
        length = tl.load(len_ptr + sym, mask=mask, other=0).to(tl.int64)
        code = tl.load(code_ptr + sym, mask=mask, other=0)
        pos = bitpos + tl.cumsum(length, axis=0) - length
        word = pos >> 6
        end = ((pos & 63) + length).to(tl.uint64)
        straddle = end > 64
        live = mask & (length > 0)
        # Shift amounts are kept below 64 in every lane (the others' results are unused).
        left = tl.where(straddle | (length == 0), 0, 64 - end)
        right = tl.where(straddle, end - 64, 0)
        # Relaxed: the ORs commute and nothing reads the words before the kernel ends, so the
        # default acquire-release ordering would only cost fences.
        tl.atomic_or(words_ptr + word, (code << left) >> right, mask=live, sem="relaxed")
        spill = code << tl.where(straddle, 128 - end, 0)
        tl.atomic_or(words_ptr + word + 1, spill, mask=live & straddle, sem="relaxed")
        bitpos += tl.sum(length, axis=0)


def lc_encode(
    x: torch.Tensor,
    base: torch.Tensor | None,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
    code_lengths: torch.Tensor,
    chunk_symbols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Pass 2 on the GPU (or in the interpreter); see ``reference.lc_encode``.

    Returns:
        ``(stream, chunk_bits, reconstruction, nonfinite)``: int64 tensor of stream words,
        int64 bit length per chunk, the flat reconstruction (all on ``x``'s device) and
        whether the reconstruction holds a non-finite value.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If sizes, devices or ``chunk_symbols`` are wrong.
    """
    from lctriton.kernels.reference import check_chunk_symbols

    flat, b = check_pair(x, base)
    if b is None:
        b = flat  # any pointer: the kernel does not read it without a base
    chunk = check_chunk_symbols(chunk_symbols)
    if key_to_symbol.numel() != NUM_FINE_KEYS:
        raise ValueError(f"key_to_symbol must have {NUM_FINE_KEYS} entries, got {key_to_symbol.numel()}")
    if code_lengths.numel() != representatives.numel():
        raise ValueError(
            f"code_lengths has {code_lengths.numel()} entries but representatives has {representatives.numel()}"
        )
    dev = x.device
    lut = key_to_symbol.to(device=dev, dtype=torch.uint8).contiguous()
    reps = representatives.to(device=dev, dtype=torch.float32).contiguous()
    lengths_np = code_lengths.detach().cpu().numpy().astype(np.uint8)
    lengths = torch.from_numpy(lengths_np).to(dev)
    n = flat.numel()
    nchunks = triton.cdiv(n, chunk)
    recon = torch.empty(n, dtype=x.dtype, device=dev)
    chunk_bits = torch.zeros(nchunks, dtype=torch.int64, device=dev)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), chunk_bits, recon, False
    symbols = torch.empty(n, dtype=torch.uint8, device=dev)
    nonfinite = torch.zeros(nchunks, dtype=torch.int8, device=dev)
    step = min(_STEP, chunk)
    _lc_symbols_kernel[(nchunks,)](
        flat, b, lut, reps, lengths, symbols, recon, chunk_bits, nonfinite, n,
        CHUNK=chunk, HAS_BASE=base is not None, KIND=DTYPE_KIND[x.dtype], STEP=step,
        enable_fp_fusion=False,
    )
    any_nonfinite = bool(nonfinite.any())
    if not lengths_np.any():  # a fill: no stream
        return torch.zeros(0, dtype=torch.int64, device=dev), chunk_bits, recon, any_nonfinite
    chunk_words = (chunk_bits + 63) // 64
    word_offsets = torch.cumsum(chunk_words, 0) - chunk_words
    nwords = int(chunk_words.sum())
    words = torch.zeros(nwords, dtype=torch.uint64, device=dev)
    codes = torch.from_numpy(canonical_codes(lengths_np).astype(np.uint64)).to(dev)
    _lc_pack_kernel[(nchunks,)](symbols, lengths, codes, word_offsets, words, n, CHUNK=chunk, STEP=step)
    return words.view(torch.int64), chunk_bits, recon, any_nonfinite


def lc_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pass 2 without the Huffman stage (see ``reference.lc_symbols``): the symbols kernel
    alone, for codecs that entropy-code the symbols with rANS.

    Returns:
        ``(symbols, reconstruction, nonfinite)``: flat uint8 symbols and reconstruction on
        ``x``'s device, and whether the reconstruction holds a non-finite value.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If sizes or devices are wrong.
    """
    flat, b = check_pair(x, base)
    if b is None:
        b = flat  # any pointer: the kernel does not read it without a base
    if key_to_symbol.numel() != NUM_FINE_KEYS:
        raise ValueError(f"key_to_symbol must have {NUM_FINE_KEYS} entries, got {key_to_symbol.numel()}")
    dev = x.device
    lut = key_to_symbol.to(device=dev, dtype=torch.uint8).contiguous()
    reps = representatives.to(device=dev, dtype=torch.float32).contiguous()
    # No code lengths: the kernel's bit count per chunk is then zero and unused.
    lengths = torch.zeros(reps.numel(), dtype=torch.uint8, device=dev)
    n = flat.numel()
    recon = torch.empty(n, dtype=x.dtype, device=dev)
    symbols = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return symbols, recon, False
    chunk = 4096  # any size: chunks only group the work here
    nchunks = triton.cdiv(n, chunk)
    chunk_bits = torch.empty(nchunks, dtype=torch.int64, device=dev)
    nonfinite = torch.zeros(nchunks, dtype=torch.int8, device=dev)
    _lc_symbols_kernel[(nchunks,)](
        flat, b, lut, reps, lengths, symbols, recon, chunk_bits, nonfinite, n,
        CHUNK=chunk, HAS_BASE=base is not None, KIND=DTYPE_KIND[x.dtype], STEP=_STEP,
        enable_fp_fusion=False,
    )
    return symbols, recon, bool(nonfinite.any())
