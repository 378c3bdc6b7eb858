"""The rANS entropy coder as Triton kernels: chunked encode and decode of uint8 symbols.

Format (bit-exact twins: :func:`lctriton.kernels.reference.rans_encode` and
:func:`~lctriton.kernels.reference.rans_decode`): symbols are cut into chunks of
``chunk_symbols`` (the last one shorter), each coded independently by a static rANS coder
with 12-bit frequencies and a 32-bit state in ``[2**16, 2**32)``. The encoder starts at
``x = 2**16`` and codes the chunk's symbols last to first; a symbol ``s`` of frequency ``f``
and cumulative frequency ``c`` first emits the 16-bit word ``x & 0xFFFF`` and shifts
``x >>= 16`` when ``x >= f << 20``, then sets ``x = ((x // f) << 12) + x % f + c``. A chunk's
words are its final state (low half, then high half) followed by the emitted words in the
reverse of their emission order; the chunks' word runs are laid end to end and
``chunk_words`` records each run's length. The decoder undoes the steps in order:
``slot = x & 4095``, ``s = slot_table[slot]``, ``x = f * (x >> 12) + slot - c``, and one
word read ``x = x << 16 | word`` when ``x < 2**16``; a correct chunk ends with all its words
read and ``x == 2**16``.

Parallel layout: one lane per chunk, ``_LANES`` chunks side by side in one program; every
lane walks a constant ``CHUNK`` steps and lanes past their chunk's end (only a stream's last
chunk is shorter) are masked.

* ``_rans_encode_kernel`` reads each lane's first symbol, length and table from per-lane
  arrays, so one launch codes many streams with a table each (``rans_encode_streams``: the
  contexts of ``lc/3`` and ``lq/2`` records, with one host transfer for all of them). It
  writes each chunk's words into its own scratch region of ``CHUNK + 2`` words, from the
  region's end backwards, so that after the loop the chunk's stream is one contiguous range
  ending at the region's end; it returns each chunk's word count and whether it met a symbol
  of frequency 0.
* The launcher turns counts into output offsets (a prefix sum), and ``_rans_gather_kernel``
  (one program per chunk) copies each range to its place: every output word has exactly one
  writer, so the stream is deterministic.
* ``_rans_decode_kernel`` decodes one stream, returning each lane's final state and read
  position; the launcher checks them against the chunk table, so a corrupt stream is
  reported, never silently decoded. Word loads past the stream's end are masked.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from lctriton.kernels._runtime import check_device, check_tensor, interpreting
from lctriton.kernels.reference import (
    RANS_CORRUPT,
    RANS_LOW,
    RANS_ZERO_FREQUENCY,
    RansStream,
    _check_rans_table,
    check_chunk_symbols,
    rans_streams_input,
)

__all__ = ["rans_encode", "rans_encode_streams", "rans_decode", "RansStream"]

#: Chunks coded side by side by one program, and the warps that run them; performance only.
#: With one lane per chunk a stream has few lanes (10M symbols in chunks of 4096: 2442), so
#: small programs of one warp spread them over more multiprocessors.
_LANES = 32
_WARPS = 1
#: Words a gather program copies per step of its loop over a chunk's range.
_GATHER_BLOCK = 1024
# The kernels hard-code the format's constants: 12-bit frequencies (slot mask 4095, shifts
# by 12 and 20) and RANS_LOW = 2**16 (the start and end state, the renormalization bound).
#: The table size every kernel sees: symbols are bytes; missing entries are frequency 0.
_ALPHABET = 256


@triton.jit
def _word(v):
    """The low 16 bits of a uint32 as the int16 the streams hold."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _rans_encode_kernel(
    sym_ptr,  # *uint8: the symbols
    freq_ptr,  # *int32 [streams * 256]: frequency of each symbol in each stream (0: unused)
    cum_ptr,  # *int32 [streams * 256]: cumulative frequency of each symbol in each stream
    first_ptr,  # *int64 [nchunks]: each chunk's first symbol
    size_ptr,  # *int64 [nchunks]: each chunk's symbols (at most CHUNK)
    table_ptr,  # *int64 [nchunks]: each chunk's stream, whose table codes it
    scratch_ptr,  # *int16 [nchunks * (CHUNK + 2)]: out, each chunk's words at its region's end
    count_ptr,  # *int64 [nchunks]: out, words of each chunk
    bad_ptr,  # *int64 [nchunks]: out, 1 when the chunk holds a symbol of frequency 0
    nchunks,
    CHUNK: tl.constexpr,  # symbols per chunk: part of the format
    LANES: tl.constexpr,  # chunks per program: performance only
):
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = lane < nchunks
    first = tl.load(first_ptr + lane, mask=live, other=0)
    count = tl.load(size_ptr + lane, mask=live, other=0)
    table = tl.load(table_ptr + lane, mask=live, other=0) * 256
    # The region's end: words are written backwards from here, so that the last word emitted
    # (read first by the decoder) ends up lowest.
    top = (lane + 1) * (CHUNK + 2)
    wpos = top
    x = tl.full((LANES,), 65536, tl.uint32)  # RANS_LOW
    bad = tl.zeros((LANES,), dtype=tl.int64)
    # A constant bound: triton 3.6's interpreter cannot bound a loop by a runtime value;
    # lanes past their chunk's end are masked.
    for j in range(0, CHUNK):
        i = CHUNK - 1 - j
        act = live & (i < count)
        s = tl.load(sym_ptr + first + i, mask=act, other=0).to(tl.int64)
        f = tl.load(freq_ptr + table + s, mask=act, other=1).to(tl.uint32)
        c = tl.load(cum_ptr + table + s, mask=act, other=0).to(tl.uint32)
        bad = tl.maximum(bad, (act & (f == 0)).to(tl.int64))
        f = tl.where(f == 0, 1, f)  # no division by zero; the launcher raises for such chunks
        # f <= 4095, so f << 20 < 2**32: the limit fits the 32-bit state.
        emit = act & (x >= (f << 20))
        tl.store(scratch_ptr + wpos - 1, _word(x), mask=emit)
        wpos -= emit.to(tl.int64)
        x = tl.where(emit, x >> 16, x)
        q = x // f  # x < f << 20, so q < 2**20 and q << 12 < 2**32
        nx = (q << 12) + (x - q * f) + c
        x = tl.where(act, nx, x)
    # The final state goes right below the emitted words: low half first.
    tl.store(scratch_ptr + wpos - 1, _word(x >> 16), mask=live)
    tl.store(scratch_ptr + wpos - 2, _word(x), mask=live)
    tl.store(count_ptr + lane, top - wpos + 2, mask=live)
    tl.store(bad_ptr + lane, bad, mask=live)


@triton.jit
def _rans_gather_kernel(
    scratch_ptr,  # *int16 [nchunks * (CHUNK + 2)]: each chunk's words at its region's end
    count_ptr,  # *int64 [nchunks]: words of each chunk
    offset_ptr,  # *int64 [nchunks]: first output word of each chunk
    out_ptr,  # *int16 [total]: out, the stream
    SPAN: tl.constexpr,  # CHUNK + 2: the scratch region of a chunk
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + chunk)
    src = (chunk + 1) * SPAN - count
    dst = tl.load(offset_ptr + chunk)
    for j in range(0, SPAN, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        mask = offs < count
        w = tl.load(scratch_ptr + src + offs, mask=mask, other=0)
        tl.store(out_ptr + dst + offs, w, mask=mask)


@triton.jit
def _rans_decode_kernel(
    words_ptr,  # *int16 [nwords]: the stream
    start_ptr,  # *int64 [nchunks]: first word of each chunk
    freq_ptr,  # *int32 [256]: frequency of each symbol
    cum_ptr,  # *int32 [256]: cumulative frequency of each symbol
    slot_ptr,  # *uint8 [4096]: the symbol owning each slot
    out_ptr,  # *uint8 [n]: out, the symbols
    state_ptr,  # *int64 [nchunks]: out, each lane's final state
    pos_ptr,  # *int64 [nchunks]: out, each lane's final read position
    n,
    nchunks,
    nwords,
    CHUNK: tl.constexpr,
    LANES: tl.constexpr,
):
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = lane < nchunks
    pos = tl.load(start_ptr + lane, mask=live, other=0)
    # The launcher checked that every chunk holds at least its two state words.
    lo = tl.load(words_ptr + pos, mask=live, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi = tl.load(words_ptr + pos + 1, mask=live, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    x = lo | (hi << 16)
    pos += 2
    first = lane * CHUNK
    count = tl.where(live, tl.minimum(n - first, CHUNK), 0)
    for i in range(0, CHUNK):
        act = live & (i < count)
        slot = x & 4095
        s = tl.load(slot_ptr + slot.to(tl.int32), mask=act, other=0).to(tl.int32)
        f = tl.load(freq_ptr + s, mask=act, other=0).to(tl.uint32)
        c = tl.load(cum_ptr + s, mask=act, other=0).to(tl.uint32)
        # slot >= c (the slot lies in s's range) and f * (x >> 12) < 2**32: no wrap-around.
        nx = f * (x >> 12) + slot - c
        need = act & (nx < 65536)
        # A corrupt chunk may run past the stream's end: such loads are masked (they read 0,
        # as the reference's zero padding does) and the position check reports the chunk.
        w = tl.load(words_ptr + pos, mask=need & (pos < nwords), other=0)
        w = w.to(tl.uint16, bitcast=True).to(tl.uint32)
        nx = tl.where(need, (nx << 16) | w, nx)
        x = tl.where(act, nx, x)
        pos += need.to(tl.int64)
        tl.store(out_ptr + first + i, s.to(tl.uint8), mask=act)
    tl.store(state_ptr + lane, x.to(tl.int64), mask=live)
    tl.store(pos_ptr + lane, pos, mask=live)


def _table_array(freqs: object) -> np.ndarray:
    """``freqs`` as a host array, refusing non-integer types (the values are checked later)."""
    if isinstance(freqs, torch.Tensor):
        if freqs.dtype.is_floating_point or freqs.dtype.is_complex or freqs.dtype == torch.bool:
            raise TypeError(f"freqs must hold integers, got {freqs.dtype}")
        return freqs.detach().cpu().numpy()
    arr = np.asarray(freqs)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"freqs must hold integers, got {arr.dtype}")
    return arr


def _device_tables(f: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency and cumulative tables padded to 256 entries (int32) on ``device``: one
    table for a 1-D ``f``, one after the other for the rows of a 2-D one."""
    rows = np.atleast_2d(f)
    freq = np.zeros((rows.shape[0], _ALPHABET), dtype=np.int32)
    freq[:, : rows.shape[1]] = rows
    cum = np.zeros_like(freq)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    return torch.from_numpy(freq.reshape(-1)).to(device), torch.from_numpy(cum.reshape(-1)).to(device)


def _launch_options() -> dict:
    # num_warps means nothing to the interpreter; on a GPU one warp holds _LANES lanes.
    return {} if interpreting() else {"num_warps": _WARPS}


def rans_encode(
    symbols: torch.Tensor, freqs: torch.Tensor | np.ndarray, chunk_symbols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """rANS-code uint8 symbols in independent chunks on the GPU (or in the interpreter).

    See :func:`lctriton.kernels.reference.rans_encode` for the format.

    Args:
        symbols: uint8 tensor of symbols, any shape (read flat).
        freqs: Frequency of each symbol (at most 256 integers summing to 4096, at least two
            nonzero; every symbol that occurs must have a nonzero frequency).
        chunk_symbols: Symbols per chunk, a power of two from 64 to 65536.

    Returns:
        ``(words, chunk_words)`` on the symbols' device: the stream as an int16 tensor of
        16-bit words, and the number of words of each chunk (int64).

    Raises:
        TypeError: If ``symbols`` is not a uint8 tensor or ``freqs`` does not hold integers.
        ValueError: If the table or ``chunk_symbols`` is invalid, a symbol has frequency 0,
            or the kernels cannot run where the symbols are.
    """
    if not isinstance(symbols, torch.Tensor):
        raise TypeError(f"symbols must be a tensor, got {type(symbols).__name__}")
    if symbols.dtype != torch.uint8:
        raise TypeError(f"symbols must be uint8, got {symbols.dtype}")
    chunk = check_chunk_symbols(chunk_symbols)
    f = _check_rans_table(_table_array(freqs))
    flat = check_tensor("symbols", symbols)
    return _encode_streams(flat, np.array([0]), np.array([flat.numel()]), f[None, :], chunk)[0]


def rans_encode_streams(
    symbols: torch.Tensor, spans: list[tuple[int, int]], freqs: object, chunk_symbols: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rANS-code several streams of one symbol tensor, each with its own table, in one launch
    on the GPU (or in the interpreter).

    See :func:`lctriton.kernels.reference.rans_encode_streams` for the arguments, the
    result (on the symbols' device) and the errors; the kernels also raise ValueError when
    they cannot run where the symbols are.
    """
    if not isinstance(symbols, torch.Tensor):
        raise TypeError(f"symbols must be a tensor, got {type(symbols).__name__}")
    flat, starts, counts, tables = rans_streams_input(symbols, spans, freqs, chunk_symbols)
    return _encode_streams(check_tensor("symbols", flat), starts, counts, tables, chunk_symbols)


def _encode_streams(
    flat: torch.Tensor, starts: np.ndarray, sizes: np.ndarray, tables: np.ndarray, chunk: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Code stream ``j`` (``sizes[j]`` symbols of ``flat`` from ``starts[j]``) with table
    ``tables[j]``: every chunk of every stream is a lane of one launch, then one host
    transfer reads the words each chunk took."""
    dev = flat.device
    chunks = -(-sizes // chunk)
    nchunks = int(chunks.sum())
    if nchunks == 0:
        words = torch.zeros(0, dtype=torch.int16, device=dev)
        return [(words, torch.zeros(0, dtype=torch.int64, device=dev)) for _ in range(sizes.size)]
    stream = np.repeat(np.arange(sizes.size), chunks)
    k = np.arange(nchunks) - np.repeat(np.cumsum(chunks) - chunks, chunks)  # chunk within its stream
    first = starts[stream] + k * chunk
    size = np.minimum(sizes[stream] - k * chunk, chunk)
    lanes = torch.from_numpy(np.stack((first, size, stream)).astype(np.int64)).to(dev)
    freq, cum = _device_tables(tables, dev)
    scratch = torch.empty(nchunks * (chunk + 2), dtype=torch.int16, device=dev)
    counts = torch.empty(nchunks, dtype=torch.int64, device=dev)
    bad = torch.empty(nchunks, dtype=torch.int64, device=dev)
    _rans_encode_kernel[(triton.cdiv(nchunks, _LANES),)](
        flat, freq, cum, lanes[0], lanes[1], lanes[2], scratch, counts, bad, nchunks,
        CHUNK=chunk, LANES=_LANES, **_launch_options(),
    )
    # One transfer for both: the words of each chunk and whether a symbol had frequency 0.
    host = torch.cat((counts, bad.sum().view(1))).cpu().numpy()
    if host[-1]:
        raise ValueError(RANS_ZERO_FREQUENCY)
    chunk_ends = np.cumsum(host[:-1])
    offsets = torch.from_numpy(chunk_ends - host[:-1]).to(dev)
    words = torch.empty(int(chunk_ends[-1]), dtype=torch.int16, device=dev)
    block = min(_GATHER_BLOCK, triton.next_power_of_2(chunk + 2))
    _rans_gather_kernel[(nchunks,)](scratch, counts, offsets, words, SPAN=chunk + 2, BLOCK=block)
    bounds = np.concatenate(([0], np.cumsum(chunks))).tolist()
    word_at = np.concatenate(([0], chunk_ends)).tolist()
    return [
        (words[word_at[c0] : word_at[c1]], counts[c0:c1])
        for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _stream_words(item: RansStream) -> torch.Tensor:
    words = item.words
    if not isinstance(words, torch.Tensor) or words.dtype not in (torch.int16, torch.uint16):
        raise TypeError("a stream's words must be an int16 tensor")
    return words.contiguous().reshape(-1).view(torch.int16)


def rans_decode(
    items: list[RansStream], chunk_symbols: int, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """Decode rANS streams on the GPU (or in the interpreter), one launch per stream.

    Args:
        items: The streams (see :func:`lctriton.kernels.reference.rans_encode` for the format).
        chunk_symbols: Symbols per chunk, shared by all items.
        device: Where to decode; by default the device of each item's words.

    Returns:
        One flat uint8 tensor of symbols per item, on its decode device.

    Raises:
        TypeError: If a stream's words are not an int16 tensor.
        ValueError: If a table is invalid, a stream does not match its chunk table, a chunk
            does not end with every word read and the state back at ``2**16`` (a corrupt or
            truncated stream), or the device cannot run kernels.
    """
    chunk = check_chunk_symbols(chunk_symbols)
    tables = [_check_rans_table(it.freqs) for it in items]
    # Every item is checked, as the reference does, before any is decoded.
    plans = []
    for it in items:
        counts = np.asarray(it.chunk_words.cpu().numpy(), dtype=np.int64)
        nchunks = -(-it.numel // chunk)
        if counts.size != nchunks:
            raise ValueError(
                f"a stream of {it.numel} symbols needs {nchunks} chunks, "
                f"its table lists {counts.size}"
            )
        if (counts < 2).any():
            raise ValueError("every chunk holds at least its two state words")
        words = _stream_words(it)
        if int(counts.sum()) != words.numel():
            raise ValueError("the stream's length does not match its chunk table")
        dev = torch.device(device) if device is not None else words.device
        check_device("the decode device", torch.empty(0, device=dev))
        plans.append((words, counts, dev))
    out = []
    for it, f, (words, counts, dev) in zip(items, tables, plans, strict=True):
        n = it.numel
        result = torch.empty(n, dtype=torch.uint8, device=dev)
        if n == 0:
            out.append(result)
            continue
        nchunks = counts.size
        ends = np.cumsum(counts)
        starts = torch.from_numpy(ends - counts).to(dev)
        freq, cum = _device_tables(f, dev)
        slots = torch.from_numpy(np.repeat(np.arange(f.size, dtype=np.uint8), f)).to(dev)
        state = torch.empty(nchunks, dtype=torch.int64, device=dev)
        pos = torch.empty(nchunks, dtype=torch.int64, device=dev)
        words = words.to(dev)
        _rans_decode_kernel[(triton.cdiv(nchunks, _LANES),)](
            words, starts, freq, cum, slots, result, state, pos, n, nchunks, words.numel(),
            CHUNK=chunk, LANES=_LANES, **_launch_options(),
        )
        ok = (state == RANS_LOW) & (pos == torch.from_numpy(ends).to(dev))
        if not bool(ok.all()):
            raise ValueError(RANS_CORRUPT)
        out.append(result)
    return out

