"""Frequency tables of the rANS entropy stage, built from a symbol histogram.

The rANS coder (specified in :mod:`lctriton.kernels.reference`, section "rANS") codes each
symbol ``s`` with probability ``freqs[s] / 4096``. Only the frequencies are stored in a
file; the cumulative table and the decoder's slot table follow from them.

Conventions shared with the kernels:

* ``freqs`` has one entry per symbol of the alphabet (at most 256); unused symbols have 0,
  used ones at least 1, and the entries sum to exactly :data:`PROB_SCALE`.
* A histogram with a single used symbol has no code: :func:`quantize_frequencies` returns
  that symbol with all of ``PROB_SCALE`` and the codec stores the tensor as a fill.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PROB_BITS",
    "PROB_SCALE",
    "STATE_LOW",
    "quantize_frequencies",
    "cumulative",
    "slot_table",
    "coded_bits",
    "validate_frequencies",
    "fill_symbol",
]

#: Frequencies are in units of 2**-PROB_BITS.
PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
#: Lower end of the coder state's interval [STATE_LOW, STATE_LOW << 16); also the state the
#: encoder starts from and the decoder must end at.
STATE_LOW = 1 << 16


def quantize_frequencies(counts: np.ndarray | list[int]) -> np.ndarray:
    """Frequencies summing to :data:`PROB_SCALE`, close to proportional to ``counts``.

    Every used symbol gets at least 1. The rounding is integer-only and deterministic:
    floors first, the remainder to the largest fractional parts (lowest symbol first among
    equals); when the floors of 1 overshoot, the largest frequencies give units back.

    Args:
        counts: Non-negative occurrence count per symbol (at most 256 symbols, and at most
            :data:`PROB_SCALE` of them used).

    Returns:
        int64 array of the same length.

    Raises:
        ValueError: If a count is negative or too many symbols are used.
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative integers")
    used = c > 0
    nused = int(used.sum())
    if nused > PROB_SCALE:
        raise ValueError(f"at most {PROB_SCALE} symbols can be used, got {nused}")
    freqs = np.zeros(c.size, dtype=np.int64)
    if nused == 0:
        return freqs
    total = int(c.sum())
    if total < 1 << 50:  # counts * 4096 fits int64
        scaled = c * PROB_SCALE
        floors, remainders = scaled // total, scaled % total
    else:  # Python ints
        scaled_ints = [int(v) * PROB_SCALE for v in c.tolist()]
        floors = np.array([v // total for v in scaled_ints], dtype=np.int64)
        remainders = np.array([v % total for v in scaled_ints], dtype=object)
    freqs[:] = floors
    freqs[used & (freqs == 0)] = 1
    short = PROB_SCALE - int(freqs.sum())
    if short > 0:
        # Largest remainder first; a stable sort keeps the lowest symbol first among equals.
        candidates = np.flatnonzero(used)
        order = candidates[np.argsort(-remainders[candidates], kind="stable")]
        freqs[order[:short]] += 1
        short = PROB_SCALE - int(freqs.sum())
    while short < 0:
        # Overshoot from the minimum of 1: the largest frequencies give units back.
        order = sorted(np.flatnonzero(freqs > 1).tolist(), key=lambda s: -freqs[s])
        for s in order[: -short]:
            freqs[s] -= 1
        short = PROB_SCALE - int(freqs.sum())
    return freqs


def cumulative(freqs: np.ndarray) -> np.ndarray:
    """Start of each symbol's slot range: ``sum(freqs[:s])``."""
    f = np.asarray(freqs, dtype=np.int64)
    return np.concatenate(([0], np.cumsum(f)[:-1])).astype(np.int64)


def slot_table(freqs: np.ndarray) -> np.ndarray:
    """The symbol owning each of the :data:`PROB_SCALE` slots (uint8)."""
    f = np.asarray(freqs, dtype=np.int64)
    return np.repeat(np.arange(f.size, dtype=np.uint8), f)


def coded_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Ideal payload of a histogram under ``freqs``: ``sum(count * log2(4096 / f))``."""
    c = np.asarray(counts, dtype=np.float64)
    f = np.asarray(freqs, dtype=np.float64)
    used = c > 0
    return float((c[used] * (PROB_BITS - np.log2(f[used]))).sum())


def validate_frequencies(freqs: object, nsym: int) -> np.ndarray:
    """Check a frequency table read from a file.

    Raises:
        ValueError: Saying what is wrong.
    """
    if not isinstance(freqs, list) or len(freqs) != nsym:
        raise ValueError(f"'freqs' must list {nsym} frequencies")
    if not all(isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= PROB_SCALE for f in freqs):
        raise ValueError(f"'freqs' must hold ints from 0 to {PROB_SCALE}")
    if sum(freqs) != PROB_SCALE:
        raise ValueError(f"'freqs' must sum to {PROB_SCALE}, got {sum(freqs)}")
    return np.array(freqs, dtype=np.int64)


def fill_symbol(freqs: np.ndarray) -> int | None:
    """The only symbol of a one-symbol table (a fill), else None."""
    f = np.asarray(freqs)
    used = np.flatnonzero(f)
    return int(used[0]) if used.size == 1 else None

