"""Decoding of ``lc/1`` streams in one fused pass: Huffman decode, dequantize, add the base.

Format (bit-exact twin: :func:`lctriton.kernels.reference.lc_decode`): chunk ``k`` of a
stream starts at word ``sum(ceil(chunk_bits[j] / 64) for j < k)``; its codes are canonical
Huffman codes, most significant bit first, of at most 12 bits; each decoded symbol gives the
element ``base`` (symbol 0) or ``round_to_dtype(base + representatives[symbol])``, exactly as
the encoder reconstructs it. A fill (no code) gives that value for every element.

``_lc_decode_kernel`` runs one lane per chunk: each step peeks 12 bits at every lane's
position, looks the symbol and its length up in a 4096-entry table, and writes one element
per lane. Each lane's end position is returned so that the launcher can check it against
the chunk's recorded bit length: a corrupt stream is reported, never silently decoded.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import DTYPE_KIND, check_device
from lctriton.kernels.encode import reconstruct
from lctriton.kernels.reference import LcStream, chunk_word_offsets

from lctriton.huffman import MAX_CODE_LENGTH, decode_table

__all__ = ["lc_decode", "lc_reconstruct"]

#: Chunks decoded side by side by one program; performance only.
_LANES = 64
_FILL_BLOCK = 1024


@triton.jit
def _lc_decode_kernel(
    words_ptr,  # *uint64 [nwords (+1 zero word)]: the stream
    word_off_ptr,  # *int64 [nchunks]: first word of each chunk
    table_sym_ptr,  # *uint8 [4096]: symbol of each 12-bit window
    table_len_ptr,  # *uint8 [4096]: code length of each 12-bit window (0: no codeword)
    rep_ptr,  # *f32 [nsym]: value of each symbol
    base_ptr,  # same type as out [n]: the base (unused without HAS_BASE)
    out_ptr,  # *f32|f64|f16|bf16 [n]: out, the restored tensor
    end_ptr,  # *int64 [nchunks]: out, bit position where each chunk's decoding ended
    n,
    nchunks,
    CHUNK: tl.constexpr,
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    LANES: tl.constexpr,
):
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = lane < nchunks
    pos = tl.load(word_off_ptr + lane, mask=live, other=0) * 64
    first = lane * CHUNK
    count = tl.where(live, tl.minimum(n - first, CHUNK), 0)
    # A constant bound: triton 3.6's interpreter cannot bound a loop by a runtime value;
    # lanes past their chunk's end are masked.
    for i in range(0, CHUNK):
        act = live & (i < count)
        word = pos >> 6
        shift = (pos & 63).to(tl.uint64)
        hi = tl.load(words_ptr + word, mask=act, other=0)
        lo = tl.load(words_ptr + word + 1, mask=act, other=0)
        window = ((hi << shift) | ((lo >> 1) >> (63 - shift))) >> 52
        sym = tl.load(table_sym_ptr + window.to(tl.int32), mask=act, other=0).to(tl.int32)
        length = tl.load(table_len_ptr + window.to(tl.int32), mask=act, other=0).to(tl.int64)
        offs = first + i
        rep = tl.load(rep_ptr + sym, mask=act, other=0.0)
        b = rep
        if HAS_BASE:
            b = tl.load(base_ptr + offs, mask=act, other=0)
        tl.store(out_ptr + offs, reconstruct(b, rep, sym, HAS_BASE, KIND), mask=act)
        pos += tl.where(act, length, 0)
    tl.store(end_ptr + lane, pos, mask=live)


@triton.jit
def _lc_fill_kernel(
    rep_ptr,  # *f32 [nsym]: value of each symbol
    base_ptr,  # same type as out [n]: the base (unused without HAS_BASE)
    out_ptr,  # out [n]
    n,
    FILL: tl.constexpr,  # the symbol of every element
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sym = tl.zeros((BLOCK,), dtype=tl.int32) + FILL
    rep = tl.load(rep_ptr + sym, mask=mask, other=0.0)
    b = rep
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, reconstruct(b, rep, sym, HAS_BASE, KIND), mask=mask)


def _decode_one(item: LcStream, chunk: int, device: torch.device) -> torch.Tensor:
    if item.dtype not in DTYPE_KIND:
        raise TypeError(f"item dtype must be float32, float16, bfloat16 or float64, got {item.dtype}")
    n = item.numel
    out = torch.empty(n, dtype=item.dtype, device=device)
    if n == 0:
        return out
    has_base = item.base is not None
    base = item.base.to(device).contiguous().reshape(-1) if has_base else out
    if has_base and base.numel() != n:
        raise ValueError(f"base has {base.numel()} elements, the stream {n}")
    reps = item.representatives.to(device=device, dtype=torch.float32).contiguous()
    kind = DTYPE_KIND[item.dtype]
    lengths = np.asarray(item.code_lengths, dtype=np.uint8)
    if not lengths.any():
        grid = (triton.cdiv(n, _FILL_BLOCK),)
        _lc_fill_kernel[grid](reps, base, out, n, FILL=int(item.fill_symbol), HAS_BASE=has_base, KIND=kind,
                              BLOCK=_FILL_BLOCK, enable_fp_fusion=False)
        return out
    bits = item.chunk_bits.detach().cpu().numpy().astype(np.int64)
    nchunks = bits.size
    offsets = chunk_word_offsets(bits)
    # One zero word after the stream: a lane peeking at its chunk's last word reads it. The
    # stream goes straight into its place on the device: no host-side copy of it.
    stream = item.stream.reshape(-1)
    words = torch.empty(stream.numel() + 1, dtype=torch.int64, device=device)
    words[:-1].copy_(stream)
    words[-1] = 0
    words = words.view(torch.uint64)
    table_sym, table_len = decode_table(lengths, MAX_CODE_LENGTH)
    ends = torch.empty(nchunks, dtype=torch.int64, device=device)
    _lc_decode_kernel[(triton.cdiv(nchunks, _LANES),)](
        words, torch.from_numpy(offsets).to(device), torch.from_numpy(table_sym).to(device),
        torch.from_numpy(table_len).to(device), reps, base, out, ends, n, nchunks,
        CHUNK=chunk, HAS_BASE=has_base, KIND=kind, LANES=_LANES, enable_fp_fusion=False,
    )
    expected = (offsets * 64 + bits)
    if not np.array_equal(ends.cpu().numpy(), expected):
        raise ValueError("a chunk's codes do not end at its recorded bit length")
    return out


def lc_decode(items: list[LcStream], chunk_symbols: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Decode many ``lc/1`` streams on the GPU (or in the interpreter).

    Args:
        items: The coded tensors (streams may live on the CPU: only they are copied over).
        chunk_symbols: Symbols per chunk.
        device: Where to decode; by default each item's base device (CPU without one).

    Returns:
        One flat restored tensor per item (exceptions not yet applied).

    Raises:
        ValueError: If a stream does not match its chunk table, or the device cannot run kernels.
    """
    from lctriton.kernels.reference import check_chunk_symbols

    chunk = check_chunk_symbols(chunk_symbols)
    out = []
    for item in items:
        dev = torch.device(device) if device is not None else (item.base.device if item.base is not None else torch.device("cpu"))
        probe = torch.empty(0, device=dev)
        check_device("the decode device", probe)
        out.append(_decode_one(item, chunk, dev))
    return out


@triton.jit
def _lc_reconstruct_kernel(
    sym_ptr,  # *uint8 [n]: symbols
    rep_ptr,  # *f32 [nsym]: value of each symbol
    base_ptr,  # same type as out [n]: the base (unused without HAS_BASE)
    out_ptr,  # out [n]
    n,
    nsym,
    HAS_BASE: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sym = tl.load(sym_ptr + offs, mask=mask, other=0).to(tl.int32)
    # A symbol past the table (a corrupt stream) reads the last entry, as numpy's clip does.
    rep = tl.load(rep_ptr + tl.minimum(sym, nsym - 1), mask=mask, other=0.0)
    b = rep
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, reconstruct(b, rep, sym, HAS_BASE, KIND), mask=mask)


def lc_reconstruct(
    symbols: torch.Tensor, representatives: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Symbols to values on the symbols' device (see ``reference.lc_reconstruct``).

    Returns:
        The flat reconstruction in ``dtype``.

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
    has_base = base is not None
    b = base.to(dev).contiguous().reshape(-1) if has_base else out
    if has_base and b.numel() != n:
        raise ValueError(f"base has {b.numel()} elements, the symbols {n}")
    reps = representatives.to(device=dev, dtype=torch.float32).contiguous()
    _lc_reconstruct_kernel[(triton.cdiv(n, _FILL_BLOCK),)](
        sym, reps, b, out, n, reps.numel(), HAS_BASE=has_base, KIND=DTYPE_KIND[dtype], BLOCK=_FILL_BLOCK,
        enable_fp_fusion=False,
    )
    return out
