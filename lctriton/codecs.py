"""Tensor codecs: what each tensor record in a container says, and how it is coded.

Nine codecs exist (``docs/format.md`` has every field):

``raw/1``
    The tensor's bytes as they are in memory (C order, little-endian). Used for tiny exact
    tensors and when exact coding is turned off.

``bp/1``
    Lossless byte planes: byte ``j`` of every element forms plane ``j``; each plane is
    rANS-coded with its own frequency table, or stored raw when coding would not save, or
    is a fill. Against a base, the planes are those of ``x XOR base``. Used for exact
    tensors: integers, key checkpoints, tensors matching an exact pattern, lossless mode.

``lc/1``
    Closed-loop LC-Checkpoint: exponent-bucketed delta against a base, Huffman-coded in
    independent chunks. ``lctriton.kernels.reference`` specifies its bytes. The record holds
    the representatives (as float32 bit patterns), the code lengths, the chunk size, the
    number of exceptions, the bound on the quantization error and the base's fingerprint;
    its payload holds, each part starting on an 8-byte boundary: the uint32 bit length of
    every chunk, the stream's 64-bit words, the int64 indices of the exceptions and their
    exact values.

``lc/2``
    ``lc/1``'s symbols, rANS-coded (``reference.rans_encode``): below one bit per element
    where one symbol dominates. The record has rANS frequencies instead of code lengths;
    the payload has the uint32 word count of every chunk and the 16-bit words.

``lc/3``
    ``lc/1``'s symbols, grouped by a context read from the base's Adam moments of the same
    parameter (the sign of ``exp_avg`` and the octave of ``|exp_avg| / sqrt(exp_avg_sq)``,
    from their float32 bit patterns alone): the elements of each context, in index order,
    form one rANS stream with a table of its own. Adam moves a weight by ``-lr * m /
    sqrt(v)``, so a context predicts the sign and size of the delta; the decoder holds the
    base and recomputes the grouping. The record names the two base tensors and their
    fingerprints.

``lq/1``
    Log-domain quantization for optimizer moments (``reference.lq_symbols``): each value
    becomes the bin of its sign, exponent and top mantissa bits, or keeps the base scaled by
    ``scale`` (Adam's decay over the steps between the checkpoints) where that falls in the
    same bin. Relative error is bounded by the bin width, so a second moment never drops to
    zero under a nonzero first moment. Symbols are rANS-coded as in ``lc/2``.

``lq/2``
    ``lq/1``'s symbols, grouped as ``lc/3`` groups its own, by the binade of each element's
    base (``reference.binade_contexts``): a moment's next value stays close to its base, so
    the base's binade predicts the value's bin. The record adds the binade the contexts are
    centred on and one rANS table per context.

``sq/1``
    Adam first moments in units of the step they cause (``reference.sq_symbols``): each value
    ``m`` becomes the level ``rint((m - scale * b) / sqrt(v) * 2**precision)``, where ``b`` is
    the base's first moment and ``v`` the second moment of the same parameter as the same
    file restores it. Adam moves a weight by ``lr * m / sqrt(v)``, so the restored step of
    every element is within half a level of the saved one, however small its gradients;
    ``lq/1``'s relative bins spend as many bits on elements whose step is negligible. Levels
    are rANS-coded as in ``lc/2``; the record names the second moment, decoded first.

``sq/2``
    ``sq/1``'s levels, grouped as ``lc/3`` groups its symbols, by the context the base's
    moments of the same parameter give (``reference.moment_contexts`` of the base's first
    and second moment): the sign and octave of ``m / sqrt(v)`` in the base predict those of
    the next level while gradients keep their direction, early in training above all. The
    record has ``sq/1``'s fields (but for the single table) and ``lc/3``'s context fields.

Planning the buckets and the Huffman code uses the histogram of pass 1 only: the data never
comes back to the host between the passes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lctriton import backend, huffman, rans
from lctriton.errors import FormatError
from lctriton.kernels import reference

__all__ = [
    "RAW",
    "LC",
    "LC2",
    "LC3",
    "LQ",
    "LQ2",
    "SQ",
    "SQ2",
    "BP",
    "plan_log_buckets",
    "encode_lq",
    "encode_sq",
    "encode_bp",
    "DTYPES",
    "BucketPlan",
    "plan_buckets",
    "EncodedTensor",
    "FingerprintCache",
    "base_fingerprint",
    "encode_raw",
    "encode_lc",
    "validate_record",
    "payload_layout",
]

_FINGERPRINT = re.compile("[0-9a-f]{16}")

RAW = "raw/1"
LC = "lc/1"
LC2 = "lc/2"
LQ = "lq/1"
BP = "bp/1"
LC3 = "lc/3"
LQ2 = "lq/2"
SQ = "sq/1"
SQ2 = "sq/2"
#: Codecs whose symbols are one rANS stream.
RANS_CODECS = (LC2, LQ, SQ)
#: Codecs whose symbols are grouped by a context read from the base, one rANS stream each.
CONTEXT_CODECS = (LC3, LQ2, SQ2)
#: Codecs of first moments in units of ``sqrt(v)``: their records name a norm, decoded first.
SCALED_CODECS = (SQ, SQ2)
#: Codecs whose contexts are :func:`reference.moment_contexts` of two base tensors they name.
MOMENT_CONTEXT_CODECS = (LC3, SQ2)
ALL_CODECS = (RAW, BP, LC, LC2, LC3, LQ, LQ2, SQ, SQ2)
#: Codecs that code a floating tensor lossily.
LOSSY_CODECS = (LC, LC2, LC3, LQ, LQ2, SQ, SQ2)
#: Codecs whose records name a base.
DELTA_CODECS = (LC, LC2, LC3, LQ, LQ2, SQ, SQ2, BP)
#: Mantissa bits of an lq/1 bin: 2**precision bins per octave.
MAX_LOG_PRECISION = 4
#: With ``coder="auto"``, rANS is used where it saves at least this fraction of the Huffman
#: payload: elsewhere Huffman is within a few percent of the entropy and codes faster.
RANS_MIN_SAVING = 0.10
#: Contexts of ``lc/3`` (``reference.moment_contexts``).
NUM_CONTEXTS = reference.NUM_CONTEXTS
#: Contexts of ``lq/2`` (``reference.binade_contexts``).
NUM_BINADE_CONTEXTS = reference.NUM_BINADE_CONTEXTS
#: With ``coder="auto"``, ``lc/3`` is used where it saves at least this fraction of the
#: cheaper of ``lc/1`` and ``lc/2``, by the histograms (its tables cost more record bytes);
#: ``lq/2`` where it saves this much of ``lq/1``.
CONTEXT_MIN_SAVING = 0.05
#: The coders under which a moment with a base is ``lq/2`` where the sample says it pays.
BINADE_CODERS = ("auto", "context")

#: dtype name in a file -> torch dtype. Only these can be stored.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_LOSSY_NAMES = {DTYPE_NAMES[d] for d in reference.LOSSY_DTYPES}


@dataclasses.dataclass
class BucketPlan:
    """The host-side tables of one lossy tensor, built from its pass-1 histogram."""

    key_to_symbol: np.ndarray  # uint8[NUM_FINE_KEYS]
    representatives: np.ndarray  # float32[nsym], symbol 0 is -0.0
    symbol_counts: np.ndarray  # int64[nsym]
    error_bound: float  # max |d - q(d)| over the delta, before rounding to the dtype


def _bucket_mean(key: int, fine_counts: np.ndarray) -> float:
    """Mean of a bucket, each element at the middle of its fine key's mantissa interval."""
    sign = -1.0 if key >> 8 else 1.0
    sixteenths = np.arange(reference.FINE_PER_KEY, dtype=np.float64) + 0.5
    fraction = float(np.dot(fine_counts, sixteenths)) / float(fine_counts.sum()) / reference.FINE_PER_KEY
    return sign * math.ldexp(1.0 + fraction, (key & 0xFF) - 127)


def plan_buckets(histogram: np.ndarray, bits: int, floor_exponent: int = 1) -> BucketPlan:
    """Priority promotion: keep the ``2**bits - 1`` largest finite (sign, exponent) buckets.

    Args:
        histogram: int64 array of ``NUM_FINE_KEYS`` counts from pass 1.
        bits: Symbol width.
        floor_exponent: The smallest exponent field a kept bucket may have: buckets below it
            are dropped (symbol 0) whatever their rank, so every dropped delta is below
            ``2**(floor_exponent - 127)``. 1 (the default) keeps every normal exponent.

    Returns:
        The bucket plan.
    """
    fine = np.asarray(histogram, dtype=np.int64).reshape(reference.NUM_KEYS, reference.FINE_PER_KEY)
    counts = fine.sum(axis=1)
    keys = np.arange(reference.NUM_KEYS)
    exponent = keys & 0xFF
    # Zeros and subnormals (exponent field 0) are never promoted: they decode to zero.
    finite = (counts > 0) & (exponent != reference.NONFINITE_EXPONENT) & (exponent != 0)
    candidates = keys[finite & (exponent >= floor_exponent)]
    # Largest exponent first; the positive sign first among equals.
    order = candidates[np.lexsort((candidates >> 8, -exponent[candidates]))]
    kept = order[: (1 << bits) - 1]
    # Dropped: ranked past the kept ones, or below the floor.
    dropped = np.setdiff1d(keys[finite], kept)
    key_to_symbol = np.zeros(reference.NUM_KEYS, dtype=np.uint8)
    key_to_symbol[kept] = np.arange(1, kept.size + 1, dtype=np.uint8)
    # Symbol 0 decodes to -0.0: base + (-0.0) is the base itself, bit for bit (signed zeros
    # included), so unchanged and dropped elements restore exactly to their base.
    reps = np.zeros(kept.size + 1, dtype=np.float32)
    reps[0] = -0.0
    for s, key in enumerate(kept.tolist(), start=1):
        reps[s] = np.float32(_bucket_mean(key, fine[key]))
    symbol_counts = np.zeros(kept.size + 1, dtype=np.int64)
    symbol_counts[1:] = counts[kept]
    symbol_counts[0] = int(counts.sum()) - int(symbol_counts[1:].sum())
    # Within a kept bucket of exponent field e the error is below one step 2**(e-127);
    # a dropped value of exponent field e is below 2**(e-126).
    bound = 0.0
    if kept.size:
        bound = math.ldexp(1.0, int(exponent[kept].max()) - 127)
    if dropped.size:
        bound = max(bound, math.ldexp(1.0, max(int(exponent[dropped].max()), 1) - 126))
    if counts[exponent == 0].sum():  # subnormal deltas (below 2**-126) decode to zero
        bound = max(bound, math.ldexp(1.0, -126))
    return BucketPlan(np.repeat(key_to_symbol, reference.FINE_PER_KEY), reps, symbol_counts, bound)


def base_fingerprint(tensor: torch.Tensor) -> str:
    """A base tensor's fingerprint as records hold it: 16 lowercase hex digits."""
    return f"{backend.fingerprint(tensor):016x}"


class FingerprintCache:
    """:func:`base_fingerprint`, each tensor's computed once while the cache lives.

    One encode names a base moment twice: the moment's own ``lq`` record has it as its base,
    and its parameter's ``lc/3`` record as a context. The cache keys a tensor by where its
    data lies, its layout and its version counter (which in-place writes advance), and keeps
    every tensor it has seen alive, so no other tensor can take that memory while it lives.
    Safe to call from the pipeline's threads.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, tensor: torch.Tensor) -> str:
        t = tensor
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t._version)
        with self._lock:
            hit = self._seen.get(key)
        if hit is not None:
            return hit[1]
        value = base_fingerprint(tensor)
        with self._lock:
            self._seen[key] = (tensor, value)
        return value


@dataclasses.dataclass
class EncodedTensor:
    """A tensor's record (JSON-ready), its payload parts and, for deltas, its reconstruction."""

    record: dict[str, Any]
    parts: list[np.ndarray]
    reconstruction: torch.Tensor | None = None
    #: For tensors coded on a GPU: the event after which ``parts`` (pinned host memory
    #: filled by a side stream) hold their bytes. Writers call :meth:`wait_ready` first.
    ready: Any = None

    def wait_ready(self) -> None:
        """Block until the payload's bytes are on the host."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def nbytes(self) -> int:
        """Payload bytes, including the padding of each part to 8 bytes."""
        return sum(_pad8(p.nbytes) for p in self.parts)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _as_bytes_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 numpy array (no copy when already contiguous on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def encode_raw(tensor: torch.Tensor) -> EncodedTensor:
    """Store a tensor exactly."""
    record = {"codec": RAW, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
    return EncodedTensor(record, [_as_bytes_array(tensor)])


def _huffman_bits(counts: np.ndarray, lengths: np.ndarray, nchunks: int) -> float:
    """Huffman payload in bits: the codes plus, per chunk, half a word of padding and the
    32-bit chunk length."""
    return float((counts * lengths).sum()) + nchunks * (32 + 32)


def _rans_bits(counts: np.ndarray, freqs: np.ndarray, nchunks: int) -> float:
    """rANS payload in bits: the ideal code plus, per chunk, the 32-bit final state, half a
    word of padding and the 32-bit word count."""
    return rans.coded_bits(counts, freqs) + nchunks * (32 + 8 + 32)


def choose_coder(counts: np.ndarray, lengths: np.ndarray, freqs: np.ndarray, nchunks: int, coder: str) -> str:
    """``"huffman"`` or ``"rans"`` for a symbol histogram under ``coder`` (see
    :data:`lctriton.config.CODERS`)."""
    if coder != "auto":
        return coder
    huff = _huffman_bits(counts, lengths, nchunks)
    return "rans" if _rans_bits(counts, freqs, nchunks) <= (1.0 - RANS_MIN_SAVING) * huff else "huffman"


def _exceptions(x: torch.Tensor, b: torch.Tensor | None, recon: torch.Tensor, hist: np.ndarray, nonfinite: bool):
    """Exceptions exist only where the delta (or value) is non-finite, which its key tells,
    or the reconstruction overflowed; both flags are free."""
    per_key = hist.reshape(reference.NUM_KEYS, reference.FINE_PER_KEY).sum(axis=1)
    nonfinite_keys = per_key[reference.NONFINITE_EXPONENT :: 256].sum() > 0
    if not (nonfinite_keys or nonfinite):
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=x.dtype)
    exc_index, exc_values = reference.lc_exceptions(x, b, recon)
    recon[exc_index.to(recon.device)] = exc_values.to(recon.device)
    return exc_index, exc_values


def _host_parts(tensors: list[torch.Tensor], dtypes: list[Any]) -> tuple[list[np.ndarray], Any]:
    """Payload parts on the host: CUDA tensors go through pinned buffers on a side stream,
    so only compressed bytes cross and the copy overlaps whatever the caller launches next."""
    if tensors and tensors[0].device.type == "cuda":
        hosts, ready = _to_pinned_host(tensors)
        return [h.numpy().view(d) for h, d in zip(hosts, dtypes, strict=True)], ready
    return [t.cpu().numpy().view(d) for t, d in zip(tensors, dtypes, strict=True)], None


def _stream_coded(
    record: dict, symbols: torch.Tensor, counts: np.ndarray, chunk_symbols: int, **fields: Any
) -> tuple[list[np.ndarray], Any]:
    """Finish a record whose symbols are one rANS stream (``lc/2``, ``lq/1``, ``sq/1``): its
    ``fields``, its table (``freqs``), fill symbol and word count; returns its stream parts
    for the host (chunk word counts, words). An empty stream is a fill of symbol 0 (a table
    must sum to its scale)."""
    if not np.any(counts):
        counts = np.zeros(len(counts), dtype=np.int64)
        counts[0] = 1
    freqs = rans.quantize_frequencies(counts)
    fill = rans.fill_symbol(freqs)
    dev = symbols.device
    if fill is not None or symbols.numel() == 0:
        fill = 0 if fill is None else fill
        nchunks = -(-symbols.numel() // chunk_symbols)
        words = torch.zeros(0, dtype=torch.int16, device=dev)
        chunk_words = torch.zeros(nchunks, dtype=torch.int64, device=dev)
    else:
        words, chunk_words = backend.rans_encode(symbols, torch.from_numpy(freqs).to(dev), chunk_symbols)
    record.update(fields, freqs=freqs.tolist(), fill=fill, words=int(words.numel()))
    return _host_parts([chunk_words.to(torch.int32), words], [np.uint32, np.uint16])


def _context_bits(joint: np.ndarray, chunk_symbols: int) -> float:
    """``lc/3`` or ``lq/2`` payload in bits for per-context symbol counts (``[contexts,
    nsym]``), with each streamed context's table priced as it is written in the record
    (about 40 bits an entry). Each context is priced at its empirical entropy, in one numpy
    pass over the table: rANS's 12-bit frequencies cost a fraction of a percent more, far
    inside :data:`CONTEXT_MIN_SAVING`."""
    c = np.asarray(joint, dtype=np.float64)  # counts, or a sample's scaled up
    n = c.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ideal = np.where(c > 0, c * np.log2(n / c), 0.0).sum(axis=1)
    chunks = np.ceil(n[:, 0] / chunk_symbols)
    streamed = np.count_nonzero(c, axis=1) >= 2  # empty contexts and fills cost nothing
    return float((ideal + chunks * (32 + 8 + 32) + 40 * c.shape[1])[streamed].sum())


def _context_streams(
    symbols: torch.Tensor, contexts: torch.Tensor, joint: np.ndarray, chunk_symbols: int
) -> tuple[list[dict], list[torch.Tensor]]:
    """Code the symbols of each context as one rANS stream: the context tables of an
    ``lc/3`` or ``lq/2`` record (one per row of ``joint``) and its stream parts (chunk word
    counts, words; per streamed context). All streams are coded in one backend call."""
    grouped = backend.group_by_context(contexts, symbols)
    tables: list[dict] = []
    spans: list[tuple[int, int]] = []
    freqs: list[np.ndarray] = []
    start = 0
    for counts in joint:
        n = int(counts.sum())
        if n == 0:
            tables.append({"count": 0})
            continue
        f = rans.quantize_frequencies(counts)
        fill = rans.fill_symbol(f)
        if fill is not None:
            tables.append({"count": n, "fill": fill})
        else:
            tables.append({"count": n, "freqs": f.tolist()})
            spans.append((start, n))
            freqs.append(f)
        start += n
    parts: list[torch.Tensor] = []
    if spans:
        coded = [t for t in tables if "freqs" in t]
        streams = backend.rans_encode_streams(grouped, spans, np.stack(freqs), chunk_symbols)
        for table, (words, chunk_words) in zip(coded, streams, strict=True):
            table["words"] = int(words.numel())
            parts += [chunk_words.to(torch.int32), words]
    return tables, parts


def _context_coded(
    record: dict, symbols: torch.Tensor, contexts: torch.Tensor, joint: np.ndarray, chunk_symbols: int, **fields: Any
) -> tuple[list[np.ndarray], Any]:
    """Finish a context-coded record (``lc/3``, ``lq/2``, ``sq/2``): its ``fields``, then its
    context tables; returns its stream parts for the host (see :func:`_context_streams`)."""
    tables, stream_parts = _context_streams(symbols, contexts, joint, chunk_symbols)
    record.update(fields, tables=tables)
    return _host_parts(stream_parts, [np.uint32, np.uint16] * (len(stream_parts) // 2))


def _context_field(
    context: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]], fingerprint: Callable[[torch.Tensor], str]
) -> list[dict]:
    """The ``context`` field of ``lc/3`` and ``sq/2``: the base's two moments, by name and
    fingerprint."""
    return [{"name": name, "base": fingerprint(t)} for name, t in context]


def _moments_pay(
    x: torch.Tensor,
    b: torch.Tensor | None,
    lut: torch.Tensor,
    reps: torch.Tensor,
    context: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]],
    plain: float,
    chunk_symbols: int,
) -> bool:
    """Whether ``lc/3`` saves at least :data:`CONTEXT_MIN_SAVING` of ``plain`` (the cheaper of
    ``lc/1`` and ``lc/2``, exact), as the :data:`SCALE_SAMPLE` strided elements (all, for a
    smaller tensor) estimate it: their symbols and contexts, priced at their entropies scaled
    to the tensor. Deciding on the sample keeps the full symbol and context passes off
    tensors that stay ``lc/1`` or ``lc/2``."""
    sym, _, _ = backend.lc_symbols(_strided(x), None if b is None else _strided(b), lut, reps)
    ctx = backend.moment_contexts(_strided(context[0][1]), _strided(context[1][1]))
    nsym = reps.numel()
    joint = backend.context_histogram(ctx.cpu(), sym.cpu(), nsym).numpy() * (x.numel() / sym.numel())
    return _context_bits(joint, chunk_symbols) <= (1.0 - CONTEXT_MIN_SAVING) * plain


def encode_lc(
    tensor: torch.Tensor,
    base: torch.Tensor | None,
    bits: int,
    chunk_symbols: int,
    coder: str = "huffman",
    context: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]] | None = None,
    fingerprint: Callable[[torch.Tensor], str] = base_fingerprint,
    delta_floor: int | None = None,
) -> EncodedTensor:
    """Code a floating tensor lossily against ``base`` (or zeros) with ``lc/1``, ``lc/2`` or
    ``lc/3``.

    Args:
        tensor: The tensor.
        base: Its base, or None.
        bits: Symbol width.
        chunk_symbols: Symbols per chunk.
        coder: ``"huffman"`` (lc/1), ``"rans"`` (lc/2), ``"context"`` (lc/3 where ``context``
            is given, else lc/2) or ``"auto"``: lc/3 where it saves at least
            :data:`CONTEXT_MIN_SAVING` of the cheaper of the others (estimated on a strided
            sample: :func:`_moments_pay`), else rANS where it saves at least
            :data:`RANS_MIN_SAVING` of the Huffman payload, by the histogram.
        context: ``((name, exp_avg), (name, exp_avg_sq))``: the base's Adam moments of this
            parameter (dotted names in the base state, tensors with as many elements), which
            ``lc/3`` groups the symbols by.
        fingerprint: Fingerprints the base and the context tensors for the record (a
            :class:`FingerprintCache` shares them between the records of one encode).
        delta_floor: With a base, deltas below ``2**-delta_floor`` times the base's typical
            magnitude are dropped (:func:`delta_floor_exponent`); None keeps every bucket
            ``bits`` allows.

    Returns:
        The encoded tensor; ``reconstruction`` is what a decoder restores, in the tensor's
        shape, dtype and device.
    """
    x = tensor.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    b = None
    if base is not None:
        b = base.detach().to(x.device)
        b = b.contiguous()
    hist = backend.lc_histogram(x, b).cpu().numpy()
    plan = plan_buckets(hist, bits, delta_floor_exponent(b, delta_floor))
    lengths = huffman.code_lengths(plan.symbol_counts)
    nchunks = -(-x.numel() // chunk_symbols)
    dev = x.device
    lut = torch.from_numpy(plan.key_to_symbol).to(dev)
    reps = torch.from_numpy(plan.representatives).to(dev)
    record = {
        "codec": LC,
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "bits": bits,
        "chunk": chunk_symbols,
        "reps": plan.representatives.view(np.uint32).tolist(),
    }
    symbols = contexts = None
    if lengths.any():
        freqs = rans.quantize_frequencies(plan.symbol_counts)
        plain = min(_huffman_bits(plan.symbol_counts, lengths, nchunks), _rans_bits(plan.symbol_counts, freqs, nchunks))
        if context is not None and (coder == "context" or (coder == "auto" and _moments_pay(x, b, lut, reps, context, plain, chunk_symbols))):
            symbols, recon, nonfinite = backend.lc_symbols(x, b, lut, reps)
            contexts = backend.moment_contexts(context[0][1].to(dev), context[1][1].to(dev))
            joint = backend.context_histogram(contexts, symbols, plan.representatives.size).cpu().numpy()
        coder = choose_coder(plan.symbol_counts, lengths, freqs, nchunks, "rans" if coder == "context" else coder)
    else:
        coder = "huffman"  # a fill: no stream either way
    if contexts is not None:
        parts, ready = _context_coded(record, symbols, contexts, joint, chunk_symbols,
                                      codec=LC3, context=_context_field(context, fingerprint))
        del symbols, contexts
    elif coder == "rans":
        if symbols is None:
            symbols, recon, nonfinite = backend.lc_symbols(x, b, lut, reps)
        parts, ready = _stream_coded(record, symbols, plan.symbol_counts, chunk_symbols, codec=LC2)
        del symbols
    else:
        fill = None
        if not lengths.any():
            used = np.flatnonzero(plan.symbol_counts)
            fill = int(used[0]) if used.size else 0
        stream, chunk_bits, recon, nonfinite = backend.lc_encode(
            x, b, lut, reps, torch.from_numpy(lengths).to(dev), chunk_symbols
        )
        record.update(lengths=lengths.tolist(), fill=fill, words=int(stream.numel()))
        parts, ready = _host_parts([chunk_bits.to(torch.int32), stream], [np.uint32, np.int64])
    exc_index, exc_values = _exceptions(x, b, recon, hist, nonfinite)
    record.update(
        exceptions=int(exc_index.numel()),
        bound=plan.error_bound,
        base=None if b is None else fingerprint(b),
    )
    parts += [exc_index.cpu().numpy(), _as_bytes_array(exc_values)]
    return EncodedTensor(record, parts, recon.view(x.shape), ready)


def plan_log_buckets(histogram: np.ndarray, precision: int) -> BucketPlan:
    """Bins of constant relative width for ``lq/1``, from the fine-key histogram of the values.

    A bin is a (sign, exponent, top ``precision`` mantissa bits) triple, ``2**precision``
    bins per octave. The 255 most populated bins with a finite, nonzero exponent field
    become symbols 1, 2, ... (by key order); zeros and subnormals of each sign get a symbol
    decoding to a signed zero; every other fine key (rarer bins, non-finite values) takes the
    symbol of the nearest kept bin of its sign (the zero of its sign when none is kept).
    Each symbol's value is the mean of its bin,
    every element at the middle of its fine key's interval.

    Args:
        histogram: int64 counts of the values' ``NUM_FINE_KEYS`` fine keys (pass 1 without
            a base).
        precision: Mantissa bits per bin, 0 to :data:`MAX_LOG_PRECISION`.

    Returns:
        The plan (``error_bound`` is the largest relative error of a kept bin, 2**-precision).
    """
    fine = np.asarray(histogram, dtype=np.int64).reshape(-1)
    per_bin = reference.FINE_PER_KEY >> precision  # fine keys per bin
    nbins = fine.size // per_bin
    counts = fine.reshape(nbins, per_bin).sum(axis=1)
    bins = np.arange(nbins)
    exponent = (bins >> precision) & 0xFF
    sign = bins >> (8 + precision)
    zero_bins = exponent == 0
    finite = (exponent != reference.NONFINITE_EXPONENT) & ~zero_bins
    candidates = bins[finite & (counts > 0)]
    budget = 255 - 2  # two symbols for the signed zeros
    kept = np.sort(candidates[np.argsort(-counts[candidates], kind="stable")[:budget]])
    bin_symbol = np.zeros(nbins, dtype=np.int64)
    nsym = 1
    reps: list[float] = [0.0]
    symbol_counts = [0]
    for sgn in (0, 1):
        zero_symbol = nsym
        reps.append(-0.0 if sgn else 0.0)
        symbol_counts.append(int(counts[zero_bins & (sign == sgn)].sum()))
        nsym += 1
        mine = kept[sign[kept] == sgn]
        same_sign = bins[sign == sgn]
        if mine.size:
            for k in mine.tolist():
                lo = k * per_bin
                weights = fine[lo : lo + per_bin]
                mids = (np.arange(lo, lo + per_bin, dtype=np.int64) << reference.FINE_SHIFT) + (1 << (reference.FINE_SHIFT - 1))
                values = mids.astype(np.uint32).view(np.float32).astype(np.float64)
                reps.append(float(np.dot(weights, values) / weights.sum()))
                symbol_counts.append(int(counts[k]))
            # Every bin of this sign takes the symbol of the nearest kept bin (by key order,
            # which is log order for one sign); exact midpoints go to the larger magnitude.
            pos = np.searchsorted(mine, same_sign)
            lower = mine[np.clip(pos - 1, 0, mine.size - 1)]
            upper = mine[np.clip(pos, 0, mine.size - 1)]
            nearest = np.where(np.abs(same_sign - lower) < np.abs(upper - same_sign), lower, upper)
            index = np.searchsorted(mine, nearest)
            bin_symbol[same_sign] = nsym + index
            nsym += mine.size
        else:
            bin_symbol[same_sign] = zero_symbol
        bin_symbol[same_sign[zero_bins[same_sign]]] = zero_symbol
    key_to_symbol = np.repeat(bin_symbol.astype(np.uint8), per_bin)
    representatives = np.array(reps, dtype=np.float32)
    return BucketPlan(key_to_symbol, representatives, np.array(symbol_counts, dtype=np.int64), math.ldexp(1.0, -precision))


#: Elements an lq/1 scale is chosen on (a strided sample): three significant digits, and a
#: transfer from a GPU of half a megabyte at most.
SCALE_SAMPLE = 1 << 16


def _scale_sample(tensor: torch.Tensor, base: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Elements ``0, s, 2s, ...`` (``s = ceil(numel / SCALE_SAMPLE)``) of both, as float64,
    where both are finite."""
    # float64 holds every float dtype exactly (numpy has no bfloat16).
    xs = _strided(tensor).to(torch.float64).cpu().numpy()
    bs = _strided(base).to(torch.float64).cpu().numpy()
    finite = np.isfinite(xs) & np.isfinite(bs)
    return xs[finite], bs[finite]


def _median_ratio(xs: np.ndarray, bs: np.ndarray) -> float | None:
    """The median of ``x / b`` where both are nonzero and of one sign; None if there is none."""
    same = (xs * bs) > 0
    return float(np.median(xs[same] / bs[same])) if same.any() else None


def _valid_scale(fit: float | None, fallback: float) -> float:
    """``fit`` as a float32 value, or ``fallback`` where it is not positive and finite (the
    format's scale is)."""
    if fit is None or not 0.0 < float(np.float32(fit)) < math.inf:
        fit = fallback
    return float(np.float32(fit))


def fit_prediction_scale(tensor: torch.Tensor, base: torch.Tensor, fallback: float) -> float:
    """The one factor ``c`` for which ``c * base`` best restores ``tensor`` with no values stored.

    Signed tensors (first moments) take the least-squares factor, ``sum(x * b) / sum(b * b)``;
    non-negative ones (second moments, whose error matters relative to the value) the median
    of ``x / b`` over elements where both are positive, which minimizes the mean absolute
    error of the logarithm. Both are fitted on a strided sample of at most
    :data:`SCALE_SAMPLE` elements with exact sums (products of float32 values are exact in
    float64, and ``math.fsum`` rounds once), so every backend picks the same factor bit for bit.

    Args:
        tensor: The values to restore.
        base: The base of the same shape.
        fallback: The factor where the sample says nothing (an all-zero base, say) or the fit
            is not a positive float32 (``lq/1``'s scale is positive): the decay.

    Returns:
        The factor, as a float32 value.
    """
    xs, bs = _scale_sample(tensor, base)
    if (xs < 0).any() or (bs < 0).any():
        energy = math.fsum(bs * bs)
        return _valid_scale(math.fsum(xs * bs) / energy if energy > 0 else None, fallback)
    return _valid_scale(_median_ratio(xs, bs), fallback)


def _bins(values: np.ndarray, precision: int) -> np.ndarray:
    """The lq/1 bin of float32 values before rare bins are merged: sign, exponent and the top
    ``precision`` mantissa bits."""
    return values.astype(np.float32).view(np.uint32) >> np.uint32(23 - precision)


def choose_log_scale(tensor: torch.Tensor, base: torch.Tensor, decay: float, precision: int) -> float:
    """The scale of an ``lq/1`` prediction: ``decay``, or, for a non-negative tensor (a second
    moment), the median ratio of the values to their base where that puts more sampled
    elements in their own bin.

    The decay is exact for elements whose parameter had no gradient and right on average
    once a second moment has settled; early in training a second moment grows instead
    (MiniLM 60 steps into fine-tuning: a median ratio of 1.33 over 20 steps against a decay
    of 0.98), and the median ratio predicts more of it. The choice is made on
    :data:`SCALE_SAMPLE` strided elements with float32 arithmetic, the same bits on every
    backend; ties keep the decay.

    Args:
        tensor: The values.
        base: Their base.
        decay: The optimizer's decay over the steps between the two (1.0 when unknown).
        precision: The bins' mantissa bits.

    Returns:
        The scale, as a float32 value.
    """
    decay = float(np.float32(decay))
    xs, bs = _scale_sample(tensor, base)
    if (xs < 0).any() or (bs < 0).any():
        return decay  # a first moment: measured, the ratio predicts no better than the decay
    ratio = _valid_scale(_median_ratio(xs, bs), decay)
    if ratio == decay:
        return decay
    x32, b32 = xs.astype(np.float32), bs.astype(np.float32)
    want = _bins(x32, precision)
    with np.errstate(over="ignore"):
        hits = [int((_bins(b32 * np.float32(c), precision) == want).sum()) for c in (decay, ratio)]
    return ratio if hits[1] > hits[0] else decay


def median_binade(tensor: torch.Tensor) -> int | None:
    """The median of the exponent fields of ``float32(tensor)`` other than 0 (zeros and
    subnormals) and 255 (infinities and NaNs), on :data:`SCALE_SAMPLE` strided elements
    (integers: the same on every backend); None where there are none. The median is the
    field at position ``count // 2`` of those fields sorted, found from their histogram. (A
    tensor no larger than the sample is its own sample: :func:`_strided` of a sample is the
    sample.)"""
    exponents = ((_strided(tensor).to(torch.float32).view(torch.int32) >> 23) & 0xFF).cpu().numpy()
    counts = np.bincount(exponents.ravel(), minlength=256)
    counts[0] = counts[reference.NONFINITE_EXPONENT] = 0
    total = int(counts.sum())
    if not total:
        return None
    return int(np.searchsorted(np.cumsum(counts), total // 2, side="right"))


def binade_offset(base: torch.Tensor) -> int:
    """The binade ``lq/2``'s contexts centre on: :func:`median_binade` of the base; 127 (the
    binade of 1.0) where all of it is zero."""
    typical = median_binade(base)
    return 127 if typical is None else typical


def delta_floor_exponent(base: torch.Tensor | None, delta_floor: int | None) -> int:
    """The smallest exponent field of a delta bucket that ``lc`` keeps (see
    :func:`plan_buckets`): ``delta_floor`` binades below the base's :func:`median_binade`,
    so that a dropped delta is below ``2**-delta_floor`` times the base's typical magnitude.
    1 (no floor) without a base, without a floor or where the base is all zero."""
    if base is None or delta_floor is None:
        return 1
    typical = median_binade(base)
    return 1 if typical is None else max(1, typical - delta_floor)


def _strided(tensor: torch.Tensor) -> torch.Tensor:
    """Elements ``0, s, 2s, ...`` (``s = ceil(numel / SCALE_SAMPLE)``), contiguous, on the
    tensor's device."""
    stride = max(1, -(-tensor.numel() // SCALE_SAMPLE))
    return tensor.detach().reshape(-1)[::stride].contiguous()


def _sampled_grouping_bits(
    symbols: torch.Tensor, sample_contexts: torch.Tensor, nsym: int, chunk_symbols: int
) -> tuple[float, float]:
    """``(grouped, single)``: the payload bits of ``symbols`` coded per context and with one
    table, as the :data:`SCALE_SAMPLE` strided elements (all, for a smaller tensor) and their
    ``sample_contexts`` estimate them: priced at the sample's entropies scaled to the tensor,
    tables as written. Deciding on the sample keeps the full context pass off tensors that
    stay single-table."""
    sym = _strided(symbols).cpu()
    joint = backend.context_histogram(sample_contexts.cpu(), sym, nsym).numpy() * (symbols.numel() / sym.numel())
    return _context_bits(joint, chunk_symbols), _context_bits(joint.sum(axis=0, keepdims=True), chunk_symbols)


def _binade_pays(symbols: torch.Tensor, base_sample: torch.Tensor, offset: int, nsym: int, chunk_symbols: int) -> bool:
    """Whether ``lq/2`` saves at least :data:`CONTEXT_MIN_SAVING` of ``lq/1``'s payload, by
    the sample (:func:`_sampled_grouping_bits`; ``base_sample`` is the base's
    :func:`_strided` sample)."""
    contexts = backend.binade_contexts(base_sample, offset)
    grouped, plain = _sampled_grouping_bits(symbols, contexts, nsym, chunk_symbols)
    # A sample of one symbol prices both at 0 and takes lq/2 (fill tables only): a few
    # record bytes more than lq/1, and golden_context_v2 pins that choice.
    return grouped <= (1.0 - CONTEXT_MIN_SAVING) * plain


def encode_lq(
    tensor: torch.Tensor,
    base: torch.Tensor | None,
    scale: float,
    precision: int,
    chunk_symbols: int,
    predict_only: bool = False,
    coder: str = "auto",
    fingerprint: Callable[[torch.Tensor], str] = base_fingerprint,
) -> EncodedTensor:
    """Code a floating tensor (an optimizer moment) with ``lq/1`` or ``lq/2``.

    Args:
        tensor: The tensor.
        base: Its base (the previous reconstruction), or None.
        scale: The optimizer's decay of the base over the steps in between (1.0 keeps it):
            the scale, unless :func:`choose_log_scale` finds a better one (or, for
            ``predict_only``, :func:`fit_prediction_scale`).
        precision: Mantissa bits per bin (``2**precision`` bins per octave).
        chunk_symbols: Symbols per rANS chunk.
        predict_only: Store no values: every element restores to the prediction (needs a
            base), with ``scale`` replaced by :func:`fit_prediction_scale`'s factor (``scale``
            is its fallback). The tensor is then a fill of symbol 0 and costs only its record.
        coder: ``"auto"`` or ``"context"``: ``lq/2`` where there is a base and grouping the
            symbols by its binades saves at least :data:`CONTEXT_MIN_SAVING` of ``lq/1``'s
            payload (:func:`_binade_pays`); ``"huffman"`` or ``"rans"``: ``lq/1``.
        fingerprint: Fingerprints the base for the record (see :func:`encode_lc`).

    Returns:
        The encoded tensor with its reconstruction.
    """
    x = tensor.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    b = None if base is None else base.detach().to(x.device).contiguous()
    scale = float(np.float32(scale))
    dev = x.device
    if predict_only:
        if b is None:
            raise ValueError("predict_only needs a base")
        scale = fit_prediction_scale(x, b, scale)
        # Every element is symbol 0: the prediction. Symbol 0's value is never read.
        reps = np.zeros(1, np.float32)
        bound = None
        symbols = torch.zeros(x.numel(), dtype=torch.uint8, device=dev)
        # A non-finite value or prediction is found on the tensors below (no histogram).
        recon = backend.lq_reconstruct(symbols, torch.from_numpy(reps).to(dev), b.reshape(-1), scale, x.dtype).to(dev)
        hist = np.zeros(reference.NUM_FINE_KEYS, dtype=np.int64)
        nonfinite = not bool(torch.isfinite(recon).all()) or not bool(torch.isfinite(x).all())
        counts = np.array([x.numel()], dtype=np.int64)
    else:
        if b is not None:
            scale = choose_log_scale(x, b, scale, precision)
        hist = backend.lc_histogram(x, None).cpu().numpy()
        plan = plan_log_buckets(hist, precision)
        reps, bound = plan.representatives, plan.error_bound
        symbols, recon, nonfinite = backend.lq_symbols(
            x, b, scale, torch.from_numpy(plan.key_to_symbol).to(dev), torch.from_numpy(reps).to(dev)
        )
        counts = None  # lq/1's table, counted below only where the tensor stays lq/1
    record = {
        "codec": LQ,
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "precision": precision,
        "scale": int(np.float32(scale).view(np.uint32)),
        "chunk": chunk_symbols,
        "reps": reps.view(np.uint32).tolist(),
    }
    offset = None
    if coder in BINADE_CODERS and b is not None and not predict_only and x.numel():
        sample = _strided(b)
        offset = binade_offset(sample)
        if not _binade_pays(symbols, sample, offset, reps.size, chunk_symbols):
            offset = None
    if offset is not None:
        contexts = backend.binade_contexts(b, offset)
        joint = backend.context_histogram(contexts, symbols, reps.size).cpu().numpy()[:NUM_BINADE_CONTEXTS]
        parts, ready = _context_coded(record, symbols, contexts, joint, chunk_symbols, codec=LQ2, offset=offset)
        del symbols, contexts
    else:
        if counts is None:
            counts = torch.bincount(symbols, minlength=reps.size).cpu().numpy()
        parts, ready = _stream_coded(record, symbols, counts, chunk_symbols)
        del symbols
    # Non-finite values have a non-finite fine key; a non-finite prediction (from a
    # non-finite base) shows in the reconstruction.
    exc_index, exc_values = _exceptions(x, None, recon, hist, nonfinite)
    record.update(
        exceptions=int(exc_index.numel()),
        bound=bound,
        base=None if b is None else fingerprint(b),
    )
    parts += [exc_index.cpu().numpy(), _as_bytes_array(exc_values)]
    return EncodedTensor(record, parts, recon.view(x.shape), ready)


def _scaled_contexts_pay(symbols: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], nsym: int, chunk_symbols: int) -> bool:
    """Whether ``sq/2`` saves at least :data:`CONTEXT_MIN_SAVING` of ``sq/1``'s payload, by
    the sample (:func:`_sampled_grouping_bits`; late in training most levels are 0 and a
    single table is as good)."""
    contexts = backend.moment_contexts(_strided(moments[0]), _strided(moments[1]))
    grouped, plain = _sampled_grouping_bits(symbols, contexts, nsym, chunk_symbols)
    return plain > 0 and grouped <= (1.0 - CONTEXT_MIN_SAVING) * plain  # a fill stays sq/1


def encode_sq(
    tensor: torch.Tensor,
    base: torch.Tensor,
    norm: tuple[str, torch.Tensor],
    scale: float,
    precision: int,
    chunk_symbols: int,
    fingerprint: Callable[[torch.Tensor], str] = base_fingerprint,
    context: tuple[tuple[str, torch.Tensor], tuple[str, torch.Tensor]] | None = None,
    coder: str = "auto",
) -> EncodedTensor:
    """Code a float32 first moment with ``sq/1``, or ``sq/2`` where the base's moments give
    contexts that pay: levels of ``2**-precision`` units of the square root of its second
    moment, rANS-coded.

    Args:
        tensor: The first moment (float32).
        base: Its base (the previous reconstruction), same shape and dtype.
        norm: ``(name, tensor)``: the second moment of the same parameter in the same state,
            as the decoder will restore it (its reconstruction), and its dotted name.
        scale: The prediction's factor: Adam's decay of the first moment over the steps
            between the checkpoints, exact for elements whose parameter had no gradient.
            (A least-squares factor saves a few percent of the stream on the benchmark
            states and costs more CPU time than the rest of the pass.)
        precision: Levels per unit: ``2**precision``.
        chunk_symbols: Symbols per rANS chunk.
        fingerprint: Fingerprints the base (and the context's tensor) for the record.
        context: ``((name, exp_avg), (name, exp_avg_sq))``: the base's moments of the
            parameter (the first is ``base`` itself), which give ``sq/2``'s contexts; None
            codes ``sq/1``.
        coder: ``"context"`` codes ``sq/2`` wherever ``context`` is given; ``"auto"`` where
            that saves at least :data:`CONTEXT_MIN_SAVING` of ``sq/1``'s payload, by a
            sample; any other coder codes ``sq/1``.

    Returns:
        The encoded tensor with its reconstruction.

    Raises:
        TypeError: If a tensor is not float32.
        ValueError: If the sizes differ.
    """
    norm_name, norm_tensor = norm
    x = tensor.detach().contiguous()
    dev = x.device
    b = base.detach().to(dev).contiguous()
    n = norm_tensor.detach().to(dev).contiguous()
    scale = _valid_scale(scale, 1.0)
    symbols, reach, recon, exceptional = backend.sq_symbols(x, b, scale, n, precision)
    nsym = 2 * reach + 1
    exc_index = torch.nonzero(exceptional).reshape(-1)
    exc_values = x.reshape(-1)[exc_index.to(dev)]
    record = {
        "codec": SQ,
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "precision": precision,
        "scale": int(np.float32(scale).view(np.uint32)),
        "reach": reach,
        "norm": norm_name,
        "chunk": chunk_symbols,
    }
    moments = None
    if context is not None and x.numel() and coder in ("auto", "context"):
        moments = tuple(t.detach().to(dev).contiguous() for _, t in context)
        if any(t.numel() != x.numel() or not t.is_floating_point() for t in moments):
            raise ValueError(f"the contexts of an sq/2 first moment must be floating tensors of {x.numel()} elements")
        if coder == "auto" and not _scaled_contexts_pay(symbols, moments, nsym, chunk_symbols):
            moments = None
    if moments is not None:
        contexts = backend.moment_contexts(*moments)
        joint = backend.context_histogram(contexts, symbols, nsym).cpu().numpy()
        parts, ready = _context_coded(record, symbols, contexts, joint, chunk_symbols,
                                      codec=SQ2, context=_context_field(context, fingerprint))
        del symbols, contexts
    else:
        counts = torch.bincount(symbols, minlength=nsym).cpu().numpy()
        parts, ready = _stream_coded(record, symbols, counts, chunk_symbols)
        del symbols
    record.update(
        exceptions=int(exc_index.numel()),
        bound=math.ldexp(1.0, -precision - 1),
        base=fingerprint(b),
    )
    parts += [exc_index.cpu().numpy(), _as_bytes_array(exc_values)]
    return EncodedTensor(record, parts, recon.view(x.shape), ready)


#: A byte plane is rANS-coded only where that saves at least this fraction of its bytes.
PLANE_MIN_SAVING = 0.02


def encode_bp(
    tensor: torch.Tensor,
    base: torch.Tensor | None,
    chunk_symbols: int,
    fingerprint: Callable[[torch.Tensor], str] = base_fingerprint,
) -> EncodedTensor:
    """Store a tensor exactly as rANS-coded byte planes (``bp/1``).

    Args:
        tensor: Any tensor of a storable dtype.
        base: A tensor of the same shape and dtype to XOR against, or None.
        chunk_symbols: Symbols per rANS chunk.
        fingerprint: Fingerprints the base for the record (see :func:`encode_lc`).

    Returns:
        The encoded tensor; its reconstruction is the tensor itself (a copy).
    """
    x = tensor.detach().contiguous()
    dev = x.device
    itemsize = x.element_size()
    n = x.numel()
    planes_u8 = x.reshape(-1).view(torch.uint8).view(n, itemsize)
    b = None
    if base is not None:
        b = base.detach().to(dev).contiguous()
        planes_u8 = torch.bitwise_xor(planes_u8, b.reshape(-1).view(torch.uint8).view(n, itemsize))
    nchunks = -(-n // chunk_symbols)
    planes, tensors, dtypes = [], [], []
    for j in range(itemsize):
        plane = planes_u8[:, j].contiguous()
        counts = torch.bincount(plane, minlength=256).cpu().numpy()
        freqs = rans.quantize_frequencies(counts)
        fill = rans.fill_symbol(freqs)
        if fill is not None or n == 0:
            planes.append({"fill": 0 if fill is None else fill})
            continue
        cost = _rans_bits(counts, freqs, nchunks) / 8
        if cost > (1.0 - PLANE_MIN_SAVING) * n:
            planes.append({"raw": True})
            tensors.append(plane)
            dtypes.append(np.uint8)
            continue
        words, chunk_words = backend.rans_encode(plane, torch.from_numpy(freqs).to(dev), chunk_symbols)
        planes.append({"freqs": freqs.tolist(), "words": int(words.numel())})
        tensors.extend([chunk_words.to(torch.int32), words])
        dtypes.extend([np.uint32, np.uint16])
    parts, ready = _host_parts(tensors, dtypes)
    record = {
        "codec": BP,
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "chunk": chunk_symbols,
        "planes": planes,
        "base": None if b is None else fingerprint(b),
    }
    return EncodedTensor(record, parts, None, ready)


_side_streams: dict[int, Any] = {}


def _to_pinned_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """Copy device tensors into new pinned host tensors on a per-device side stream.

    Returns:
        The host tensors (valid once the event completes) and the event.
    """
    device = tensors[0].device
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _side_streams.get(index)
    if side is None:
        side = _side_streams[index] = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    hosts = []
    with torch.cuda.stream(side):
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(side)  # keep the device memory alive until the copy is done
            hosts.append(host)
        event = torch.cuda.Event()
        event.record(side)
    return hosts, event


# --------------------------------------------------------------------------- reading


def _fail(name: str, message: str) -> FormatError:
    return FormatError(f"tensor {name!r}: {message}")


def _int(record: dict, field: str, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(name, f"field {field!r} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def validate_record(record: Any, name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Check a tensor record read from a file; return its dtype, shape and element count.

    Raises:
        FormatError: Naming the tensor and the field that is wrong.
    """
    from lctriton.errors import UnknownCodecError

    if not isinstance(record, dict):
        raise _fail(name, "record is not an object")
    codec = record.get("codec")
    if codec not in ALL_CODECS:
        raise UnknownCodecError(
            f"tensor {name!r}: unknown codec {codec!r} (this reader knows {', '.join(ALL_CODECS)})"
        )
    dtype_name = record.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(name, f"unknown dtype {dtype_name!r}")
    shape = record.get("shape")
    if not isinstance(shape, list) or len(shape) > 64:
        raise _fail(name, f"shape must be a list of at most 64 dims, got {shape!r}")
    numel = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or dim > 1 << 48:
            raise _fail(name, f"bad dimension {dim!r} in shape")
        numel *= dim
    if numel > 1 << 48:
        raise _fail(name, f"shape {shape} has too many elements")
    if codec == LC:
        if dtype_name not in _LOSSY_NAMES:
            raise _fail(name, f"codec {LC} cannot hold dtype {dtype_name}")
        bits = _int(record, "bits", name, 1, 8)
        chunk = _int(record, "chunk", name, 64, 1 << 16)
        if chunk & (chunk - 1):
            raise _fail(name, f"chunk {chunk} is not a power of two")
        reps, lengths = record.get("reps"), record.get("lengths")
        if not isinstance(reps, list) or not 1 <= len(reps) <= 1 << bits:
            raise _fail(name, f"'reps' must list 1 to {1 << bits} values")
        if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 32 for r in reps):
            raise _fail(name, "'reps' must hold uint32 bit patterns")
        if not isinstance(lengths, list) or len(lengths) != len(reps):
            raise _fail(name, "'lengths' must have one entry per representative")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in lengths):
            raise _fail(name, "'lengths' must hold small non-negative ints")
        try:
            huffman.validate_lengths(np.array(lengths, dtype=np.int64))
        except ValueError as exc:
            raise _fail(name, str(exc)) from None
        for field in ("fill", "base"):
            if field not in record:
                raise _fail(name, f"field {field!r} is missing")
        fill = record.get("fill")
        if any(lengths) and numel == 0:
            raise _fail(name, "an empty tensor cannot have a code")
        if any(lengths):
            if fill is not None:
                raise _fail(name, "a coded tensor cannot also be a fill")
        elif isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < len(reps):
            raise _fail(name, f"'fill' must be a symbol below {len(reps)}, got {fill!r}")
        _int(record, "words", name)
        _int(record, "exceptions", name, 0, numel)
        _bound_field(record, name, nullable=False)
        _base_field(record, name)
    if codec in (LC2, LQ):
        _validate_rans_record(record, name, codec, dtype_name, numel)
    elif codec in SCALED_CODECS:
        _validate_sq_record(record, name, codec, numel)
    elif codec in CONTEXT_CODECS:
        _validate_context_record(record, name, codec, dtype_name, numel)
    elif codec == BP:
        _validate_planes(record, name, dtype_name, numel)
    return DTYPES[dtype_name], tuple(shape), numel


def _chunk(record: dict, name: str) -> int:
    chunk = _int(record, "chunk", name, 64, 1 << 16)
    if chunk & (chunk - 1):
        raise _fail(name, f"chunk {chunk} is not a power of two")
    return chunk


def _base_field(record: dict, name: str) -> None:
    if "base" not in record:
        raise _fail(name, "field 'base' is missing")
    base = record["base"]
    if base is not None and (not isinstance(base, str) or not _FINGERPRINT.fullmatch(base)):
        raise _fail(name, f"'base' must be 16 lowercase hex digits or null, got {base!r}")


def _bound_field(record: dict, name: str, nullable: bool) -> None:
    """The error bound: a finite non-negative number (null too where the codec allows it: an
    lq record that stores no values has none)."""
    bound = record.get("bound")
    if bound is None and nullable:
        return
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0 <= bound < math.inf:
        raise _fail(name, f"'bound' must be a finite non-negative number{' or null' if nullable else ''}, got {bound!r}")


def _rans_table(record: dict, field: str, name: str, nsym: int, fill: Any, numel: int) -> None:
    """Check a rANS frequency table and the fill that goes with it."""
    try:
        freqs = rans.validate_frequencies(record.get(field), nsym)
    except ValueError as exc:
        raise _fail(name, str(exc)) from None
    single = rans.fill_symbol(freqs)
    if fill is None:
        if single is not None and numel:
            raise _fail(name, "a stream needs at least two symbols of nonzero frequency")
    elif isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < nsym:
        raise _fail(name, f"'fill' must be a symbol below {nsym}, got {fill!r}")


def _float32_field(record: dict, field: str, name: str) -> float:
    """A field holding the bits of a positive finite float32 value; returns the value."""
    value = float(np.uint32(_int(record, field, name, 0, (1 << 32) - 1)).view(np.float32))
    if not 0.0 < value < math.inf:
        raise _fail(name, f"{field!r} must be a positive finite float32, got {value!r}")
    return value


def _symbol_fields(record: dict, name: str, codec: str, dtype_name: str) -> list:
    """The fields every rANS-coded lossy record has: a lossy dtype, the chunk, the symbol
    width (``lc``) or the precision and scale (``lq``), and the representatives, which it
    returns."""
    if dtype_name not in _LOSSY_NAMES:
        raise _fail(name, f"codec {codec} cannot hold dtype {dtype_name}")
    _chunk(record, name)
    if codec in (LC2, LC3):
        most = 1 << _int(record, "bits", name, 1, 8)
    else:
        _int(record, "precision", name, 0, MAX_LOG_PRECISION)
        _float32_field(record, "scale", name)
        most = 256
    reps = record.get("reps")
    if not isinstance(reps, list) or not 1 <= len(reps) <= most:
        raise _fail(name, f"'reps' must list 1 to {most} values")
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 32 for r in reps):
        raise _fail(name, "'reps' must hold uint32 bit patterns")
    return reps


def _validate_rans_record(record: dict, name: str, codec: str, dtype_name: str, numel: int) -> None:
    reps = _symbol_fields(record, name, codec, dtype_name)
    _stream_fields(record, name, len(reps), numel, nullable_bound=True)


def _stream_fields(record: dict, name: str, nsym: int, numel: int, nullable_bound: bool) -> None:
    """The fields of a record whose symbols are one rANS stream (lc/2, lq/1, sq/1): the
    table and fill, the word count, the exceptions, the bound and the base."""
    if "fill" not in record:
        raise _fail(name, "field 'fill' is missing")
    fill = record["fill"]
    _rans_table(record, "freqs", name, nsym, fill, numel)
    words = _int(record, "words", name)
    if fill is not None and words:
        raise _fail(name, "a fill must not have a stream")
    _exception_bound_base(record, name, numel, nullable_bound)


def _exception_bound_base(record: dict, name: str, numel: int, nullable_bound: bool) -> None:
    """The fields every rANS-coded lossy record ends with: the exception count, the error
    bound and the base's fingerprint."""
    _int(record, "exceptions", name, 0, numel)
    _bound_field(record, name, nullable=nullable_bound)
    _base_field(record, name)


def _validate_sq_record(record: dict, name: str, codec: str, numel: int) -> None:
    if record["dtype"] != "float32":
        raise _fail(name, f"codec {codec} cannot hold dtype {record['dtype']}")
    _chunk(record, name)
    _int(record, "precision", name, 0, MAX_LOG_PRECISION)
    _float32_field(record, "scale", name)
    reach = _int(record, "reach", name, 0, reference.SQ_REACH)
    if not isinstance(record.get("norm"), str) or record["norm"] == name:
        raise _fail(name, "'norm' must name another tensor of the state (its second moment)")
    if codec == SQ:
        _stream_fields(record, name, 2 * reach + 1, numel, nullable_bound=False)
    else:
        _context_refs(record, name)
        _context_tables(record, name, NUM_CONTEXTS, 2 * reach + 1, numel)
        _exception_bound_base(record, name, numel, nullable_bound=False)
    if record["base"] is None:
        raise _fail(name, f"codec {codec} codes a delta: 'base' must name one")


def _validate_context_record(record: dict, name: str, codec: str, dtype_name: str, numel: int) -> None:
    reps = _symbol_fields(record, name, codec, dtype_name)
    if codec == LQ2:
        _int(record, "offset", name, 0, reference.MAX_BINADE_OFFSET)
    else:
        _context_refs(record, name)
    _context_tables(record, name, NUM_CONTEXTS if codec == LC3 else NUM_BINADE_CONTEXTS, len(reps), numel)
    _exception_bound_base(record, name, numel, nullable_bound=codec == LQ2)
    if record["base"] is None:
        raise _fail(name, f"codec {codec} codes a delta: 'base' must name one")


def _context_refs(record: dict, name: str) -> None:
    """The ``context`` field of ``lc/3`` and ``sq/2``: the base's two moments, by name and
    fingerprint."""
    context = record.get("context")
    if not (
        isinstance(context, list)
        and len(context) == 2
        and all(
            isinstance(c, dict) and set(c) == {"name", "base"} and isinstance(c["name"], str)
            and isinstance(c["base"], str) and _FINGERPRINT.fullmatch(c["base"])
            for c in context
        )
    ):
        raise _fail(name, "'context' must list two {'name', 'base'} objects (the base's moments)")


def _context_tables(record: dict, name: str, ncontexts: int, nsym: int, numel: int) -> None:
    """The ``tables`` of a context-coded record: one per context, each empty, a fill or a
    rANS table of ``nsym`` symbols with its word count; their counts sum to ``numel``."""
    tables = record.get("tables")
    if not isinstance(tables, list) or len(tables) != ncontexts:
        raise _fail(name, f"'tables' must list {ncontexts} context tables")
    total = 0
    for c, table in enumerate(tables):
        if not isinstance(table, dict) or not {"count"} <= set(table) <= {"count", "fill", "freqs", "words"}:
            raise _fail(name, f"context table {c} must be an object with 'count' and 'fill' or 'freqs'/'words'")
        count = _int(table, "count", name, 0, numel)
        total += count
        if count == 0:
            if set(table) != {"count"}:
                raise _fail(name, f"context table {c} is empty and must hold only its count")
        elif "fill" in table:
            fill = table["fill"]
            if set(table) != {"count", "fill"}:
                raise _fail(name, f"context table {c}: a fill has no 'freqs' or 'words'")
            if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < nsym:
                raise _fail(name, f"context table {c}: 'fill' must be a symbol below {nsym}, got {fill!r}")
        else:
            if set(table) != {"count", "freqs", "words"}:
                raise _fail(name, f"context table {c} must hold 'freqs' and 'words'")
            try:
                freqs = rans.validate_frequencies(table["freqs"], nsym)
            except ValueError as exc:
                raise _fail(name, f"context table {c}: {exc}") from None
            if rans.fill_symbol(freqs) is not None:
                raise _fail(name, f"context table {c}: a stream needs at least two symbols of nonzero frequency")
            _int(table, "words", name)
    if total != numel:
        raise _fail(name, f"the context tables count {total} elements, the tensor has {numel}")


def _validate_planes(record: dict, name: str, dtype_name: str, numel: int) -> None:
    _chunk(record, name)
    itemsize = torch.empty(0, dtype=DTYPES[dtype_name]).element_size()
    planes = record.get("planes")
    if not isinstance(planes, list) or len(planes) != itemsize:
        raise _fail(name, f"'planes' must list {itemsize} byte planes")
    for j, plane in enumerate(planes):
        if not isinstance(plane, dict):
            raise _fail(name, f"plane {j} is not an object")
        if set(plane) == {"fill"}:
            fill = plane["fill"]
            if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill < 256:
                raise _fail(name, f"plane {j}: 'fill' must be a byte, got {fill!r}")
        elif set(plane) == {"raw"}:
            if plane["raw"] is not True:
                raise _fail(name, f"plane {j}: 'raw' must be true")
        elif set(plane) == {"freqs", "words"}:
            _rans_table(plane, "freqs", f"{name}' plane '{j}", 256, None, numel)
            _int(plane, "words", name)
        else:
            raise _fail(name, f"plane {j} must hold 'fill', 'raw', or 'freqs' and 'words'")
    _base_field(record, name)


def payload_layout(record: dict, numel: int) -> list[tuple[str, int, int]]:
    """Names, offsets and byte sizes of the parts of a validated record's payload."""
    itemsize = torch.empty(0, dtype=DTYPES[record["dtype"]]).element_size()
    if record["codec"] == RAW:
        return [("data", 0, numel * itemsize)]
    nchunks = -(-numel // record["chunk"])
    if record["codec"] == BP:
        sizes = []
        for j, plane in enumerate(record["planes"]):
            if "raw" in plane:
                sizes.append((f"plane{j}", numel))
            elif "freqs" in plane:
                sizes += [(f"plane{j}_chunk_words", nchunks * 4), (f"plane{j}_stream", plane["words"] * 2)]
    elif record["codec"] in CONTEXT_CODECS:
        sizes = []
        for c, table in enumerate(record["tables"]):
            if "freqs" in table:
                chunks = -(-table["count"] // record["chunk"])
                sizes += [(f"context{c}_chunk_words", chunks * 4), (f"context{c}_stream", table["words"] * 2)]
        sizes += [("exc_index", record["exceptions"] * 8), ("exc_values", record["exceptions"] * itemsize)]
    else:
        word_bytes = 8 if record["codec"] == LC else 2
        sizes = [
            ("chunk_bits" if record["codec"] == LC else "chunk_words", nchunks * 4),
            ("stream", record["words"] * word_bytes),
            ("exc_index", record["exceptions"] * 8),
            ("exc_values", record["exceptions"] * itemsize),
        ]
    layout, offset = [], 0
    for part, size in sizes:
        layout.append((part, offset, size))
        offset += _pad8(size)
    return layout
