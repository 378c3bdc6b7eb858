"""Canonical, length-limited Huffman codes built from a symbol histogram.

Code lengths are optimal under the length limit (the package-merge algorithm), and only
the lengths are stored in a file: codes are canonical, assigned in order of
(length, symbol), so the decoder rebuilds exactly the encoder's table from the lengths.

Conventions shared with the bit-packers in ``lctriton.kernels``:

* A length of 0 means the symbol does not occur.
* Codes are written most significant bit first.
* A histogram with a single used symbol has no code at all: :func:`code_lengths` returns
  all zeros and the codec stores that tensor as a fill (no stream).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MAX_CODE_LENGTH",
    "code_lengths",
    "canonical_codes",
    "decode_table",
    "kraft_sum",
    "validate_lengths",
]

#: Longest code any table may hold; decoders peek this many bits.
MAX_CODE_LENGTH = 12


def code_lengths(counts: np.ndarray | list[int], max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal code lengths for a histogram, limited to ``max_length`` bits.

    Args:
        counts: Non-negative occurrence count per symbol.
        max_length: Longest code allowed; ``2**max_length`` must be at least the number of
            used symbols.

    Returns:
        ``uint8`` array of code lengths, 0 for unused symbols. With fewer than two used
        symbols every length is 0 (nothing needs coding).

    Raises:
        ValueError: On negative counts or a limit too small for the alphabet.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size < 2:
        return lengths
    if used.size > (1 << max_length):
        raise ValueError(f"{used.size} used symbols do not fit codes of at most {max_length} bits")
    lengths[used] = _package_merge(counts[used], max_length)
    return lengths


def _package_merge(weights: np.ndarray, max_length: int) -> np.ndarray:
    """Package-merge (Larmore and Hirschberg) over the used symbols' weights."""
    n = weights.size
    # Leaves sorted by weight, ties by symbol index, so the result is deterministic.
    order = np.lexsort((np.arange(n), weights))
    leaf_w = weights[order]
    eye = np.eye(n, dtype=np.int64)[order]  # each leaf item counts one use of its symbol
    items_w, items_c = leaf_w, eye
    for _ in range(max_length - 1):
        pairs = items_w.size // 2
        pack_w = items_w[: 2 * pairs : 2] + items_w[1 : 2 * pairs : 2]
        pack_c = items_c[: 2 * pairs : 2] + items_c[1 : 2 * pairs : 2]
        merged_w = np.concatenate([leaf_w, pack_w])
        merged_c = np.concatenate([eye, pack_c])
        # Stable sort keeps leaves before packages of equal weight: deterministic.
        keep = np.argsort(merged_w, kind="stable")
        items_w, items_c = merged_w[keep], merged_c[keep]
    return items_c[: 2 * n - 2].sum(axis=0).astype(np.uint8)


def kraft_sum(lengths: np.ndarray) -> float:
    """Sum of 2**-length over used symbols: 1 for a complete prefix code."""
    used = lengths[lengths > 0].astype(np.float64)
    return float(np.sum(np.exp2(-used)))


def validate_lengths(lengths: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> None:
    """Check that stored lengths describe a complete prefix code (or no code).

    Raises:
        ValueError: If a length exceeds ``max_length``, or the used lengths do not form a
            complete prefix code.
    """
    lengths = np.asarray(lengths)
    if lengths.size and int(lengths.max()) > max_length:
        raise ValueError(f"code length {int(lengths.max())} exceeds the limit {max_length}")
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return
    if used.size == 1:
        raise ValueError("a code with a single used symbol is not allowed (stored as a fill)")
    # Exact Kraft equality in integers: sum 2**(max - l) == 2**max.
    if int(np.sum(np.left_shift(1, max_length - used))) != 1 << max_length:
        raise ValueError("code lengths do not form a complete prefix code")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for the given lengths (codes ordered by length, then symbol).

    Returns:
        ``uint32`` array of codes, 0 where the length is 0.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint32)
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    code, prev = 0, 0
    for sym in order.tolist():
        length = int(lengths[sym])
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def decode_table(lengths: np.ndarray, peek_bits: int = MAX_CODE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Single-symbol lookup table indexed by the next ``peek_bits`` bits of a stream.

    Returns:
        ``(symbols, lengths)``, both ``uint8`` arrays of ``2**peek_bits`` entries; a length of
        0 marks a bit pattern no codeword starts (only possible for incomplete codes).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    table_sym = np.zeros(1 << peek_bits, dtype=np.uint8)
    table_len = np.zeros(1 << peek_bits, dtype=np.uint8)
    for sym in np.flatnonzero(lengths).tolist():
        shift = peek_bits - int(lengths[sym])
        start = int(codes[sym]) << shift
        table_sym[start : start + (1 << shift)] = sym
        table_len[start : start + (1 << shift)] = lengths[sym]
    return table_sym, table_len
