"""Pure-torch (and numpy) reference codec: the specification of every byte lctriton writes.

Every Triton launcher in ``lctriton.kernels`` has a twin here with the same name and
signature, and the two produce identical bytes. This module imports no triton: it is the
CPU codec and runs anywhere torch runs.

The lossy codec "lc/1" (closed-loop LC-Checkpoint) for a floating tensor ``x`` and its base
``b`` (the reconstruction the previous checkpoint restores to; zeros when absent):

1. Delta. ``d = x - b`` in float32: float16/bfloat16 operands are widened to float32 first;
   float64 operands are subtracted in float64 and the difference rounded to float32.
2. Keys. Each ``d`` gets the 13-bit fine key ``bits(d) >> 19``: its sign, its 8-bit biased
   exponent field (together the 9-bit bucket key) and the top 4 bits of its mantissa. Every
   non-finite ``d`` takes the fine key ``0x0FF0`` (that of +inf) instead: NaN signs and
   payloads come out of arithmetic differently on different processors.
   :func:`lc_histogram` counts the elements of each fine key (integer counts: identical on
   every backend whatever the order of summation).
3. Buckets (host, from the histogram alone; see ``lctriton.codecs``). Bucket keys are ranked
   by exponent (descending), then sign (positive first); the top ``2**bits - 1`` of those
   with a finite, nonzero exponent field (not zero, subnormal, infinite or NaN), at or above
   the encoder's floor exponent (``delta_floor``; 1 without one), become symbols 1, 2, ...;
   every other element gets symbol 0, which decodes to zero. Each
   symbol's representative is the mean of its bucket with every element taken at the middle
   of its fine key's interval, computed in float64 from the counts and rounded to float32.
4. Reconstruction. ``r = b`` (bit for bit) where the symbol is 0, else
   ``r = round_to_dtype(b + rep[symbol])`` with the addition in float32 (float64 for float64
   tensors); without a base, ``b`` is +0.0. Rounding to float16 and bfloat16 is to nearest,
   ties to even (for bfloat16: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16`` on the float32 bits
   ``u``). Symbol 0 is taken from the base rather than added because NaN arithmetic differs
   between processors; a non-finite base always gives a non-finite delta, hence symbol 0,
   so the reconstruction never computes with a NaN. The encoder returns ``r``: it is the
   base of the next delta, so quantization error does not accumulate along a chain.
5. Exceptions. Elements whose value, float32 delta or reconstruction is not finite, and whose
   reconstruction differs from the value in bits, are stored exactly: their indices (int64,
   strictly increasing) and raw bits. Symbol 0's representative is -0.0, so a dropped or
   unchanged element restores to its base bit for bit (signed zeros included).
6. Entropy coding. Symbols are cut into chunks of ``chunk_symbols`` symbols (the last one
   shorter). Each chunk's symbols are coded with the canonical Huffman code of
   ``lctriton.huffman`` (lengths at most 12 bits), most significant bit first, into its own
   run of little-endian 64-bit words, bits taken from the most significant end of each word
   and the last word zero-padded. Chunk ``k``'s bit length is recorded as one uint32; its
   words start at word ``sum(ceil(bits_j / 64) for j < k)`` of the stream. Word-aligned
   chunks decode independently, and on the GPU each chunk's words belong to one program.
   A tensor whose symbols are all equal ("fill") has no stream.

The fingerprint of a tensor (:func:`fingerprint`) is a 64-bit integer hash of its bits,
computed with integer sums only (bit-exact on every backend); delta records store the
fingerprint of their base so that decoding against a wrong base is detected.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lctriton.huffman import MAX_CODE_LENGTH, canonical_codes, decode_table

__all__ = [
    "NUM_KEYS",
    "NUM_FINE_KEYS",
    "FINE_SHIFT",
    "NONFINITE_EXPONENT",
    "LOSSY_DTYPES",
    "PEEK_BITS",
    "MAX_SYMBOLS_PER_STEP",
    "fingerprint",
    "lc_histogram",
    "lc_encode",
    "lc_reconstruct",
    "lc_exceptions",
    "lc_decode",
    "lc_symbols",
    "lq_symbols",
    "lq_reconstruct",
    "rans_encode",
    "rans_encode_streams",
    "rans_streams_input",
    "rans_decode",
    "RansStream",
    "CONTEXT_OCTAVES",
    "NUM_CONTEXTS",
    "moment_contexts",
    "NUM_BINADE_CONTEXTS",
    "MAX_BINADE_OFFSET",
    "binade_contexts",
    "context_counts",
    "context_histogram",
    "group_by_context",
    "ungroup_by_context",
    "LcStream",
    "BLOCK",
    "check_chunk_symbols",
    "chunk_word_offsets",
    "AQ_BITS",
    "AQ_NAN_BITS",
    "check_aq_args",
    "aq_sizes",
    "rounding_noise",
    "quantize_groups",
    "dequantize_groups",
]

#: Number of (sign, exponent-field) keys of a float32 delta.
NUM_KEYS = 512
#: Fine keys: the key followed by the top 4 mantissa bits, ``bits(d) >> FINE_SHIFT``.
FINE_SHIFT = 19
NUM_FINE_KEYS = 1 << (32 - FINE_SHIFT)
#: Fine keys per key.
FINE_PER_KEY = NUM_FINE_KEYS // NUM_KEYS
#: Exponent field of non-finite float32 values; such keys never become symbols.
NONFINITE_EXPONENT = 255
#: Floating dtypes the lossy codec accepts.
LOSSY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Bits the CPU decoder looks at per step; at least the longest code.
PEEK_BITS = MAX_CODE_LENGTH
#: Most symbols the CPU decoder emits per lane and step.
MAX_SYMBOLS_PER_STEP = 12

_WORD_BITS = 64
_FINGERPRINT_ROW = 1024
_MASK64 = (1 << 64) - 1
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- fingerprint


def _mix64(value: int) -> int:
    """SplitMix64 finalizer: spreads every input bit over the output."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _weighted_sum(values: np.ndarray) -> int:
    """sum((i + 1) * values[i]) modulo 2**64, for a small int64 vector."""
    weights = np.arange(1, values.size + 1, dtype=np.uint64)
    return int((values.astype(np.uint64) * weights).sum(dtype=np.uint64))


def _fingerprint_sums_numpy(words: np.ndarray) -> tuple[int, int, int, int, int]:
    n = words.size
    full = n - n % _FINGERPRINT_ROW
    row_mix = col_mix = tail_mix = 0
    rows = np.zeros(0, dtype=np.int64)
    if full:
        grid = words[:full].reshape(-1, _FINGERPRINT_ROW)
        rows = grid.sum(axis=1, dtype=np.int64)
        row_mix = _weighted_sum(rows)
        col_mix = _weighted_sum(grid.sum(axis=0, dtype=np.int64))
    tail = words[full:].astype(np.int64)
    if tail.size:
        tail_mix = _weighted_sum(tail)
    # int64 sums wrap modulo 2**64 in numpy, like the integer adds of every backend.
    total = int(rows.astype(np.uint64).sum(dtype=np.uint64)) + int(tail.astype(np.uint64).sum(dtype=np.uint64))
    return total & _MASK64, row_mix, col_mix, tail_mix, n


def _fingerprint_sums_torch(words: torch.Tensor) -> tuple[int, int, int, int, int]:
    n = words.numel()
    full = n - n % _FINGERPRINT_ROW
    row_mix = col_mix = tail_mix = 0
    total = 0
    if full:
        grid = words[:full].view(-1, _FINGERPRINT_ROW)
        rows = grid.sum(dim=1, dtype=torch.int64)
        row_mix = _weighted_sum(rows.cpu().numpy())
        col_mix = _weighted_sum(grid.sum(dim=0, dtype=torch.int64).cpu().numpy())
        total = int(rows.sum())
    if n > full:
        tail = words[full:].to(torch.int64)
        tail_mix = _weighted_sum(tail.cpu().numpy())
        total += int(tail.sum())
    return total & _MASK64, row_mix, col_mix, tail_mix, n


def fingerprint(tensor: torch.Tensor) -> int:
    """64-bit hash of a tensor's dtype, element count and bits (not its shape).

    The elements are read as signed integers of their own width (16-byte complex elements
    as two int64 each). With ``R = 1024`` and those words laid out as rows of ``R`` (the
    incomplete last row apart), the hash mixes: the sum of all words, the sum of row sums
    weighted by row number, the sum of column sums weighted by column number, the tail
    weighted by position, the word count and the dtype name. The shape is not hashed.
    Integer sums make it independent of reduction order; any change of a single element
    changes the plain sum.

    Args:
        tensor: Any tensor; it is read, never modified.

    Returns:
        The fingerprint as an unsigned 64-bit Python int.
    """
    words = fingerprint_words(tensor)
    if words.device.type == "cpu":
        sums = _fingerprint_sums_numpy(words.numpy())
    else:  # integer sums on the device: exact, so equal to the numpy ones
        sums = _fingerprint_sums_torch(words)
    return fingerprint_hash(*sums, tensor.dtype)


def fingerprint_words(tensor: torch.Tensor) -> torch.Tensor:
    """The flat signed-integer words :func:`fingerprint` sums (a view where the tensor is
    contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(_INT_VIEW[min(flat.element_size(), 8)])


def fingerprint_hash(total: int, row_mix: int, col_mix: int, tail_mix: int, n: int, dtype: torch.dtype) -> int:
    """:func:`fingerprint` from the sums of its words (each modulo 2**64), their count and the
    tensor's dtype."""
    dtype_code = int.from_bytes(str(dtype).encode()[-8:].rjust(8, b"\0"), "little")
    h = _mix64(total)
    for part in (row_mix, col_mix, tail_mix, n, dtype_code):
        h = _mix64(h ^ part)
    return h


# --------------------------------------------------------------------------- blocks

#: The CPU codec works on blocks of this many elements so that its temporaries stay in
#: cache and are recycled by the allocator; a multiple of every allowed chunk size.
BLOCK = 1 << 18


def _np(tensor: torch.Tensor) -> np.ndarray:
    """Flat numpy view of a contiguous CPU tensor; bfloat16 is viewed as uint16."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _to_f32(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Values of ``dtype`` as float32: exact for 16-bit types, rounded for float64."""
    if dtype == torch.bfloat16:
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values.astype(np.float32)


def _delta_block(xb: np.ndarray, bb: np.ndarray | None, dtype: torch.dtype) -> np.ndarray:
    """Step 1 on one block: the float32 delta."""
    if bb is None:
        return _to_f32(xb, dtype)
    if dtype == torch.float32:
        return xb - bb
    if dtype == torch.float64:
        return (xb - bb).astype(np.float32)
    return _to_f32(xb, dtype) - _to_f32(bb, dtype)


#: The fine key of every non-finite delta.
NONFINITE_FINE_KEY = NONFINITE_EXPONENT << 4


def _fine_keys(d: np.ndarray) -> np.ndarray:
    """Step 2: the 13-bit fine key ``bits(d) >> 19`` (sign, exponent, top 4 mantissa bits)."""
    u = d.view(np.uint32)
    keys = (u >> np.uint32(FINE_SHIFT)).astype(np.uint16)
    nonfinite = (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    if nonfinite.any():
        keys[nonfinite] = NONFINITE_FINE_KEY
    return keys


def _check_lossy(x: torch.Tensor, base: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in LOSSY_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if base is not None:
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"base must be a tensor or None, got {type(base).__name__}")
        if base.shape != x.shape or base.dtype != x.dtype:
            raise ValueError(
                f"base must match x in shape and dtype: x is {tuple(x.shape)} {x.dtype}, "
                f"base is {tuple(base.shape)} {base.dtype}"
            )


def _flat_views(x: torch.Tensor, base: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    xn = _np(x.detach().cpu().contiguous())
    bn = None if base is None else _np(base.detach().cpu().contiguous())
    return xn, bn


# --------------------------------------------------------------------------- pass 1


def lc_histogram(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Pass 1: number of elements per fine key of the delta ``x - base``.

    Args:
        x: Floating tensor (float32, float16, bfloat16 or float64), any shape.
        base: Tensor of the same shape and dtype, or None for an all-zero base.

    Returns:
        int64 tensor of ``NUM_FINE_KEYS`` counts, indexed by ``bits(d) >> 19``.

    Raises:
        TypeError: If ``x`` or ``base`` is not a tensor of a supported dtype.
        ValueError: If ``base`` differs from ``x`` in shape or dtype.
    """
    _check_lossy(x, base)
    xn, bn = _flat_views(x, base)
    counts = np.zeros(NUM_FINE_KEYS, dtype=np.int64)
    with np.errstate(all="ignore"):  # inf - inf and float64 overflow are expected: exceptions
        for s in range(0, xn.size, BLOCK):
            bb = None if bn is None else bn[s : s + BLOCK]
            keys = _fine_keys(_delta_block(xn[s : s + BLOCK], bb, x.dtype))
            counts += np.bincount(keys, minlength=NUM_FINE_KEYS)
    return torch.from_numpy(counts)


# --------------------------------------------------------------------------- pass 2


def _round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits, round to nearest, ties to even (finite inputs and inf)."""
    u = values.view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)


def _has_nan(values: np.ndarray, dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:  # numpy sees the bits
        return bool(((values & np.uint16(0x7FFF)) > np.uint16(0x7F80)).any())
    return bool(np.isnan(values).any())


def _reconstruct_block(
    sym: np.ndarray, reps: np.ndarray, bb: np.ndarray | None, dtype: torch.dtype, out: np.ndarray
) -> None:
    """Step 4 on one block, written into ``out`` (a view of the tensor's storage)."""
    values = np.take(reps, sym, mode="clip")
    if bb is None:  # the base is +0.0: adding it turns symbol 0's -0.0 into +0.0
        values = values + np.float32(0.0)
    if dtype in (torch.float32, torch.float64):
        if bb is None:
            out[:] = values
        else:
            np.add(bb, values, out=out)
    elif dtype == torch.float16:
        if bb is not None:
            values = np.add(bb, values, dtype=np.float32)
        out[:] = values
    else:
        if bb is not None:
            values = _to_f32(bb, dtype) + values
        out[:] = _round_to_bf16(values)
    # b + (-0.0) is b except for NaNs, which processors quiet or replace: symbol 0 copies
    # the base. Only a base with NaNs needs it, so the check saves a pass otherwise.
    if bb is not None and _has_nan(bb, dtype):
        np.copyto(out, bb, where=sym == 0)


def _as_numpy(values: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().contiguous().reshape(-1).numpy()
    return np.asarray(values).astype(dtype, copy=False)


def lc_reconstruct(
    symbols: torch.Tensor | np.ndarray,
    representatives: torch.Tensor | np.ndarray,
    base: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Step 4: ``round_to_dtype(base + representatives[symbols])``, flat, on CPU.

    Args:
        symbols: uint8 symbols, flat.
        representatives: float32 value of each symbol (symbol 0 is -0.0).
        base: Base of the tensor's dtype, or None for zeros (+0.0).
        dtype: The tensor's dtype.
    """
    symbols = _as_numpy(symbols, np.uint8)
    representatives = _as_numpy(representatives, np.float32)
    out = torch.empty(symbols.size, dtype=dtype)
    o = _np(out)
    bn = None if base is None else _np(base.detach().cpu().contiguous())
    with np.errstate(all="ignore"):  # overflow to inf is expected: such elements are exceptions
        for s in range(0, symbols.size, BLOCK):
            sl = slice(s, s + BLOCK)
            _reconstruct_block(symbols[sl], representatives, None if bn is None else bn[sl], dtype, o[sl])
    return out


# --------------------------------------------------------------------------- lq/1

def _round_to_dtype(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 (float64 for float64 tensors) values as the tensor dtype's storage."""
    if dtype == torch.bfloat16:
        return _round_to_bf16(values.astype(np.float32, copy=False))
    if dtype == torch.float16:
        return values.astype(np.float16)
    if dtype == torch.float64:
        return values.astype(np.float64)
    return values.astype(np.float32, copy=False)


def _nonfinite_bits(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:  # numpy sees the bits
        return (values & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return ~np.isfinite(values)


def _prediction_block(bb: np.ndarray, scale: float, dtype: torch.dtype) -> np.ndarray:
    """The lq/1 prediction: ``round_to_dtype(base * scale)``, the base itself where not finite."""
    if dtype == torch.float64:
        p = bb * np.float64(np.float32(scale))
    else:
        p = _round_to_dtype(_to_f32(bb, dtype) * np.float32(scale), dtype)
    bad = _nonfinite_bits(bb, dtype)
    if bad.any():  # NaN payloads out of arithmetic differ between processors: copy instead
        p = np.where(bad, bb, p)
    return p


def _lq_block(
    xb: np.ndarray, bb: np.ndarray | None, scale: float, lut: np.ndarray, reps: np.ndarray,
    dtype: torch.dtype, out: np.ndarray,
) -> np.ndarray:
    """Symbols and reconstruction (into ``out``) of one block of lq/1."""
    sym = np.take(lut, _fine_keys(_delta_block(xb, None, dtype)), mode="clip")
    values = _round_to_dtype(np.take(reps, sym, mode="clip"), dtype)
    if bb is None:
        out[:] = values
        return sym
    p = _prediction_block(bb, scale, dtype)
    keep = np.take(lut, _fine_keys(_delta_block(p, None, dtype)), mode="clip") == sym
    sym = np.where(keep, np.uint8(0), sym)
    out[:] = np.where(keep, p, values)
    return sym


def lq_tables(
    x: torch.Tensor, base: torch.Tensor | None, key_to_symbol: torch.Tensor, representatives: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lq_symbols`'s argument checks (:func:`lc_tables`'s, and no fine key may map to
    symbol 0, the prediction's); its tables as numpy arrays (uint8, float32)."""
    lut, reps = lc_tables(x, base, key_to_symbol, representatives)
    if not lut.all():
        raise ValueError("key_to_symbol must map every fine key to a symbol of 1 or more")
    return lut, reps


def lq_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    scale: float,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The "lq/1" pass: log-domain quantization of values, against a scaled base.

    1. Prediction. ``p = round_to_dtype(float32(base) * scale)`` (float64 tensors: ``base *
       float64(scale)``); where the base is not finite, ``p`` is the base itself.
    2. Bins. Each value's fine key (:func:`lc_histogram`'s key of the value itself: sign,
       exponent, top 4 mantissa bits) is mapped by ``key_to_symbol`` to a bin symbol (1 or
       more); bins are intervals of constant relative width, so quantizing to a bin is
       quantizing ``log2 |x|``.
    3. Symbol 0. Where the prediction falls in the same bin as the value, the symbol is 0
       and the element restores to ``p``: a value that moved less than its bin's width
       keeps its prediction. Without a base no symbol is 0.
    4. Reconstruction. ``p`` for symbol 0, else ``round_to_dtype(representatives[symbol])``.

    Args:
        x: Floating tensor.
        base: Tensor of the same shape and dtype, or None.
        scale: Factor applied to the base (a float32 value; 1.0 keeps the base as it is).
        key_to_symbol: uint8 tensor of ``NUM_FINE_KEYS`` entries, each at least 1.
        representatives: float32 value of each symbol (entry 0 unused).

    Returns:
        ``(symbols, reconstruction, nonfinite)`` as :func:`lc_symbols` returns them.

    Raises:
        TypeError: If ``x`` or ``base`` is not a tensor of a supported dtype.
        ValueError: If shapes or table sizes are wrong.
    """
    lut, reps = lq_tables(x, base, key_to_symbol, representatives)
    symbols, add = _collector(x.numel())

    def block(xb: np.ndarray, bb: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        return _lq_block(xb, bb, scale, lut, reps, x.dtype, out)

    reconstruction, nonfinite = _symbol_pass(x, base, block, add)
    return torch.from_numpy(symbols), reconstruction, nonfinite


def lq_reconstruct(
    symbols: torch.Tensor | np.ndarray,
    representatives: torch.Tensor | np.ndarray,
    base: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode side of :func:`lq_symbols`: the prediction for symbol 0, else the symbol's value.

    Returns:
        The flat reconstruction in ``dtype``, on CPU (exceptions not applied).
    """
    symbols = _as_numpy(symbols, np.uint8)
    reps = _as_numpy(representatives, np.float32)
    out = torch.empty(symbols.size, dtype=dtype)
    o = _np(out)
    bn = None if base is None else _np(base.detach().cpu().contiguous())
    with np.errstate(all="ignore"):
        for s in range(0, symbols.size, BLOCK):
            sl = slice(s, s + BLOCK)
            sym = symbols[sl]
            values = _round_to_dtype(np.take(reps, sym, mode="clip"), dtype)
            if bn is None:
                o[sl] = values
            else:
                o[sl] = np.where(sym == 0, _prediction_block(bn[sl], scale, dtype), values)
    return out


def lc_exceptions(
    x: torch.Tensor, base: torch.Tensor | None, reconstruction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: elements stored exactly: where the value, its float32 delta or its
    reconstruction is not finite, and the reconstruction differs from the value in bits.

    Returns:
        ``(indices, values)``: int64 flat indices and the exact values of ``x`` there.
    """
    x = x.detach().cpu().contiguous().reshape(-1)
    r = reconstruction.detach().cpu().reshape(-1)
    xn, bn = _flat_views(x, base)
    with np.errstate(all="ignore"):
        delta = torch.from_numpy(_delta_block(xn, bn, x.dtype))
    width = _INT_VIEW[x.element_size()]
    nonfinite = ~torch.isfinite(x) | ~torch.isfinite(delta) | ~torch.isfinite(r)
    differ = x.view(width) != r.view(width)
    indices = torch.nonzero(nonfinite & differ).reshape(-1)
    return indices, x[indices]


def check_chunk_symbols(chunk_symbols: object) -> int:
    """Validate a chunk size: a power of two from 64 to 65536."""
    if (
        isinstance(chunk_symbols, bool)
        or not isinstance(chunk_symbols, int)
        or not 64 <= chunk_symbols <= 1 << 16
        or chunk_symbols & (chunk_symbols - 1)
    ):
        raise ValueError(f"chunk_symbols must be a power of two from 64 to 65536, got {chunk_symbols!r}")
    return chunk_symbols


def lc_encode(
    x: torch.Tensor,
    base: torch.Tensor | None,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
    code_lengths: torch.Tensor,
    chunk_symbols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Pass 2: symbols, their bit-packed canonical codes, and the reconstruction.

    Args:
        x: The tensor (as in :func:`lc_histogram`).
        base: Its base, or None.
        key_to_symbol: uint8 tensor of ``NUM_FINE_KEYS`` entries, the symbol of each fine
            key (equal across the fine keys of one bucket).
        representatives: float32 tensor, the value of each symbol.
        code_lengths: uint8 tensor, the Huffman code length of each symbol (all zeros for
            a fill: then no stream is produced).
        chunk_symbols: Symbols per chunk, a power of two from 64 to 65536.

    Returns:
        ``(stream, chunk_bits, reconstruction, nonfinite)``: the stream as an int64 tensor
        holding the 64-bit words, the bit length of each chunk (int64 tensor), the flat
        reconstruction in ``x``'s dtype, on CPU (exceptions not yet applied), and whether
        any element of the reconstruction is not finite.

    Raises:
        TypeError: If ``x`` or ``base`` is not a tensor of a supported dtype.
        ValueError: If shapes, table sizes or ``chunk_symbols`` are wrong.
    """
    _check_lossy(x, base)
    if key_to_symbol.numel() != NUM_FINE_KEYS:
        raise ValueError(f"key_to_symbol must have {NUM_FINE_KEYS} entries, got {key_to_symbol.numel()}")
    check_chunk_symbols(chunk_symbols)
    lut = key_to_symbol.cpu().numpy().astype(np.uint8)
    reps = representatives.cpu().numpy().astype(np.float32)
    lengths = code_lengths.cpu().numpy().astype(np.uint8)
    if lengths.size != reps.size:
        raise ValueError(f"code_lengths has {lengths.size} entries but representatives has {reps.size}")
    packer = _Packer(lengths, chunk_symbols) if lengths.any() else None
    n = x.numel()
    # Blocks end on chunk boundaries, so the packer codes each block as it comes.
    reconstruction, nonfinite = _symbol_pass(
        x, base, _lc_block(lut, reps, x.dtype), packer.add if packer is not None else lambda sym: None
    )
    if packer is None:
        nchunks = -(-n // chunk_symbols)
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, torch.zeros(nchunks, dtype=torch.int64), reconstruction, nonfinite
    words, chunk_bits = packer.finish()
    return torch.from_numpy(words.view(np.int64)), torch.from_numpy(chunk_bits), reconstruction, nonfinite


def _symbol_pass(
    x: torch.Tensor,
    base: torch.Tensor | None,
    block: Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray],
    on_symbols: Callable[[np.ndarray], None],
) -> tuple[torch.Tensor, bool]:
    """Run ``block(x_block, base_block, out_block) -> symbols`` over ``BLOCK``-sized blocks,
    writing the reconstruction, and hand each block's symbols to ``on_symbols``.

    Returns:
        The flat reconstruction in ``x``'s dtype and whether it holds a non-finite value.
    """
    xn, bn = _flat_views(x, base)
    reconstruction = torch.empty(xn.size, dtype=x.dtype)
    rn = _np(reconstruction)
    nonfinite = False
    with np.errstate(all="ignore"):  # non-finite values and overflow become exceptions
        for s in range(0, xn.size, BLOCK):
            sl = slice(s, s + BLOCK)
            on_symbols(block(xn[sl], None if bn is None else bn[sl], rn[sl]))
            nonfinite = nonfinite or _any_nonfinite(rn[sl], x.dtype)
    return reconstruction, nonfinite


def _lc_block(lut: np.ndarray, reps: np.ndarray, dtype: torch.dtype):
    """Steps 1 to 4 on one block: the symbols, with the reconstruction written to ``out``."""

    def block(xb: np.ndarray, bb: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        sym = np.take(lut, _fine_keys(_delta_block(xb, bb, dtype)), mode="clip")
        _reconstruct_block(sym, reps, bb, dtype, out)
        return sym

    return block


def _collector(n: int) -> tuple[np.ndarray, Callable[[np.ndarray], None]]:
    """A flat symbol array and the callback filling it block after block."""
    symbols = np.empty(n, dtype=np.uint8)
    filled = [0]

    def add(sym: np.ndarray) -> None:
        symbols[filled[0] : filled[0] + sym.size] = sym
        filled[0] += sym.size

    return symbols, add


def lc_tables(
    x: torch.Tensor, base: torch.Tensor | None, key_to_symbol: torch.Tensor, representatives: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lc_symbols`'s argument checks; its tables as numpy arrays (uint8, float32)."""
    _check_lossy(x, base)
    if key_to_symbol.numel() != NUM_FINE_KEYS:
        raise ValueError(f"key_to_symbol must have {NUM_FINE_KEYS} entries, got {key_to_symbol.numel()}")
    return key_to_symbol.cpu().numpy().astype(np.uint8), representatives.cpu().numpy().astype(np.float32).reshape(-1)


def lc_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pass 2 without the Huffman stage: each element's symbol and the reconstruction.

    The symbols are those of :func:`lc_encode` (steps 1 to 4); codecs that entropy-code them
    another way (rANS: :func:`rans_encode`) start from here.

    Returns:
        ``(symbols, reconstruction, nonfinite)``: flat uint8 symbols, the flat reconstruction
        in ``x``'s dtype (exceptions not applied), and whether it holds a non-finite value.

    Raises:
        TypeError: If ``x`` or ``base`` is not a tensor of a supported dtype.
        ValueError: If shapes or table sizes are wrong.
    """
    lut, reps = lc_tables(x, base, key_to_symbol, representatives)
    symbols, add = _collector(x.numel())
    reconstruction, nonfinite = _symbol_pass(x, base, _lc_block(lut, reps, x.dtype), add)
    return torch.from_numpy(symbols), reconstruction, nonfinite


def _any_nonfinite(values: np.ndarray, dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:  # numpy sees the bits: exponent field all ones
        return bool(((values & np.uint16(0x7F80)) == np.uint16(0x7F80)).any())
    return not bool(np.isfinite(values).all())


class _Packer:
    """Step 6: packs blocks of symbols into word-aligned chunks of MSB-first 64-bit words.

    Blocks end on chunk boundaries, so each block's words simply follow the previous ones.
    """

    def __init__(self, lengths: np.ndarray, chunk_symbols: int) -> None:
        self.lengths = lengths
        self.codes = canonical_codes(lengths)
        self.chunk = chunk_symbols
        self.sym_bits = 4 if lengths.size <= 16 else 8
        self.group = 4 if self.sym_bits == 4 else 2
        self.table = _cached_group_table(lengths.tobytes(), self.group, self.sym_bits)
        self.blocks: list[tuple[np.ndarray, int]] = []
        self.chunk_bits: list[np.ndarray] = []

    def add(self, symbols: np.ndarray) -> None:
        n = symbols.size
        nchunks = -(-n // self.chunk)
        padded = nchunks * self.chunk
        if padded != n:  # only the last block: pad with symbol 0, remove its bits below
            symbols = np.concatenate([symbols, np.zeros(padded - n, dtype=np.uint8)])
        entry = self.table[_group_indices(symbols, self.group, self.sym_bits)]
        glen = (entry & np.uint64(63)).astype(np.int64)
        gcode = entry >> np.uint64(6)
        if padded != n:
            first_pad_group, keep = divmod(n, self.group)
            glen[first_pad_group:] = 0
            gcode[first_pad_group:] = 0
            if keep:  # the group holding the last real symbols: recompute without padding
                code = length = 0
                for s in symbols[first_pad_group * self.group : n].tolist():
                    code = (code << int(self.lengths[s])) | int(self.codes[s])
                    length += int(self.lengths[s])
                glen[first_pad_group] = length
                gcode[first_pad_group] = code
        per_chunk = self.chunk // self.group
        bits = glen.reshape(nchunks, per_chunk).sum(axis=1)
        chunk_words = (bits + _WORD_BITS - 1) // _WORD_BITS
        # Bit position of each group: its chunk's first word, plus the bits before it in
        # the chunk.
        ends = np.cumsum(glen)
        chunk_first_bit = np.concatenate(([0], np.cumsum(chunk_words)[:-1])) * _WORD_BITS
        before_chunk = np.concatenate(([0], ends[per_chunk - 1 :: per_chunk][:-1]))
        starts = ends - glen + np.repeat(chunk_first_bit - before_chunk, per_chunk)
        self.chunk_bits.append(bits)
        self.blocks.append(_pack_groups(gcode, glen, starts, int(chunk_words.sum())))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.blocks), np.concatenate(self.chunk_bits).astype(np.int64)


def chunk_word_offsets(chunk_bits: np.ndarray) -> np.ndarray:
    """First stream word of each chunk: the words of all chunks before it."""
    words = (np.asarray(chunk_bits, dtype=np.int64) + _WORD_BITS - 1) // _WORD_BITS
    return np.concatenate(([0], np.cumsum(words)[:-1])).astype(np.int64)


def _pack_groups(gcode: np.ndarray, glen: np.ndarray, starts: np.ndarray, nwords: int) -> np.ndarray:
    """OR group codes, MSB first, into ``nwords`` words at the given bit positions."""
    word = starts >> 6
    end_in_word = ((starts & 63) + glen).astype(np.uint64)
    straddle = end_in_word > np.uint64(64)
    # Bits of a group that fit in its first word, shifted to their place (MSB first).
    shift_left = np.where(straddle, np.uint64(0), np.uint64(64) - end_in_word)
    shift_right = np.where(straddle, end_in_word - np.uint64(64), np.uint64(0))
    high = (gcode << shift_left) >> shift_right
    # Groups never overlap in bits, so OR-ing all groups that start in a word builds it;
    # starts are sorted, so the groups of one word are a contiguous run.
    words = np.zeros(nwords + 1, dtype=np.uint64)
    run_starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    words[word[run_starts]] = np.bitwise_or.reduceat(high, run_starts)
    # The spilled low bits of a straddling group open the next word (at most one per word).
    spill = np.flatnonzero(straddle)
    words[word[spill] + 1] |= gcode[spill] << (np.uint64(128) - end_in_word[spill])
    return words[:nwords]


@functools.lru_cache(maxsize=256)
def _cached_group_table(lengths: bytes, group: int, sym_bits: int) -> np.ndarray:
    table = _group_table(np.frombuffer(lengths, dtype=np.uint8), group, sym_bits)
    table.flags.writeable = False
    return table


def _group_table(lengths: np.ndarray, group: int, sym_bits: int) -> np.ndarray:
    """Code and length of every ``group``-tuple of symbols, packed as ``code << 6 | length``.

    The tuple's index holds symbol ``j`` of the group at bits ``[sym_bits*j, sym_bits*(j+1))``;
    the first symbol of the group is the most significant in the combined code. Built from
    the table of pairs: a group of four is two pairs, combined in one broadcast.
    """
    codes = canonical_codes(lengths).astype(np.uint64)
    nsym = 1 << sym_bits
    lens = np.zeros(nsym, dtype=np.uint64)
    cods = np.zeros(nsym, dtype=np.uint64)
    lens[: lengths.size] = lengths
    cods[: lengths.size] = codes
    # Pairs: index = first | second << sym_bits.
    first_len, second_len = lens[None, :], lens[:, None]
    pair_len = (first_len + second_len).reshape(-1)
    pair_code = ((cods[None, :] << second_len) | cods[:, None]).reshape(-1)
    if group == 2:
        return (pair_code << np.uint64(6)) | pair_len
    # Quads: index = first pair | second pair << (2 * sym_bits).
    quad_len = (pair_len[None, :] + pair_len[:, None]).reshape(-1)
    quad_code = ((pair_code[None, :] << pair_len[:, None]) | pair_code[:, None]).reshape(-1)
    return (quad_code << np.uint64(6)) | quad_len


def _group_indices(symbols: np.ndarray, group: int, sym_bits: int) -> np.ndarray:
    """Index of each group of ``group`` consecutive symbols into :func:`_group_table`."""
    if group == 2:  # two uint8 symbols are one little-endian uint16: symbol 0 in the low byte
        return symbols.view(np.uint16)
    v = symbols.view(np.uint32)  # four 4-bit symbols, one per byte, squeezed into 16 bits
    v = (v | (v >> np.uint32(4))) & np.uint32(0x00FF00FF)
    return ((v | (v >> np.uint32(8))) & np.uint32(0xFFFF)).astype(np.uint16, copy=False)


# --------------------------------------------------------------------------- decode


class LcStream:
    """One tensor's coded symbols, as :func:`lc_decode` takes them.

    Attributes:
        stream: int64 tensor of the 64-bit stream words.
        chunk_bits: int64 tensor, bit length of each chunk.
        numel: Number of symbols.
        code_lengths: uint8 numpy array, Huffman length per symbol (all zero for a fill).
        fill_symbol: The symbol of every element when the tensor is a fill.
        representatives: float32 tensor, value per symbol.
        base: Flat base tensor or None.
        dtype: dtype of the tensor.
    """

    __slots__ = ("stream", "chunk_bits", "numel", "code_lengths", "fill_symbol", "representatives", "base", "dtype")

    def __init__(self, stream, chunk_bits, numel, code_lengths, fill_symbol, representatives, base, dtype):
        self.stream = stream
        self.chunk_bits = chunk_bits
        self.numel = numel
        self.code_lengths = code_lengths
        self.fill_symbol = fill_symbol
        self.representatives = representatives
        self.base = base
        self.dtype = dtype


def _step_tables(all_lengths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-symbol decode tables, one block of ``2**PEEK_BITS`` rows per code.

    For each code and each ``PEEK_BITS``-bit window: how many whole codewords the window
    starts with (at most ``MAX_SYMBOLS_PER_STEP``), their symbols, and the bits consumed by
    the first ``j`` of them for every ``j``.
    """
    ntab = len(all_lengths)
    size = 1 << PEEK_BITS
    single_sym = np.empty((ntab, size), dtype=np.uint8)
    single_len = np.empty((ntab, size), dtype=np.int64)
    for t, lengths in enumerate(all_lengths):
        s, ln = decode_table(lengths, PEEK_BITS)
        single_sym[t], single_len[t] = s, ln
    window = np.arange(size, dtype=np.int64)[None, :]
    offset = (np.arange(ntab, dtype=np.int64) * size)[:, None]
    pos = np.zeros((ntab, size), dtype=np.int64)
    alive = np.ones((ntab, size), dtype=bool)
    count = np.zeros((ntab, size), dtype=np.uint8)
    syms = np.zeros((ntab, size, MAX_SYMBOLS_PER_STEP), dtype=np.uint8)
    cum = np.zeros((ntab, size, MAX_SYMBOLS_PER_STEP + 1), dtype=np.int64)
    for j in range(MAX_SYMBOLS_PER_STEP):
        peek = (window << pos) & (size - 1)
        length = single_len.ravel()[offset + peek]
        ok = alive & (length > 0) & (pos + length <= PEEK_BITS)
        syms[:, :, j] = np.where(ok, single_sym.ravel()[offset + peek], 0)
        pos = pos + np.where(ok, length, 0)
        count += ok
        alive &= ok
        cum[:, :, j + 1] = pos
    return syms.reshape(ntab * size, -1), count.reshape(-1), cum.reshape(ntab * size, -1)


def _decode_symbols(items: list[LcStream], chunk_symbols: int) -> list[np.ndarray]:
    """Huffman-decode many streams at once: every chunk of every stream is one lane.

    All lanes advance together; each step decodes up to ``MAX_SYMBOLS_PER_STEP`` codewords
    per lane with one table lookup, so the Python loop runs about ``chunk_symbols / 8``
    times whatever the number of tensors.

    Raises:
        ValueError: If a chunk does not end exactly where its recorded bit length says.
    """
    coded = [i for i, it in enumerate(items) if it.code_lengths.any()]
    out: list[np.ndarray | None] = [None] * len(items)
    for i, it in enumerate(items):
        if i not in coded:
            out[i] = np.full(it.numel, it.fill_symbol, dtype=np.uint8)
    if not coded:
        return out  # type: ignore[return-value]
    sym_table, count_table, cum_table = _step_tables([items[i].code_lengths for i in coded])
    width = MAX_SYMBOLS_PER_STEP
    stride = chunk_symbols + width
    word_parts, lane_start, lane_end, lane_count, lane_table = [], [], [], [], []
    word_offset = 0
    for t, i in enumerate(coded):
        it = items[i]
        bits = it.chunk_bits.numpy().astype(np.int64)
        starts = (chunk_word_offsets(bits) + word_offset) * _WORD_BITS
        nchunks = bits.size
        counts = np.full(nchunks, chunk_symbols, dtype=np.int64)
        counts[-1] = it.numel - (nchunks - 1) * chunk_symbols
        word_parts.append(it.stream.numpy().view(np.uint64))
        word_offset += it.stream.numel()
        lane_start.append(starts)
        lane_end.append(starts + bits)
        lane_count.append(counts)
        lane_table.append(np.full(nchunks, t << PEEK_BITS, dtype=np.int64))
    # Padding: a corrupt lane may read up to 12 bits per symbol past its start.
    pad = (chunk_symbols * PEEK_BITS) // _WORD_BITS + 2
    words = np.concatenate(word_parts + [np.zeros(pad, dtype=np.uint64)])
    pos = np.concatenate(lane_start)
    end = np.concatenate(lane_end)
    remaining = np.concatenate(lane_count)
    table_off = np.concatenate(lane_table)
    nlanes = pos.size
    buffer = np.zeros(nlanes * stride, dtype=np.uint8)
    written = np.arange(nlanes, dtype=np.int64) * stride
    lanes = np.arange(nlanes)
    columns = np.arange(width, dtype=np.int64)
    drop = np.uint64(_WORD_BITS - PEEK_BITS)
    step = 0
    while lanes.size:
        word = pos >> 6
        shift = (pos & 63).astype(np.uint64)
        window = (words[word] << shift) | ((words[word + 1] >> np.uint64(1)) >> (np.uint64(63) - shift))
        entry = table_off + (window >> drop).astype(np.int64)
        take = np.minimum(count_table[entry], remaining)
        buffer[(written[:, None] + columns).ravel()] = sym_table[entry].ravel()
        pos = pos + cum_table[entry, take]
        written += take
        remaining -= take
        step += 1
        if step % 16 == 0 or not remaining.all():
            live = remaining > 0
            if not live.all():
                done = lanes[~live]
                if (pos[~live] != end[done]).any():
                    raise ValueError("a chunk's codes do not end at its recorded bit length")
                lanes, pos, written, remaining, table_off = (
                    lanes[live], pos[live], written[live], remaining[live], table_off[live],
                )
    grid = buffer.reshape(nlanes, stride)[:, :chunk_symbols]
    lane = 0
    for t, i in enumerate(coded):
        nchunks = lane_count[t].size
        out[i] = grid[lane : lane + nchunks].reshape(-1)[: items[i].numel]
        lane += nchunks
    return out  # type: ignore[return-value]


def lc_decode(items: list[LcStream], chunk_symbols: int) -> list[torch.Tensor]:
    """Decode many "lc/1" streams: Huffman decode, dequantize, add the base.

    Args:
        items: The coded tensors.
        chunk_symbols: Symbols per chunk (shared by all items).

    Returns:
        One flat tensor per item, in its dtype, on the base's device (CPU without a base);
        exceptions are not applied here.

    Raises:
        ValueError: If a stream is inconsistent with its chunk table.
    """
    symbols = _decode_symbols(items, chunk_symbols)
    restored = []
    for it, sym in zip(items, symbols, strict=True):
        base = None if it.base is None else it.base.cpu()
        restored.append(lc_reconstruct(sym, it.representatives.cpu().numpy(), base, it.dtype))
    return restored


# --------------------------------------------------------------------------- rANS

#: Frequencies are 12-bit: a symbol of frequency ``f`` costs ``12 - log2(f)`` bits.
RANS_PROB_BITS = 12
#: The coder state lives in [RANS_LOW, RANS_LOW << 16); 16-bit words renormalize it.
RANS_LOW = 1 << 16
_RANS_MASK = (1 << RANS_PROB_BITS) - 1


def _check_rans_table(freqs: np.ndarray) -> np.ndarray:
    raw = np.asarray(freqs)
    if raw.dtype.kind not in "iu":
        raise TypeError(f"freqs must hold integers, got dtype {raw.dtype}")
    f = raw.astype(np.int64).reshape(-1)
    if f.size == 0 or f.size > 256 or (f < 0).any() or int(f.sum()) != 1 << RANS_PROB_BITS:
        raise ValueError(f"freqs must be at most 256 non-negative ints summing to {1 << RANS_PROB_BITS}")
    if int(f.max()) == 1 << RANS_PROB_BITS:
        raise ValueError("freqs has a single symbol: such a stream is a fill and has no code")
    return f


def rans_encode(symbols: torch.Tensor, freqs: torch.Tensor, chunk_symbols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rANS-code uint8 symbols in independent chunks.

    The coder (static, one state per chunk): the state ``x`` starts at ``RANS_LOW = 2**16``;
    the chunk's symbols are coded last to first, each ``s`` of frequency ``f`` and
    cumulative frequency ``c`` (the sum of the frequencies of the symbols below ``s``) by

    * if ``x >= f << 20``: emit the 16-bit word ``x & 0xFFFF`` and ``x >>= 16`` (at most once);
    * ``x = ((x // f) << 12) + x % f + c``.

    A chunk's words are its final state (low half, then high half) followed by the emitted
    words in the reverse of their emission order, which is the order the decoder reads
    them: starting from that state, each step takes ``slot = x & 4095``, the symbol ``s``
    whose range ``[c, c + f)`` holds the slot, ``x = f * (x >> 12) + slot - c``, and reads
    one word ``x = x << 16 | word`` when ``x < 2**16``. A correct chunk ends with every word
    read and ``x == 2**16``.

    Args:
        symbols: uint8 tensor of symbols, any shape (read flat).
        freqs: Frequency of each symbol (at most 256 entries summing to 4096; every symbol
            that occurs must have a nonzero frequency, and at least two must be nonzero).
        chunk_symbols: Symbols per chunk, a power of two from 64 to 65536.

    Returns:
        ``(words, chunk_words)``: the stream as an int16 tensor holding the 16-bit words,
        and the number of words of each chunk (int64); chunk ``k`` starts at word
        ``sum(chunk_words[:k])``.

    Raises:
        ValueError: If the table is invalid or a symbol has frequency 0.
    """
    sym, f = rans_encode_input(symbols, freqs, chunk_symbols)
    n = sym.size
    full = n // chunk_symbols
    parts = []
    if full:
        parts.append(_rans_encode_lanes(sym[: full * chunk_symbols].reshape(full, chunk_symbols), f))
    if n > full * chunk_symbols:
        parts.append(_rans_encode_lanes(sym[full * chunk_symbols :].reshape(1, -1), f))
    if not parts:
        return torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.int64)
    words = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(words.view(np.int16)), torch.from_numpy(counts)


def rans_encode_streams(
    symbols: torch.Tensor, spans: Sequence[tuple[int, int]], freqs: object, chunk_symbols: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rANS-code several streams of one symbol tensor, each with its own table.

    Stream ``j`` is the ``spans[j] = (start, count)`` symbols of ``symbols`` (read flat) from
    ``start`` on, coded with ``freqs[j]`` exactly as :func:`rans_encode` codes it alone. The
    context codecs (``lc/3``, ``lq/2``) code each context's symbols this way: a CPU coder
    makes one call of many small streams, where a call per stream costs more than the coding.

    Args:
        symbols: uint8 tensor, any shape (read flat).
        spans: ``(start, count)`` of each stream, inside ``symbols``.
        freqs: One table per stream (a 2-D integer array or tensor, or a list of 1-D ones of
            one length), as :func:`rans_encode` takes it.
        chunk_symbols: Symbols per chunk, a power of two from 64 to 65536.

    Returns:
        ``(words, chunk_words)`` of each stream, as :func:`rans_encode` returns them.

    Raises:
        TypeError: If ``symbols`` is not a uint8 tensor.
        ValueError: If a span leaves ``symbols``, the tables do not match the spans, a table
            is invalid or a symbol has frequency 0 in its stream's table.
    """
    flat, starts, counts, tables = rans_streams_input(symbols, spans, freqs, chunk_symbols)
    return [
        rans_encode(flat[a : a + n], torch.from_numpy(f), chunk_symbols)
        for a, n, f in zip(starts.tolist(), counts.tolist(), tables, strict=True)
    ]


def rans_streams_input(
    symbols: object, spans: object, freqs: object, chunk_symbols: object
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Check :func:`rans_encode_streams`' arguments (every coder of it shares this).

    Returns:
        ``(symbols, starts, counts, freqs)``: the symbols flat, the spans as two int64
        arrays, the tables as one int64 array of one row per stream (each checked as
        :func:`rans_encode` checks its table).

    Raises:
        TypeError: If ``symbols`` is not a uint8 tensor or a table does not hold integers.
        ValueError: If a span leaves ``symbols`` or a table is invalid.
    """
    check_chunk_symbols(chunk_symbols)
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8:
        raise TypeError(f"symbols must be a uint8 tensor, got {getattr(symbols, 'dtype', type(symbols).__name__)}")
    flat = symbols.detach().reshape(-1)
    try:
        span_array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise ValueError("spans must be (start, count) pairs of ints") from None
    starts, counts = span_array[:, 0], span_array[:, 1]
    if ((starts < 0) | (counts < 0) | (starts + counts > flat.numel())).any():
        raise ValueError(f"spans must lie inside the {flat.numel()} symbols")
    raw = freqs.cpu().numpy() if isinstance(freqs, torch.Tensor) else np.asarray(freqs)
    if raw.ndim != 2 or raw.shape[0] != starts.size:
        raise ValueError(f"freqs must hold one table per span ({starts.size}), got shape {raw.shape}")
    tables = np.stack([_check_rans_table(row) for row in raw]) if starts.size else raw.astype(np.int64)
    return flat, starts, counts, tables


#: What every rANS encoder raises for a symbol outside its table.
RANS_ZERO_FREQUENCY = "a symbol to code has frequency 0"


def rans_encode_input(
    symbols: object, freqs: object, chunk_symbols: object, check_symbols: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Check :func:`rans_encode`'s arguments (every CPU coder of the format shares this).

    Args:
        symbols, freqs, chunk_symbols: As :func:`rans_encode` takes them.
        check_symbols: Also check that every symbol has a nonzero frequency; a coder that
            checks this while it codes passes False (the check is a pass over the symbols).

    Returns:
        ``(symbols, freqs)``: the symbols as a flat uint8 numpy array, the table as int64.

    Raises:
        TypeError: If ``symbols`` is not a uint8 tensor.
        ValueError: If the table or chunk size is invalid, or a symbol has frequency 0.
    """
    check_chunk_symbols(chunk_symbols)
    f = _check_rans_table(freqs.cpu().numpy() if isinstance(freqs, torch.Tensor) else freqs)
    if not isinstance(symbols, torch.Tensor) or symbols.dtype != torch.uint8:
        raise TypeError(f"symbols must be a uint8 tensor, got {getattr(symbols, 'dtype', type(symbols).__name__)}")
    sym = symbols.detach().cpu().contiguous().reshape(-1).numpy().view(np.uint8)
    if check_symbols:
        used = np.bincount(sym, minlength=256) > 0
        if used[f.size :].any() or (used[: f.size] & (f == 0)).any():
            raise ValueError(RANS_ZERO_FREQUENCY)
    return sym, f


def _rans_encode_lanes(grid: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode each row of ``grid`` as one chunk; all rows advance together."""
    lanes, length = grid.shape
    steps = np.ascontiguousarray(grid.T)  # step-major: row i holds symbol i of every lane
    f32 = freqs.astype(np.uint32)
    cum32 = np.concatenate(([0], np.cumsum(freqs)[:-1])).astype(np.uint32)
    limit = f32 << np.uint32(20)
    x = np.full(lanes, RANS_LOW, dtype=np.uint32)
    emitted = np.empty((length, lanes), dtype=np.uint16)
    emits = np.empty((length, lanes), dtype=bool)
    # Preallocated temporaries: the loop runs once per symbol of a chunk, over all lanes.
    f = np.empty(lanes, dtype=np.uint32)
    q = np.empty(lanes, dtype=np.uint32)
    tmp = np.empty(lanes, dtype=np.uint32)
    sixteen, twelve = np.uint32(16), np.uint32(12)
    for i in range(length - 1, -1, -1):
        s = steps[i]
        e = emits[i]
        np.take(limit, s, out=tmp)
        np.greater_equal(x, tmp, out=e)
        emitted[i] = x  # the low 16 bits; kept only where e
        np.right_shift(x, sixteen, out=tmp)
        np.copyto(x, tmp, where=e)
        np.take(f32, s, out=f)
        np.floor_divide(x, f, out=q)
        np.multiply(q, f, out=tmp)
        np.subtract(x, tmp, out=x)  # x % f
        np.left_shift(q, twelve, out=q)
        x += q
        np.take(cum32, s, out=tmp)
        x += tmp
    # Decoder order: the emitted words by increasing step, lane by lane.
    body = emitted.T[emits.T]
    counts = emits.sum(axis=0).astype(np.int64) + 2
    out = np.empty(int(counts.sum()), dtype=np.uint16)
    starts = np.cumsum(counts) - counts
    is_body = np.ones(out.size, dtype=bool)
    is_body[starts] = is_body[starts + 1] = False
    out[starts] = x & np.uint32(0xFFFF)
    out[starts + 1] = x >> sixteen
    out[is_body] = body
    return out, counts


class RansStream:
    """One rANS-coded symbol stream, as :func:`rans_decode` takes it.

    Attributes:
        words: int16 tensor of the 16-bit words.
        chunk_words: int64 tensor, words of each chunk.
        numel: Number of symbols.
        freqs: int64 numpy array, frequency of each symbol.
    """

    __slots__ = ("words", "chunk_words", "numel", "freqs")

    def __init__(self, words: torch.Tensor, chunk_words: torch.Tensor, numel: int, freqs: np.ndarray):
        self.words = words
        self.chunk_words = chunk_words
        self.numel = numel
        self.freqs = freqs


def rans_decode(items: list[RansStream], chunk_symbols: int) -> list[torch.Tensor]:
    """Decode many rANS streams at once: every chunk of every stream is one lane.

    Args:
        items: The streams (see :func:`rans_encode` for the format).
        chunk_symbols: Symbols per chunk, shared by all items.

    Returns:
        One flat uint8 tensor of symbols per item, on CPU.

    Raises:
        ValueError: If a table is invalid, or a chunk does not end with every word read and
            the state back at ``2**16`` (a corrupt or truncated stream).
    """
    lanes = rans_lanes(items, chunk_symbols)
    if lanes is None:
        return [torch.zeros(it.numel, dtype=torch.uint8) for it in items]
    # One zero word of padding: a corrupt lane may read past the stream's end.
    words = np.concatenate([lanes.words, np.zeros(chunk_symbols + 1, dtype=np.uint16)]).astype(np.uint32)
    start, end, size, table = lanes.start, lanes.end, lanes.size, lanes.table
    # Flat tables indexed by (table << 8 | symbol) and (table << 12 | slot).
    freq_flat, cum_flat, slot_flat = lanes.freq.reshape(-1), lanes.cum.reshape(-1), lanes.slots.reshape(-1)
    sym_base = (table << 8).astype(np.int64)
    slot_base = (table << RANS_PROB_BITS).astype(np.int64)
    x = words[start] | (words[start + 1] << np.uint32(16))
    pos = start + 2
    result = np.zeros((lanes.longest, size.size), dtype=np.uint8)
    for i in range(lanes.longest):
        active = size > i
        slot = (x & np.uint32(_RANS_MASK)).astype(np.int64)
        s = slot_flat[slot_base + slot]
        idx = sym_base + s
        nx = freq_flat[idx] * (x >> np.uint32(RANS_PROB_BITS)) + slot.astype(np.uint32) - cum_flat[idx]
        need = nx < np.uint32(RANS_LOW)
        nx = np.where(need, (nx << np.uint32(16)) | words[np.minimum(pos, words.size - 1)], nx)
        if not active.all():  # only the last chunk of a stream is shorter
            nx = np.where(active, nx, x)
            need &= active
        x = nx
        pos = pos + need
        result[i] = s
    if not ((x == RANS_LOW) & (pos == end)).all():
        raise ValueError(RANS_CORRUPT)
    return rans_split_lanes(result.T, items, chunk_symbols)


#: What every rANS decoder raises for a chunk that does not decode cleanly.
RANS_CORRUPT = "a chunk's rANS code does not end where its chunk table says"


@dataclasses.dataclass
class RansLanes:
    """Many streams' chunks as decoding lanes, checked against their chunk tables.

    Attributes:
        words: uint16, every stream's words laid end to end.
        start, end: int64 per lane, its first word and the word after its last.
        size: int64 per lane, its symbols (only a stream's last chunk is shorter).
        table: int64 per lane, the index of its stream's table.
        freq, cum: uint32 ``[tables, 256]``, frequency and cumulative frequency per symbol.
        slots: uint8 ``[tables, 4096]``, the symbol owning each slot.
        longest: The largest ``size``.
    """

    words: np.ndarray
    start: np.ndarray
    end: np.ndarray
    size: np.ndarray
    table: np.ndarray
    freq: np.ndarray
    cum: np.ndarray
    slots: np.ndarray
    longest: int


def rans_lanes(items: list[RansStream], chunk_symbols: int) -> RansLanes | None:
    """Check streams for :func:`rans_decode` and lay their chunks out as lanes (every CPU
    decoder of the format shares this).

    Returns:
        The lanes, or None when no stream has a word (nothing to decode).

    Raises:
        ValueError: If a table is invalid or a chunk table does not fit its stream.
    """
    check_chunk_symbols(chunk_symbols)
    tables = [_check_rans_table(it.freqs) for it in items]
    word_parts, lane_start, lane_end, lane_count, lane_table = [], [], [], [], []
    offset = 0
    for t, it in enumerate(items):
        counts = np.asarray(it.chunk_words.cpu().numpy(), dtype=np.int64)
        nchunks = -(-it.numel // chunk_symbols)
        if counts.size != nchunks:
            raise ValueError(f"a stream of {it.numel} symbols needs {nchunks} chunks, its table lists {counts.size}")
        if (counts < 2).any():
            raise ValueError("every chunk holds at least its two state words")
        words = it.words.cpu().numpy().view(np.uint16)
        if int(counts.sum()) != words.size:
            raise ValueError("the stream's length does not match its chunk table")
        starts = np.cumsum(counts) - counts + offset
        sizes = np.full(nchunks, chunk_symbols, dtype=np.int64)
        if nchunks:
            sizes[-1] = it.numel - (nchunks - 1) * chunk_symbols
        word_parts.append(words)
        lane_start.append(starts)
        lane_end.append(starts + counts)
        lane_count.append(sizes)
        lane_table.append(np.full(nchunks, t, dtype=np.int64))
        offset += words.size
    if not word_parts or offset == 0:
        return None
    ntab = len(tables)
    freq = np.zeros((ntab, 256), dtype=np.uint32)
    cum = np.zeros((ntab, 256), dtype=np.uint32)
    slots = np.zeros((ntab, 1 << RANS_PROB_BITS), dtype=np.uint8)
    for t, f in enumerate(tables):
        freq[t, : f.size] = f
        cum[t, : f.size] = np.concatenate(([0], np.cumsum(f)[:-1]))
        slots[t] = np.repeat(np.arange(f.size, dtype=np.uint8), f)
    size = np.concatenate(lane_count)
    return RansLanes(
        words=np.concatenate(word_parts),
        start=np.concatenate(lane_start),
        end=np.concatenate(lane_end),
        size=size,
        table=np.concatenate(lane_table),
        freq=freq,
        cum=cum,
        slots=slots,
        longest=int(size.max()),
    )


def rans_split_lanes(grid: np.ndarray, items: list[RansStream], chunk_symbols: int) -> list[torch.Tensor]:
    """Each stream's symbols from the decoded lanes (``grid``: uint8, one row per lane,
    :attr:`RansLanes.longest` wide)."""
    out: list[torch.Tensor] = []
    lane = 0
    for it in items:
        nchunks = -(-it.numel // chunk_symbols)
        # Every chunk but a stream's last is full, so its lanes laid end to end are the stream.
        sym = np.ascontiguousarray(grid[lane : lane + nchunks]).reshape(-1)[: it.numel]
        out.append(torch.from_numpy(sym))
        lane += nchunks
    return out


# --------------------------------------------------------------------------- lc/3 and lq/2 contexts
#
# lc/3 groups a delta's symbols by a context read from the base's Adam moments of the same
# parameter and codes each group as its own rANS stream; lq/2 does the same for a moment's
# lq/1 symbols, by the binade of the moment's base. These twins are plain torch (they run as they
# are on a GPU); ``lctriton.kernels.rans_cpu`` has the same loops compiled for CPU cores.

#: Octaves of ``|m| / sqrt(v)`` a context tells apart; contexts: 3 signs of ``m`` x octaves.
CONTEXT_OCTAVES = 16
NUM_CONTEXTS = 3 * CONTEXT_OCTAVES


def _check_context_pair(first: object, second: object) -> tuple[torch.Tensor, torch.Tensor]:
    for label, t in (("first", first), ("second", second)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{label} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if first.numel() != second.numel():
        raise ValueError(f"first and second must have as many elements, got {first.numel()} and {second.numel()}")
    return first, second


def moment_contexts(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The lc/3 context of every element, from a parameter's Adam moments in the base.

    With ``E(t)`` the exponent field of ``float32(t)`` (0 to 255), the octave is
    ``clamp(E(m) - ((E(v) + 1) >> 1) - 63, -8, 7) + 8``, which is ``e(m) - floor(e(v) / 2)``
    for the unbiased exponents, about ``log2(|m| / sqrt(v))``; the context is ``16 * sign +
    octave`` with sign 0 for a negative ``m``, 1 for a positive one, 2 for a zero of either
    sign. Only integer operations on bit patterns: every device computes the same contexts.

    Args:
        first: The base's first moment (``exp_avg``) of the parameter, any float dtype.
        second: Its second moment (``exp_avg_sq``), as many elements.

    Returns:
        Flat uint8 contexts below :data:`NUM_CONTEXTS`, on the moments' device.
    """
    _check_context_pair(first, second)
    m = first.detach().reshape(-1).to(torch.float32).view(torch.int32)
    v = second.detach().reshape(-1).to(torch.float32).view(torch.int32)
    exp_v = (v >> 23) & 0xFF
    octave = (((m >> 23) & 0xFF) - ((exp_v + 1) >> 1) - 63).clamp_(-8, CONTEXT_OCTAVES - 9).add_(8)
    sign = (m >= 0).to(torch.int32).masked_fill_((m & 0x7FFFFFFF) == 0, 2)
    return (sign * CONTEXT_OCTAVES + octave).to(torch.uint8)


#: Contexts of ``lq/2`` (:func:`binade_contexts`): 0 for a zero base, then 15 binades.
NUM_BINADE_CONTEXTS = 16
#: Largest ``lq/2`` offset: an exponent field.
MAX_BINADE_OFFSET = 255


def binade_contexts(base: torch.Tensor, offset: int) -> torch.Tensor:
    """The lq/2 context of every element: the binade of its base.

    With ``E`` the exponent field of ``float32(base)`` (0 to 255; the sign is ignored), the
    context is 0 where ``E`` is 0 (a zero or subnormal base) and else
    ``clamp(E - offset, -7, 7) + 8``: the binade around the tensor's median binade
    ``offset``. An optimizer moment's next value stays close to its base, so the context
    predicts the value's bin. Integer operations on bit patterns only: every device computes
    the same contexts.

    Args:
        base: The moment's base, any float dtype.
        offset: The exponent field mapped to context 8, 0 to :data:`MAX_BINADE_OFFSET`.

    Returns:
        Flat uint8 contexts below :data:`NUM_BINADE_CONTEXTS`, on the base's device.

    Raises:
        TypeError: If ``base`` is not a floating tensor.
        ValueError: If ``offset`` is out of range.
    """
    _check_binade_input(base, offset)
    exponent = (base.detach().reshape(-1).to(torch.float32).view(torch.int32) >> 23) & 0xFF
    binade = (exponent - offset).clamp_(-7, 7).add_(8)
    return binade.masked_fill_(exponent == 0, 0).to(torch.uint8)


def _check_binade_input(base: object, offset: object) -> None:
    if not isinstance(base, torch.Tensor) or not base.is_floating_point():
        raise TypeError(f"base must be a floating tensor, got {getattr(base, 'dtype', type(base).__name__)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_BINADE_OFFSET:
        raise ValueError(f"offset must be an int from 0 to {MAX_BINADE_OFFSET}, got {offset!r}")


def context_counts(contexts: torch.Tensor) -> torch.Tensor:
    """int64 ``[NUM_CONTEXTS]``: how many elements each context has."""
    return torch.bincount(contexts.reshape(-1), minlength=NUM_CONTEXTS)


def context_histogram(contexts: torch.Tensor, symbols: torch.Tensor, nsym: int) -> torch.Tensor:
    """int64 ``[NUM_CONTEXTS, nsym]``: how often each symbol occurs in each context."""
    joint = contexts.reshape(-1).to(torch.int64) * nsym + symbols.reshape(-1).to(torch.int64)
    return torch.bincount(joint, minlength=NUM_CONTEXTS * nsym).reshape(NUM_CONTEXTS, nsym)


def group_by_context(contexts: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """The symbols of context 0 in index order, then those of context 1, ... (a stable sort
    by context: one answer on every device)."""
    order = torch.argsort(contexts.reshape(-1), stable=True)
    return symbols.reshape(-1)[order]


def ungroup_by_context(contexts: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`group_by_context`: each symbol back at its element's index."""
    order = torch.argsort(contexts.reshape(-1), stable=True)
    out = torch.empty_like(grouped)
    out[order] = grouped
    return out


# --------------------------------------------------------------------------- sq: scaled first moments
#
# "sq/1" codes an Adam first moment ``m`` (float32) in units of the step it causes: Adam moves a
# weight by ``lr * m / sqrt(v)``, so an error in ``m`` matters relative to ``sqrt(v)``, not
# relative to ``m`` (``lq/1``'s bins) nor absolutely (``lc/1``'s buckets). With ``b`` the base's
# first moment, ``n`` the second moment of the same parameter as the same checkpoint restores
# it, and the record's ``scale`` (the decay of ``b``) and ``precision`` ``P``, every
# operation in float32, rounded to nearest even:
#
# 1. Prediction ``p = b * scale``; unit ``s = sqrt(n)``.
# 2. Level ``k = rint(((x - p) / s) * 2**P)``, ties to even (an integer: never -0.0); ``k = 0``
#    where ``x - p`` is zero (whatever ``s``: an element never stepped has ``m = v = 0``).
# 3. An element is an exception (stored exactly, level 0) where ``k`` is not finite or
#    ``|k| > SQ_REACH``, or its reconstruction is not finite.
# 4. With ``K`` the largest ``|k|`` of the other elements, the symbol is ``k + K`` and symbol
#    ``j``'s representative ``reps[j] = (j - K) * 2**-P`` (exact in float32); the
#    reconstruction is ``p + reps[symbol] * s``. Its error is at most ``s * 2**-(P + 1)`` plus
#    two roundings: the restored step ``m / sqrt(v)`` is within half a level of the saved one.
#    Adam keeps ``|m| / sqrt(v)`` below about 7 (``beta1**2 < beta2``), so ``K`` stays small.
#
# Torch's float32 ``*``, ``/`` and ``round`` are correctly rounded on every device, so these
# functions are the codec on the GPU as well and give the CPU's bits there; on CPU the compiled
# twin in ``kernels/rans_cpu.c`` runs the same arithmetic as one pass. Torch's float32 ``sqrt``
# is not (its vectorized CPU loop is off by an ulp for about one value in 150), so ``s`` is the
# float64 square root rounded to float32, which is the correctly rounded float32 one.

#: Largest level magnitude of ``sq/1``: symbols ``0 .. 2 * SQ_REACH`` fit a byte.
SQ_REACH = 127


def _f32_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float32 scalar tensor (so that torch multiplies in float32, never in double)."""
    return torch.tensor(np.float32(value), dtype=torch.float32, device=device)


def _sq_unit(norm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``s = sqrt(norm)`` flat, correctly rounded to float32 (see the section's comment)."""
    return torch.sqrt(norm.reshape(-1).to(device=device, dtype=torch.float64)).to(torch.float32)


def _check_sq(x: torch.Tensor, base: torch.Tensor, norm: torch.Tensor) -> None:
    for what, t in (("x", x), ("base", base), ("norm", norm)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"sq/1 codes float32 tensors: {what} is {getattr(t, 'dtype', type(t).__name__)}")
    if base.numel() != x.numel() or norm.numel() != x.numel():
        raise ValueError(
            f"sq/1 needs base and norm of {x.numel()} elements, got {base.numel()} and {norm.numel()}"
        )


def sq_symbols(
    x: torch.Tensor, base: torch.Tensor, scale: float, norm: torch.Tensor, precision: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Steps 1-4 of ``sq/1`` on the encoder's side.

    Args:
        x: float32 first moment.
        base: float32 base first moment, as many elements.
        scale: Factor of the base (a float32 value).
        norm: float32 second moment as restored, as many elements.
        precision: ``P``: ``2**P`` levels per unit.

    Returns:
        ``(symbols, reach, reconstruction, exceptional)``, flat and on ``x``'s device: uint8
        symbols ``k + reach``, the reach ``K``, the float32 reconstruction (the exact value at
        exceptions) and a bool mask of the exceptions.

    Raises:
        TypeError: If a tensor is not float32.
        ValueError: If the sizes differ.
    """
    _check_sq(x, base, norm)
    dev = x.device
    xf = x.reshape(-1)
    p = base.reshape(-1).to(dev) * _f32_scalar(scale, dev)
    s = _sq_unit(norm, dev)
    d = xf - p
    # "+ 0.0" makes a level of -0.0 (rounded from a small negative value) +0.0: a level is an
    # integer, and p + (-0.0 * s) and p + (+0.0 * s) differ where p is -0.0.
    q = torch.round((d / s) * _f32_scalar(2.0**precision, dev)) + 0.0
    q = torch.where(d == 0, torch.zeros_like(q), q)
    bad = ~torch.isfinite(q) | (q.abs() > SQ_REACH)
    q = torch.where(bad, torch.zeros_like(q), q)
    recon = p + (q * _f32_scalar(2.0**-precision, dev)) * s
    bad |= ~torch.isfinite(recon)
    q = torch.where(bad, torch.zeros_like(q), q)
    reach = int(q.abs().max()) if q.numel() else 0
    recon = torch.where(bad, xf, recon)
    return (q + reach).to(torch.uint8), reach, recon, bad


def sq_representatives(reach: int, precision: int) -> np.ndarray:
    """float32 ``reps[j] = (j - reach) * 2**-precision`` for ``j`` in ``0 .. 2 * reach``."""
    return (np.arange(2 * reach + 1, dtype=np.float64) - reach).astype(np.float32) * np.float32(2.0**-precision)


def sq_reconstruct(
    symbols: torch.Tensor, reach: int, precision: int, base: torch.Tensor, scale: float, norm: torch.Tensor
) -> torch.Tensor:
    """The decoder's side of ``sq/1``: ``p + reps[symbol] * s``, flat float32 on ``base``'s
    device (exceptions not applied; a symbol past ``2 * reach`` counts as ``2 * reach``)."""
    dev = base.device
    reps = torch.from_numpy(sq_representatives(reach, precision)).to(dev)
    sym = symbols.reshape(-1).to(device=dev, dtype=torch.int64).clamp(0, 2 * reach)
    p = base.reshape(-1) * _f32_scalar(scale, dev)
    return p + reps[sym] * _sq_unit(norm, dev)


# --------------------------------------------------------------------------- aq: activations
#
# Group quantization of saved activations (``lctriton.activations``). Unlike the codecs above
# it never reaches a file: it defines what backward sees, and the GPU kernels in
# ``lctriton.kernels.groupquant`` must give the same bytes so that training on either backend
# follows the same arithmetic. The format is stated in that module's docstring.

#: Bit widths of the activation quantizer: whole codes per byte, no code straddles two bytes.
AQ_BITS = (2, 4, 8)
#: Smallest and largest group: powers of two, so a group is whole bytes at every width.
AQ_MIN_GROUP = 8
AQ_MAX_GROUP = 4096
#: The 32-bit mixer of the stochastic-rounding hash (multipliers below 2**31, so that products
#: of uint32 values held in int64 never overflow).
AQ_MIX = (0x21F0AAAD, 0x735A2D97)
_U32 = 0xFFFFFFFF
#: The NaN a non-finite group restores to, as bits of each dtype (quiet, positive): written
#: as bits because processors disagree on the NaN that arithmetic or conversion produces.
AQ_NAN_BITS = {
    torch.float32: (torch.int32, 0x7FC00000),
    torch.float64: (torch.int64, 0x7FF8000000000000),
    torch.float16: (torch.int16, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7FC0),
}
#: Elements the reference handles at once. It bounds the temporaries (the hash's int64
#: lanes are 8 bytes an element), which would otherwise set the peak of a compressed step.
_AQ_SLAB = 1 << 18


def check_aq_args(bits: object, group_size: object, seed: object) -> tuple[int, int, int]:
    """Validate the quantizer's integer arguments (shared by both backends).

    Returns:
        ``(bits, group_size, seed)``.

    Raises:
        TypeError: If one is not an int.
        ValueError: If ``bits`` is not 2, 4 or 8, ``group_size`` not a power of two in
            [8, 4096] or ``seed`` outside [0, 2**31).
    """
    for name, value in (("bits", bits), ("group_size", group_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if bits not in AQ_BITS:
        raise ValueError(f"bits must be one of {AQ_BITS}, got {bits}")
    if not (AQ_MIN_GROUP <= group_size <= AQ_MAX_GROUP) or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two in [{AQ_MIN_GROUP}, {AQ_MAX_GROUP}], got {group_size}")
    if not 0 <= seed < 1 << 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return bits, group_size, seed


def aq_sizes(numel: int, bits: int, group_size: int) -> tuple[int, int]:
    """``(groups, packed bytes)`` of a quantized tensor of ``numel`` elements."""
    groups = -(-numel // group_size)
    return groups, groups * group_size * bits // 8


def _noise_into(index_start: int, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """:func:`rounding_noise` for ``count`` elements that share ``index >> 32`` (a slab)."""
    outer = (index_start >> 32) ^ seed
    outer ^= outer >> 16
    outer = (outer * AQ_MIX[0]) & _U32
    outer ^= outer >> 15
    outer = (outer * AQ_MIX[1]) & _U32
    outer ^= outer >> 15
    x = torch.arange(index_start & _U32, (index_start & _U32) + count, dtype=torch.int64, device=device)
    x.bitwise_xor_(outer)
    x.bitwise_xor_(x >> 16).mul_(AQ_MIX[0]).bitwise_and_(_U32)
    x.bitwise_xor_(x >> 15).mul_(AQ_MIX[1]).bitwise_and_(_U32)
    x.bitwise_xor_(x >> 15).bitwise_right_shift_(8)
    return x.to(torch.float32).mul_(2.0**-24)


def rounding_noise(start: int, count: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The stochastic-rounding offsets of elements ``start .. start + count - 1``.

    ``u(i) = (h >> 8) * 2**-24`` with ``h = mix32((i mod 2**32) ^ mix32((i >> 32) ^ seed))``:
    uniform on 2**24 points of [0, 1), a pure function of the element's index and the seed.

    Returns:
        float32 tensor of ``count`` offsets on ``device``.
    """
    device = torch.device(device)
    parts, i, end = [], start, start + count
    while i < end:
        stop = min(end, ((i >> 32) + 1) << 32)
        parts.append(_noise_into(i, stop - i, seed, device))
        i = stop
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=device)


def _aq_check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in LOSSY_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    return x.contiguous().reshape(-1)


def _steps(lo: torch.Tensor, hi: torch.Tensor, bad: torch.Tensor | None, levels: int):
    """Per group: ``(low, step, inv)`` from its finite range (``bad``: groups with non-finite)."""
    span = hi - lo
    if bad is not None:
        bad = bad | torch.isinf(span)
    # Tensor-by-tensor division: it is correctly rounded on every device, whereas a Python
    # scalar divisor may be turned into a multiplication by its reciprocal.
    lv = torch.full_like(span, float(levels))
    inv = lv / torch.where(span > 0, span, 1.0)
    flat = (span == 0) | torch.isinf(inv)
    if bad is not None:
        flat |= bad
    inv = torch.where(flat, 0.0, inv)
    step = torch.where(flat, 0.0, span / lv)
    if bad is not None:
        step = torch.where(bad, float("nan"), step)
    # -0.0 and +0.0 tie for the minimum and reductions may return either: store +0.0.
    return torch.where(lo == 0, 0.0, lo), step, inv, bad


def quantize_groups(
    x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a tensor in groups of ``group_size`` elements to ``bits``-bit codes.

    See :mod:`lctriton.kernels.groupquant` for the format.

    Args:
        x: Floating tensor (any shape; read in its flattened, contiguous order).
        bits: 2, 4 or 8.
        group_size: Elements per group: a power of two in [8, 4096].
        seed: Seed of the stochastic-rounding hash, in [0, 2**31).
        stochastic: Round stochastically (unbiased) rather than to nearest.

    Returns:
        ``(codes, low, step)``: uint8 ``[groups * group_size * bits / 8]`` packed codes,
        float32 ``[groups]`` group minima and float32 ``[groups]`` steps (NaN for a group
        holding a non-finite value), all on ``x``'s device.

    Raises:
        TypeError: If ``x`` is not a floating tensor or an integer argument is not an int.
        ValueError: If an integer argument is out of range.
    """
    bits, group_size, seed = check_aq_args(bits, group_size, seed)
    flat = _aq_check_input(x)
    n, dev = flat.numel(), flat.device
    levels, per_byte = (1 << bits) - 1, 8 // bits
    groups, nbytes = aq_sizes(n, bits, group_size)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    low = torch.empty(groups, dtype=torch.float32, device=dev)
    step = torch.empty(groups, dtype=torch.float32, device=dev)
    slab = max(1, _AQ_SLAB // group_size)  # a power of two: no slab straddles 2**32 elements
    for g0 in range(0, groups, slab):
        g1 = min(groups, g0 + slab)
        e0, e1 = g0 * group_size, min(n, g1 * group_size)
        m = e1 - e0
        v = torch.empty((g1 - g0) * group_size, dtype=torch.float32, device=dev)
        v[:m] = flat[e0:e1]
        v[m:] = v[m - 1]  # padding repeats a value of its own group: min and max stay the same
        v = v.view(-1, group_size)
        lo, hi = v.amin(1), v.amax(1)  # NaN propagates: a finite pair means a finite group
        if bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            lo, st, inv, _ = _steps(lo, hi, None, levels)
            t = (v - lo[:, None]).mul_(inv[:, None])
        else:
            valid = (torch.arange(v.numel(), device=dev) < m).view(-1, group_size)
            ok = torch.isfinite(v) & valid
            inf = torch.tensor(float("inf"), device=dev)
            lo = torch.where(ok, v, inf).amin(1)
            hi = torch.where(ok, v, -inf).amax(1)
            empty = ~ok.any(1)
            lo, st, inv, bad = _steps(torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi),
                                      (valid & ~ok).any(1), levels)
            usable = ok & ~bad[:, None]
            t = (torch.where(usable, v, lo[:, None]) - lo[:, None]).mul_(inv[:, None])
        if stochastic:
            t.add_(rounding_noise(e0, v.numel(), seed, dev).view_as(t))
        else:
            t.add_(0.5)
        # min(int(t), L) == int(min(t, L)) for t >= 0: clamp in float, then truncate to bytes.
        q = t.clamp_(max=levels).to(torch.uint8).view(-1)
        q[m:] = 0
        q = q.view(-1, per_byte)
        packed = q[:, 0].clone()
        for i in range(1, per_byte):
            packed.bitwise_or_(q[:, i] << (i * bits))
        codes[g0 * group_size // per_byte : g1 * group_size // per_byte] = packed
        low[g0:g1] = lo
        step[g0:g1] = st
    return codes, low, step


def _aq_check_codes(codes: object, low: object, step: object, bits: int, group_size: int, numel: object):
    for name, t, dtype in (("codes", codes, torch.uint8), ("low", low, torch.float32), ("step", step, torch.float32)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    groups, nbytes = aq_sizes(numel, bits, group_size)
    if codes.numel() != nbytes or low.numel() != groups or step.numel() != groups:
        raise ValueError(
            f"{numel} elements in groups of {group_size} at {bits} bits need {nbytes} code bytes and "
            f"{groups} group entries; got {codes.numel()} code bytes, {low.numel()} low and {step.numel()} step"
        )
    if not (codes.device == low.device == step.device):
        raise ValueError(f"codes, low and step must share a device: {codes.device}, {low.device}, {step.device}")


def dequantize_groups(
    codes: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Values of quantized groups: ``low + code * step`` in float32, rounded to ``dtype``.

    Args:
        codes, low, step: What :func:`quantize_groups` returned.
        bits: Its bit width.
        group_size: Its group size.
        numel: Elements of the original tensor.
        dtype: dtype of the result (a floating dtype :func:`quantize_groups` accepts).

    Returns:
        Flat tensor of ``numel`` elements on ``codes``' device; a group with a NaN step is
        the quiet NaN of :data:`AQ_NAN_BITS`.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If the sizes do not belong together.
    """
    bits, group_size, _ = check_aq_args(bits, group_size, 0)
    _aq_check_codes(codes, low, step, bits, group_size, numel)
    if dtype not in LOSSY_DTYPES:
        raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    dev = codes.device
    levels, per_byte = (1 << bits) - 1, 8 // bits
    groups = low.numel()
    out = torch.empty(numel, dtype=dtype, device=dev)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
    codes = codes.contiguous().view(-1, group_size // per_byte)
    int_type, nan_bits = AQ_NAN_BITS[dtype]
    nan = torch.tensor(nan_bits, dtype=int_type, device=dev).view(dtype)
    slab = max(1, _AQ_SLAB // group_size)
    for g0 in range(0, groups, slab):
        g1 = min(groups, g0 + slab)
        e0, e1 = g0 * group_size, min(numel, g1 * group_size)
        q = ((codes[g0:g1, :, None] >> shifts) & levels).view(g1 - g0, group_size).to(torch.float32)
        lo, st = low[g0:g1, None], step[g0:g1, None]
        bad = torch.isnan(st)
        if bool(bad.any()):
            v = torch.where(bad, nan, (q.mul_(torch.where(bad, 0.0, st)).add_(lo)).to(dtype))
        else:
            v = q.mul_(st).add_(lo).to(dtype)
        out[e0:e1] = v.view(-1)[: e1 - e0]
    return out
