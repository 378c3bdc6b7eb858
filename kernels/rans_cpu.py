"""The codec's CPU loops compiled from C: the rANS chunk loops, the context loops of lc/3 and
lq/2, the float32 passes of lc and lq (pass 1, symbols, reconstruction) and the fingerprint
sums.

Format: exactly :func:`lctriton.kernels.reference.rans_encode` /
:func:`~lctriton.kernels.reference.rans_decode`, byte for byte (``tests/test_rans.py``
compares them). The reference steps every chunk of a stream together, one numpy operation
per symbol position over all lanes; that is fast for many chunks but pays about a dozen
array passes per symbol. ``rans_cpu.c`` runs the chunks' loops as scalar code instead, four
whole chunks side by side so that the core overlaps their independent chains of multiplies
(about 2 ns a symbol to encode or decode on one core), and :func:`rans_encode_streams`
codes all of a record's context streams in one call. The context stage
(:func:`moment_contexts`, :func:`context_histogram`, :func:`group_by_context`,
:func:`ungroup_by_context`) is one pass each, where the reference's torch twins take several
(a stable sort among them); so is :func:`fingerprint`, which every delta and every load
computes for its bases (numpy takes two passes and a widening copy). Argument checks and the
lane layout are the reference's own (:func:`~lctriton.kernels.reference.rans_encode_input`,
:func:`~lctriton.kernels.reference.rans_lanes`), so both coders accept and reject the same
input with the same messages.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc`` or
``gcc``) into a cache directory (``$LCTRITON_CACHE_DIR``, else
``$XDG_CACHE_HOME/lctriton`` or ``~/.cache/lctriton``) under a name that includes the hash
of the source and flags, so a changed source is rebuilt and concurrent processes never load
a half-written library. Without a compiler, :func:`available` is False and
:mod:`lctriton.backend` keeps the numpy reference. The calls release the GIL, so the
pipeline's threads code several tensors at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from lctriton.kernels import reference
from lctriton.kernels.reference import (
    NUM_CONTEXTS,
    RANS_CORRUPT,
    RANS_ZERO_FREQUENCY,
    RansStream,
    _check_binade_input,
    _check_context_pair,
    fingerprint_hash,
    fingerprint_words,
    lc_tables,
    lq_tables,
    rans_encode_input,
    rans_lanes,
    rans_split_lanes,
    rans_streams_input,
)

__all__ = [
    "available",
    "rans_encode",
    "rans_encode_streams",
    "rans_decode",
    "RansStream",
    "moment_contexts",
    "binade_contexts",
    "context_counts",
    "fingerprint",
    "lc_histogram",
    "lc_symbols",
    "lc_reconstruct",
    "lq_symbols",
    "lq_reconstruct",
    "sq_symbols",
    "sq_reconstruct",
    "context_histogram",
    "group_by_context",
    "ungroup_by_context",
    "CACHE_ENV",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the directory of compiled libraries.
CACHE_ENV = "LCTRITON_CACHE_DIR"
_SOURCE = Path(__file__).with_name("rans_cpu.c")
#: Every float operation stays one IEEE operation: no contraction into fused multiply-adds
#: (gcc leaves them apart in ISO C mode, clang fuses by default, so it is spelled out); without
#: errno, a square root is one instruction.
_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-math-errno")
_COMPILE_TIMEOUT_S = 120
#: Tables ``lct_context_histogram`` counts into (its LANES): element ``i`` in table ``i % 4``.
HISTOGRAM_LANES = 4

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lctriton"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str, source: bytes, target: Path) -> None:
    """Compile ``source`` into ``target`` atomically (a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=target.stem + "-", dir=target.parent)
    os.close(fd)
    try:
        src = Path(tmp).with_suffix(".c")
        src.write_bytes(source)
        try:
            subprocess.run(
                [compiler, *_FLAGS, "-o", tmp, str(src)],
                check=True,
                capture_output=True,
                timeout=_COMPILE_TIMEOUT_S,
            )
        finally:
            src.unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled library, building it when the cache lacks it; None when it cannot be."""
    if sys.platform == "win32":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: the rANS coder runs as numpy on CPU")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"rans_cpu-{key}.so"
    try:
        if not target.exists():
            _build(compiler, source, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning(
            "could not build the compiled rANS coder (%s%s); the rANS coder runs as numpy on CPU",
            exc,
            ": " + detail.decode(errors="replace").strip() if detail else "",
        )
        return None
    lib.lct_rans_encode.restype = _I64
    lib.lct_rans_encode.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR]
    lib.lct_rans_encode_scratch.restype = _I64
    lib.lct_rans_encode_scratch.argtypes = [_I64]
    lib.lct_rans_encode_streams.restype = _I64
    lib.lct_rans_encode_streams.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
    lib.lct_rans_decode.restype = ctypes.c_int
    lib.lct_rans_decode.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64]
    lib.lct_moment_contexts.restype = None
    lib.lct_moment_contexts.argtypes = [_PTR, _PTR, _I64, _PTR]
    lib.lct_lc_histogram_f32.restype = None
    lib.lct_lc_histogram_f32.argtypes = [_PTR, _PTR, _I64, _PTR]
    lib.lct_lc_symbols_f32.restype = ctypes.c_int
    lib.lct_lc_symbols_f32.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR]
    lib.lct_lc_reconstruct_f32.restype = None
    lib.lct_lc_reconstruct_f32.argtypes = [_PTR, _PTR, _I64, _PTR, _I64, _PTR]
    lib.lct_lq_symbols_f32.restype = ctypes.c_int
    lib.lct_lq_symbols_f32.argtypes = [_PTR, _PTR, ctypes.c_float, _PTR, _PTR, _I64, _I64, _PTR, _PTR]
    lib.lct_lq_reconstruct_f32.restype = None
    lib.lct_lq_reconstruct_f32.argtypes = [_PTR, _PTR, _I64, _PTR, ctypes.c_float, _I64, _PTR]
    lib.lct_sq_symbols_f32.restype = _I64
    lib.lct_sq_symbols_f32.argtypes = [
        _PTR, _PTR, ctypes.c_float, _PTR, ctypes.c_float, ctypes.c_float, _I64, _PTR, _PTR, _PTR,
    ]
    lib.lct_sq_reconstruct_f32.restype = None
    lib.lct_sq_reconstruct_f32.argtypes = [_PTR, _I64, ctypes.c_float, _PTR, ctypes.c_float, _PTR, _I64, _PTR]
    lib.lct_fingerprint_sums.restype = ctypes.c_int
    lib.lct_fingerprint_sums.argtypes = [_PTR, _I64, ctypes.c_int, _PTR]
    lib.lct_binade_contexts.restype = None
    lib.lct_binade_contexts.argtypes = [_PTR, _I64, ctypes.c_int32, _PTR]
    lib.lct_context_counts.restype = ctypes.c_int
    lib.lct_context_counts.argtypes = [_PTR, _I64, _PTR]
    lib.lct_context_histogram.restype = ctypes.c_int
    lib.lct_context_histogram.argtypes = [_PTR, _PTR, _I64, _I64, _PTR]
    for fn in (lib.lct_group_by_context, lib.lct_ungroup_by_context):
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR, _PTR, _I64, _PTR]
    return lib


def available() -> bool:
    """Whether the compiled coder can run here (built now if it is not cached yet)."""
    return _library() is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the compiled rANS coder is unavailable here (no working C compiler)")
    return lib


def rans_encode(symbols: torch.Tensor, freqs: torch.Tensor, chunk_symbols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rANS-code uint8 symbols in chunks; same arguments, result and errors as
    :func:`lctriton.kernels.reference.rans_encode`.

    Raises:
        RuntimeError: If the compiled coder is unavailable (see :func:`available`).
    """
    lib = _require()
    sym, f = rans_encode_input(symbols, freqs, chunk_symbols, check_symbols=False)
    n = sym.size
    nchunks = -(-n // chunk_symbols)
    if n == 0:
        return torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.int64)
    freq = np.zeros(256, dtype=np.uint32)
    freq[: f.size] = f
    cum = np.zeros(256, dtype=np.uint32)
    cum[: f.size] = np.concatenate(([0], np.cumsum(f)[:-1]))
    out = np.empty(n + 2 * nchunks, dtype=np.uint16)
    counts = np.empty(nchunks, dtype=np.int64)
    scratch = np.empty(lib.lct_rans_encode_scratch(chunk_symbols), dtype=np.uint16)
    total = lib.lct_rans_encode(
        _ptr(sym), n, chunk_symbols, _ptr(freq), _ptr(cum), _ptr(out), _ptr(counts), _ptr(scratch)
    )
    if total < 0:
        raise ValueError(RANS_ZERO_FREQUENCY)
    words = out[:total].copy()  # drop the unused tail of the worst-case buffer
    return torch.from_numpy(words.view(np.int16)), torch.from_numpy(counts)


def rans_encode_streams(
    symbols: torch.Tensor, spans: list[tuple[int, int]], freqs: object, chunk_symbols: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """rANS-code several streams of one symbol tensor in one call; same arguments, result
    and errors as :func:`lctriton.kernels.reference.rans_encode_streams`.

    Raises:
        RuntimeError: If the compiled coder is unavailable (see :func:`available`).
    """
    lib = _require()
    flat, starts, counts, tables = rans_streams_input(symbols, spans, freqs, chunk_symbols)
    sym = flat.cpu().contiguous().numpy().view(np.uint8)
    nstreams = starts.size
    freq = np.zeros((nstreams, 256), dtype=np.uint32)
    freq[:, : tables.shape[1]] = tables
    cum = np.zeros_like(freq)
    np.cumsum(freq[:, :-1], axis=1, out=cum[:, 1:])
    chunks = -(-counts // chunk_symbols)
    out = np.empty(int(counts.sum() + 2 * chunks.sum()), dtype=np.uint16)
    chunk_words = np.empty(int(chunks.sum()), dtype=np.int64)
    words = np.empty(nstreams, dtype=np.int64)
    scratch = np.empty(lib.lct_rans_encode_scratch(chunk_symbols), dtype=np.uint16)
    starts, counts = np.ascontiguousarray(starts), np.ascontiguousarray(counts)
    total = lib.lct_rans_encode_streams(
        _ptr(sym), nstreams, _ptr(starts), _ptr(counts), chunk_symbols,
        _ptr(freq), _ptr(cum), _ptr(out), _ptr(chunk_words), _ptr(words), _ptr(scratch),
    )
    if total < 0:
        raise ValueError(RANS_ZERO_FREQUENCY)
    # One copy of the words written, so the worst-case buffer is not kept alive by views.
    stream = torch.from_numpy(out[:total].copy().view(np.int16))
    table = torch.from_numpy(chunk_words)
    word_ends, chunk_ends = np.cumsum(words).tolist(), np.cumsum(chunks).tolist()
    return [
        (stream[w1 - w : w1], table[c1 - c : c1])
        for w, w1, c, c1 in zip(words.tolist(), word_ends, chunks.tolist(), chunk_ends, strict=True)
    ]


def rans_decode(items: list[RansStream], chunk_symbols: int) -> list[torch.Tensor]:
    """Decode many rANS streams; same arguments, result and errors as
    :func:`lctriton.kernels.reference.rans_decode`.

    Raises:
        RuntimeError: If the compiled coder is unavailable (see :func:`available`).
    """
    lib = _require()
    lanes = rans_lanes(items, chunk_symbols)
    if lanes is None:
        return [torch.zeros(it.numel, dtype=torch.uint8) for it in items]
    words = np.ascontiguousarray(lanes.words, dtype=np.uint16)
    per_lane = [np.ascontiguousarray(a, dtype=np.int64) for a in (lanes.start, lanes.end, lanes.size, lanes.table)]
    freq, cum, slots = (np.ascontiguousarray(t) for t in (lanes.freq, lanes.cum, lanes.slots))
    grid = np.empty((lanes.size.size, lanes.longest), dtype=np.uint8)
    bad = lib.lct_rans_decode(
        _ptr(words),
        words.size,
        lanes.size.size,
        *(_ptr(a) for a in per_lane),
        _ptr(freq),
        _ptr(cum),
        _ptr(slots),
        _ptr(grid),
        lanes.longest,
    )
    if bad:
        raise ValueError(RANS_CORRUPT)
    return rans_split_lanes(grid, items, chunk_symbols)


def _flat_u8_pair(contexts: object, values: object, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as flat contiguous CPU uint8 tensors of one length, or a TypeError/ValueError."""
    flat = []
    for name, t in (("contexts", contexts), (label, values)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        flat.append(t.detach().reshape(-1).cpu().contiguous())
    if flat[0].numel() != flat[1].numel():
        raise ValueError(f"contexts and {label} differ in length: {flat[0].numel()} and {flat[1].numel()}")
    return flat[0], flat[1]


def moment_contexts(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.moment_contexts` (on CPU)."""
    lib = _require()
    _check_context_pair(first, second)
    m = first.detach().reshape(-1).cpu().to(torch.float32).contiguous()
    v = second.detach().reshape(-1).cpu().to(torch.float32).contiguous()
    out = torch.empty(m.numel(), dtype=torch.uint8)
    lib.lct_moment_contexts(m.data_ptr(), v.data_ptr(), m.numel(), out.data_ptr())
    return out


def binade_contexts(base: torch.Tensor, offset: int) -> torch.Tensor:
    """Same arguments, result and errors as :func:`lctriton.kernels.reference.binade_contexts`
    (on CPU)."""
    lib = _require()
    _check_binade_input(base, offset)
    b = base.detach().reshape(-1).cpu().to(torch.float32).contiguous()
    out = torch.empty(b.numel(), dtype=torch.uint8)
    lib.lct_binade_contexts(b.data_ptr(), b.numel(), offset, out.data_ptr())
    return out


def context_counts(contexts: torch.Tensor) -> torch.Tensor:
    """Same argument and result as :func:`lctriton.kernels.reference.context_counts`.

    Raises:
        ValueError: If a context is out of range (the reference's bincount would count it
            in a longer result).
    """
    lib = _require()
    ctx, _ = _flat_u8_pair(contexts, contexts, "contexts")
    counts = torch.empty(NUM_CONTEXTS, dtype=torch.int64)
    if lib.lct_context_counts(ctx.data_ptr(), ctx.numel(), counts.data_ptr()):
        raise ValueError(f"contexts must be below {NUM_CONTEXTS}")
    return counts


def context_histogram(contexts: torch.Tensor, symbols: torch.Tensor, nsym: int) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.context_histogram`.

    Raises:
        ValueError: If a context or symbol is out of range (the reference's bincount would
            count it elsewhere).
    """
    lib = _require()
    ctx, sym = _flat_u8_pair(contexts, symbols, "symbols")
    # One table per lane of the loop (HISTOGRAM_LANES), added up here.
    joint = torch.zeros(HISTOGRAM_LANES, NUM_CONTEXTS, nsym, dtype=torch.int64)
    if lib.lct_context_histogram(ctx.data_ptr(), sym.data_ptr(), ctx.numel(), nsym, joint.data_ptr()):
        raise ValueError(f"a context is not below {NUM_CONTEXTS} or a symbol not below {nsym}")
    return joint.sum(dim=0)


def _by_context(loop: str, contexts: torch.Tensor, values: torch.Tensor, label: str) -> torch.Tensor:
    """Run a grouping loop of the library (it counts the contexts itself)."""
    lib = _require()
    ctx, vals = _flat_u8_pair(contexts, values, label)
    out = torch.empty_like(vals)
    if getattr(lib, loop)(ctx.data_ptr(), vals.data_ptr(), ctx.numel(), out.data_ptr()):
        raise ValueError(f"contexts must be below {NUM_CONTEXTS}")
    return out


def group_by_context(contexts: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.group_by_context`."""
    return _by_context("lct_group_by_context", contexts, symbols, "symbols")


def ungroup_by_context(contexts: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.ungroup_by_context`."""
    return _by_context("lct_ungroup_by_context", contexts, grouped, "grouped")


def fingerprint(tensor: torch.Tensor) -> int:
    """Same argument and result as :func:`lctriton.kernels.reference.fingerprint`, for a CPU
    tensor: the sums in one compiled pass."""
    lib = _require()
    words = fingerprint_words(tensor)
    if words.device.type != "cpu":
        raise ValueError(f"the compiled fingerprint reads CPU tensors, got one on {words.device}")
    sums = (ctypes.c_uint64 * 4)()
    if lib.lct_fingerprint_sums(words.data_ptr(), words.numel(), words.element_size(), sums):
        raise ValueError(f"no fingerprint for words of {words.element_size()} bytes")
    return fingerprint_hash(*sums, words.numel(), tensor.dtype)


def _flat_cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().reshape(-1).cpu().contiguous()


def _symbol_pass(loop: str, x: torch.Tensor, base: torch.Tensor | None, lut: np.ndarray, reps: np.ndarray,
                 *scale: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Run a compiled float32 symbol pass (lc or lq, whose loops take the scale after the
    base): the symbols, the reconstruction and whether it holds a non-finite value."""
    lib = _require()
    xs, bs = _flat_cpu(x), _flat_cpu(base)
    lut = np.ascontiguousarray(lut)
    symbols = torch.empty(xs.numel(), dtype=torch.uint8)
    out = torch.empty(xs.numel(), dtype=torch.float32)
    nonfinite = getattr(lib, loop)(
        xs.data_ptr(), None if bs is None else bs.data_ptr(), *scale, lut.ctypes.data, reps.ctypes.data, reps.size,
        xs.numel(), symbols.data_ptr(), out.data_ptr(),
    )
    return symbols, out, bool(nonfinite)


def _reconstruct_pass(loop: str, symbols, representatives, base: torch.Tensor | None, dtype: torch.dtype,
                      *scale: float) -> torch.Tensor | None:
    """Run a compiled float32 reconstruction (lc or lq); None where the reference must (another
    dtype, an empty table, a base that does not fit)."""
    reps = np.ascontiguousarray(reference._as_numpy(representatives, np.float32))
    sym = torch.from_numpy(np.ascontiguousarray(reference._as_numpy(symbols, np.uint8)))
    bs = _flat_cpu(base)
    if dtype != torch.float32 or reps.size == 0 or (bs is not None and (bs.dtype != dtype or bs.numel() != sym.numel())):
        return None
    out = torch.empty(sym.numel(), dtype=torch.float32)
    getattr(_require(), loop)(
        sym.data_ptr(), reps.ctypes.data, reps.size, None if bs is None else bs.data_ptr(), *scale, sym.numel(),
        out.data_ptr(),
    )
    return out


def lc_histogram(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Same arguments, result and errors as :func:`lctriton.kernels.reference.lc_histogram`:
    one compiled pass for float32 tensors, the reference for other dtypes."""
    reference._check_lossy(x, base)
    if x.dtype != torch.float32:
        return reference.lc_histogram(x, base)
    xs, bs = _flat_cpu(x), _flat_cpu(base)
    # One table per lane of the loop (HISTOGRAM_LANES), added up here.
    counts = torch.zeros(HISTOGRAM_LANES, reference.NUM_FINE_KEYS, dtype=torch.int64)
    base_ptr = None if bs is None else bs.data_ptr()
    _require().lct_lc_histogram_f32(xs.data_ptr(), base_ptr, xs.numel(), counts.data_ptr())
    return counts.sum(dim=0)


def lc_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Same arguments, result and errors as :func:`lctriton.kernels.reference.lc_symbols`:
    one compiled pass for float32 tensors, the reference for other dtypes."""
    lut, reps = lc_tables(x, base, key_to_symbol, representatives)
    if x.dtype != torch.float32 or reps.size == 0:
        return reference.lc_symbols(x, base, key_to_symbol, representatives)
    return _symbol_pass("lct_lc_symbols_f32", x, base, lut, reps)


def lc_reconstruct(
    symbols: torch.Tensor | np.ndarray,
    representatives: torch.Tensor | np.ndarray,
    base: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.lc_reconstruct`:
    compiled for float32, the reference for other dtypes."""
    out = _reconstruct_pass("lct_lc_reconstruct_f32", symbols, representatives, base, dtype)
    return reference.lc_reconstruct(symbols, representatives, base, dtype) if out is None else out


def lq_symbols(
    x: torch.Tensor,
    base: torch.Tensor | None,
    scale: float,
    key_to_symbol: torch.Tensor,
    representatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Same arguments, result and errors as :func:`lctriton.kernels.reference.lq_symbols`:
    one compiled pass for float32 tensors (optimizer moments), the reference for other dtypes."""
    lut, reps = lq_tables(x, base, key_to_symbol, representatives)
    if x.dtype != torch.float32 or reps.size == 0:
        return reference.lq_symbols(x, base, scale, key_to_symbol, representatives)
    return _symbol_pass("lct_lq_symbols_f32", x, base, lut, reps, float(np.float32(scale)))


def lq_reconstruct(
    symbols: torch.Tensor | np.ndarray,
    representatives: torch.Tensor | np.ndarray,
    base: torch.Tensor | None,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.lq_reconstruct`:
    compiled for float32, the reference for other dtypes."""
    out = _reconstruct_pass("lct_lq_reconstruct_f32", symbols, representatives, base, dtype, float(np.float32(scale)))
    return reference.lq_reconstruct(symbols, representatives, base, scale, dtype) if out is None else out


def sq_symbols(
    x: torch.Tensor, base: torch.Tensor, scale: float, norm: torch.Tensor, precision: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Same arguments, result and errors as :func:`lctriton.kernels.reference.sq_symbols`, in
    one compiled pass."""
    reference._check_sq(x, base, norm)
    xs, bs, ns = _flat_cpu(x), _flat_cpu(base), _flat_cpu(norm)
    n = xs.numel()
    levels = torch.empty(n, dtype=torch.uint8)
    bad = torch.empty(n, dtype=torch.bool)
    out = torch.empty(n, dtype=torch.float32)
    reach = int(_require().lct_sq_symbols_f32(
        xs.data_ptr(), bs.data_ptr(), float(np.float32(scale)), ns.data_ptr(), 2.0**precision, 2.0**-precision, n,
        levels.data_ptr(), bad.data_ptr(), out.data_ptr(),
    ))
    # Levels come as k + 128; symbols are k + reach (uint8 arithmetic wraps, and k >= -reach).
    return levels.sub_(128 - reach), reach, out, bad


def sq_reconstruct(
    symbols: torch.Tensor, reach: int, precision: int, base: torch.Tensor, scale: float, norm: torch.Tensor
) -> torch.Tensor:
    """Same arguments and result as :func:`lctriton.kernels.reference.sq_reconstruct`, in one
    compiled pass."""
    sym = symbols.reshape(-1).to(device="cpu", dtype=torch.uint8).contiguous()
    bs, ns = _flat_cpu(base), _flat_cpu(norm)
    reference._check_sq(bs, bs, ns)
    if bs.numel() != sym.numel():
        raise ValueError(f"sq/1 needs {sym.numel()} base elements, got {bs.numel()}")
    out = torch.empty(sym.numel(), dtype=torch.float32)
    _require().lct_sq_reconstruct_f32(
        sym.data_ptr(), reach, 2.0**-precision, bs.data_ptr(), float(np.float32(scale)), ns.data_ptr(), sym.numel(),
        out.data_ptr(),
    )
    return out
