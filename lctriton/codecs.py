"""Tensor codecs: what each tensor record in a container says, and how it is coded.

Two codecs exist:

``raw/1``
    The tensor's bytes as they are in memory (C order, little-endian). Used for exact
    tensors: integers, bools, tiny tensors, tensors matching an exact pattern, key
    checkpoints, and everything in lossless mode.

``lc/1``
    Closed-loop LC-Checkpoint: exponent-bucketed delta against a base, Huffman-coded in
    independent chunks. ``lctriton.kernels.reference`` specifies its bytes. The record holds
    the representatives (as float32 bit patterns), the code lengths, the chunk size, the
    number of exceptions, the bound on the quantization error and the base's fingerprint;
    its payload holds, each part starting on an 8-byte boundary: the uint32 bit length of
    every chunk, the stream's 64-bit words, the int64 indices of the exceptions and their
    exact values.

Planning the buckets and the Huffman code uses the histogram of pass 1 only: the data never
comes back to the host between the passes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import torch

from lctriton import backend, huffman
from lctriton.errors import FormatError
from lctriton.kernels import reference

__all__ = [
    "RAW",
    "LC",
    "DTYPES",
    "BucketPlan",
    "plan_buckets",
    "EncodedTensor",
    "encode_raw",
    "encode_lc",
    "validate_record",
    "payload_layout",
]

_FINGERPRINT = re.compile("[0-9a-f]{16}")

RAW = "raw/1"
LC = "lc/1"

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


def plan_buckets(histogram: np.ndarray, bits: int) -> BucketPlan:
    """Priority promotion: keep the ``2**bits - 1`` largest finite (sign, exponent) buckets.

    Args:
        histogram: int64 array of ``NUM_FINE_KEYS`` counts from pass 1.
        bits: Symbol width.

    Returns:
        The bucket plan.
    """
    fine = np.asarray(histogram, dtype=np.int64).reshape(reference.NUM_KEYS, reference.FINE_PER_KEY)
    counts = fine.sum(axis=1)
    keys = np.arange(reference.NUM_KEYS)
    exponent = keys & 0xFF
    # Zeros and subnormals (exponent field 0) are never promoted: they decode to zero.
    finite = (counts > 0) & (exponent != reference.NONFINITE_EXPONENT) & (exponent != 0)
    candidates = keys[finite]
    # Largest exponent first; the positive sign first among equals.
    order = candidates[np.lexsort((candidates >> 8, -exponent[candidates]))]
    kept = order[: (1 << bits) - 1]
    dropped = order[(1 << bits) - 1 :]
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


def encode_lc(
    tensor: torch.Tensor, base: torch.Tensor | None, bits: int, chunk_symbols: int
) -> EncodedTensor:
    """Code a floating tensor lossily against ``base`` (or zeros) with ``lc/1``.

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
    plan = plan_buckets(hist, bits)
    lengths = huffman.code_lengths(plan.symbol_counts)
    fill = None
    if not lengths.any():
        used = np.flatnonzero(plan.symbol_counts)
        fill = int(used[0]) if used.size else 0
    dev = x.device
    stream, chunk_bits, recon, nonfinite = backend.lc_encode(
        x,
        b,
        torch.from_numpy(plan.key_to_symbol).to(dev),
        torch.from_numpy(plan.representatives).to(dev),
        torch.from_numpy(lengths).to(dev),
        chunk_symbols,
    )
    # Exceptions exist only where the delta is non-finite (its key is) or the
    # reconstruction overflowed; the histogram tells the first case for free.
    per_key = hist.reshape(reference.NUM_KEYS, reference.FINE_PER_KEY).sum(axis=1)
    nonfinite_keys = per_key[reference.NONFINITE_EXPONENT :: 256].sum() > 0
    exc_index = torch.zeros(0, dtype=torch.int64)
    exc_values = torch.zeros(0, dtype=x.dtype)
    if nonfinite_keys or nonfinite:
        exc_index, exc_values = reference.lc_exceptions(x, b, recon)
        recon[exc_index.to(recon.device)] = exc_values.to(recon.device)
    record = {
        "codec": LC,
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "bits": bits,
        "chunk": chunk_symbols,
        "reps": plan.representatives.view(np.uint32).tolist(),
        "lengths": lengths.tolist(),
        "fill": fill,
        "words": int(stream.numel()),
        "exceptions": int(exc_index.numel()),
        "bound": plan.error_bound,
        "base": None if b is None else f"{backend.fingerprint(b):016x}",
    }
    ready = None
    if dev.type == "cuda":
        # Only compressed bytes cross to the host: into pinned buffers, on a side stream,
        # so the copy overlaps whatever the caller launches next.
        (chunk_host, stream_host), ready = _to_pinned_host([chunk_bits.to(torch.int32), stream])
        chunk_part, stream_part = chunk_host.numpy().view(np.uint32), stream_host.numpy()
    else:
        chunk_part, stream_part = chunk_bits.cpu().numpy().astype(np.uint32), stream.cpu().numpy()
    parts = [chunk_part, stream_part, exc_index.cpu().numpy(), _as_bytes_array(exc_values)]
    return EncodedTensor(record, parts, recon.view(x.shape), ready)


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
    if codec not in (RAW, LC):
        raise UnknownCodecError(f"tensor {name!r}: unknown codec {codec!r} (this reader knows {RAW}, {LC})")
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
        bound = record.get("bound")
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0 <= bound < math.inf:
            raise _fail(name, f"'bound' must be a finite non-negative number, got {bound!r}")
        base = record.get("base")
        if base is not None and (not isinstance(base, str) or not _FINGERPRINT.fullmatch(base)):
            raise _fail(name, f"'base' must be 16 lowercase hex digits or null, got {base!r}")
    return DTYPES[dtype_name], tuple(shape), numel


def payload_layout(record: dict, numel: int) -> list[tuple[str, int, int]]:
    """Names, offsets and byte sizes of the parts of a validated record's payload."""
    itemsize = torch.empty(0, dtype=DTYPES[record["dtype"]]).element_size()
    if record["codec"] == RAW:
        return [("data", 0, numel * itemsize)]
    nchunks = -(-numel // record["chunk"])
    sizes = [
        ("chunk_bits", nchunks * 4),
        ("stream", record["words"] * 8),
        ("exc_index", record["exceptions"] * 8),
        ("exc_values", record["exceptions"] * itemsize),
    ]
    layout, offset = [], 0
    for part, size in sizes:
        layout.append((part, offset, size))
        offset += _pad8(size)
    return layout
