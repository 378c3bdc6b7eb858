"""Drop-in replacement for the ``lc_checkpoint`` package (0.5.2 on PyPI), on lctriton's codec.

A training script written for that package switches by changing one import::

    import lctriton.compat.lc_checkpoint as lc_checkpoint   # was: import lc_checkpoint.main

The functions keep the package's names, positional parameters and defaults (the misspelled
``treshold`` included), but compress with lctriton's ``lc/1`` codec and write lctriton
containers, which never unpickle. What changes for a user, function by function:

``initialize``
    Keeps its arguments (the package assigns them to local variables and forgets them),
    creates ``checkpoint_dir``, and records the model's current ``state_dict`` as the base
    of a closed-loop chain (see below). The arguments can be read back as the package's
    module attributes ``net``, ``optimizer``, ``criterion``, ``checkpoint_dir``,
    ``num_buckets``, ``num_bits`` and ``prev_state_dict`` (the recorded base).
``compress_data``
    Returns a :class:`CompressedDelta`, a named 2-tuple ``(compressed, encoder)``: it can be
    passed on whole, as the README does, or unpacked as ``encoded, encoder = ...`` as the
    package's own return value is. The delta is quantized, not rounded to integers (the
    package rounds every ``|δt| < 0.5`` to 0, i.e. every real training delta): the decoded
    delta differs from the coded one by at most the codec's ``error_bound``.
``decode_data``
    Returns the decoded delta (the package truncates it to ``int(x) / 100``).
``save_checkpoint``
    Writes to ``filename`` (the package ignores it and writes
    ``checkpoints/lc-checkpoint/lc_checkpoint_epoch{epoch}_iter{iteration}.pt``), atomically,
    creating parent directories. A script that relied on the package's fixed name must pass
    that name.
``load_checkpoint``
    Returns ``(decoded_delta, epoch)`` like the package, from an lctriton container; it
    never unpickles, so files written by the package itself cannot be read.
``calculate_compression_rate``
    Returns the compression ratio lctriton achieves (the package returns
    ``len(prev_state_dict) * log2(num_buckets) + num_buckets * num_bits``, a count of keys
    mixed with bits). See its docstring.
``restore_model`` / ``restore_model_async``
    Sum every delta of the chain onto the initial state, advancing through the flat layout
    (the package resets its offset for every tensor, and skips epoch ``last_epoch - 1``).

Parameter mapping. The package's ``num_bits`` becomes lctriton's ``bits`` (symbol width;
``2**bits - 1`` exponent buckets are kept): values 1 to 8 are used as they are, larger
values (the README passes 32, the float width) fall back to lctriton's default of 3. ``k``
(number of buckets) and ``treshold`` (priority promotion) are validated and otherwise
ignored: lctriton's bucketing is fixed by ``bits``. ``num_buckets`` is likewise only stored.

Closed loop. After :func:`initialize`, successive :func:`compress_data` calls form one
chain: each call codes ``δt`` plus the quantization error left over by the previous call
(the difference between the true running sum of the deltas and the running sum of the
decoded ones). The decoded deltas then add up to within one step's ``error_bound`` of the
true sum, however long the chain, instead of accumulating one error per step; a single
decoded delta differs from its ``δt`` by at most the bounds of its own step and the
previous one. This assumes that every delta handed over is saved and applied, in order,
as the README's loop does. A ``δt`` of another shape or dtype starts a new chain; without
:func:`initialize` (or after :func:`reset`) each call is coded on its own.

The module state is guarded by a lock, but a chain is one sequence: compress one model's
deltas from one thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

import lctriton
from lctriton import api
from lctriton import format as fmt
from lctriton.errors import FormatError

__all__ = [
    "FORMAT_TAG",
    "DEFAULT_BITS",
    "CompressedDelta",
    "DeltaInfo",
    "initialize",
    "compress_data",
    "decode_data",
    "save_checkpoint",
    "load_checkpoint",
    "calculate_compression_rate",
    "restore_model",
    "restore_model_async",
    "reset",
]

logger = logging.getLogger(__name__)

#: Value of the ``"format"`` entry of every state this module writes; :func:`load_checkpoint`
#: refuses containers without it, so an unrelated lctriton file is not mistaken for a delta.
FORMAT_TAG = "lctriton.compat.lc_checkpoint/1"
#: lctriton ``bits`` used when the package's ``num_bits`` is outside lctriton's 1 to 8.
DEFAULT_BITS = 3

_PICKLE_OPCODE = 0x80  # first byte of a pickle of protocol 2 or later (the package's files)


@dataclasses.dataclass(frozen=True)
class DeltaInfo:
    """How :func:`compress_data` coded a delta: the ``encoder`` half of its result.

    The container is self-describing, so decoding does not need this; :func:`decode_data`
    and :func:`save_checkpoint` only use it to check that it belongs to the data.

    Attributes:
        bits: lctriton symbol width used (from ``num_bits``, see the module docstring).
        shape: Shape of the delta.
        dtype: NumPy dtype name of the delta.
        error_bound: Largest absolute difference between the coded and the decoded values.
        closed_loop: Whether the previous step's quantization error was folded in.
    """

    bits: int
    shape: tuple[int, ...]
    dtype: str
    error_bound: float
    closed_loop: bool


class CompressedDelta(NamedTuple):
    """What :func:`compress_data` returns: a compressed delta and how it was coded.

    A 2-tuple, so that both the README's ``compressed_data = compress_data(δt)`` and the
    package's ``encoded, encoder = compress_data(δt)`` work; every function here accepts the
    whole tuple or its ``compressed`` half.

    Attributes:
        compressed: The delta in an lctriton container held in memory, as
            ``{"format": FORMAT_TAG, "delta": <ndarray>}`` coded with ``lc/1``.
        encoder: Its :class:`DeltaInfo`.
    """

    compressed: lctriton.Compressed
    encoder: DeltaInfo

    @property
    def nbytes(self) -> int:
        """Bytes of the container."""
        return self.compressed.nbytes

    @property
    def ratio(self) -> float:
        """Bytes of the delta in memory divided by bytes of the container."""
        return self.compressed.ratio

    @property
    def error_bound(self) -> float:
        """Largest absolute error of the decoded delta against the coded one."""
        return self.encoder.error_bound


@dataclasses.dataclass
class _Chain:
    """What :func:`initialize` recorded, and the error the closed loop carries."""

    model: torch.nn.Module | None = None
    optimizer: Any = None
    criterion: Any = None
    checkpoint_dir: str | None = None
    num_buckets: int | None = None
    num_bits: int | None = None
    base: dict[str, Any] | None = None
    residual: np.ndarray | None = None


_lock = threading.Lock()
_chain = _Chain()

# The package's module-level variables, served from the chain (PEP 562) so that scripts
# reading e.g. ``lc_checkpoint.checkpoint_dir`` see what initialize() was given.
_MODULE_ATTRIBUTES = {
    "net": "model",
    "optimizer": "optimizer",
    "criterion": "criterion",
    "checkpoint_dir": "checkpoint_dir",
    "num_buckets": "num_buckets",
    "num_bits": "num_bits",
    "prev_state_dict": "base",
}


def __getattr__(name: str) -> Any:
    """Serve the package's module variables (``net``, ``num_bits``, ...) from the chain."""
    field = _MODULE_ATTRIBUTES.get(name)
    if field is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _lock:
        return getattr(_chain, field)


# --------------------------------------------------------------------------- validation


def _check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _lct_bits(num_bits: Any, name: str = "num_bits") -> int:
    """Map the package's ``num_bits`` to lctriton's ``bits`` (module docstring)."""
    value = _check_int(num_bits, name, minimum=1)
    return value if value <= 8 else DEFAULT_BITS


def _check_path(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, got {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):  # a PathLike may return bytes
        raise TypeError(f"{name} must be a text path, got {type(path).__name__}")
    if not path:
        raise ValueError(f"{name} must not be empty")
    return path


def _as_delta(value: Any, name: str) -> np.ndarray:
    """A real floating-point array from an ndarray, a tensor or a sequence of numbers."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as exc:  # ragged nesting
            raise TypeError(f"{name} must be an array of numbers: {exc}") from None
    else:
        raise TypeError(
            f"{name} must be a numpy array (or torch tensor) of numbers, got {type(value).__name__}"
        )
    kind = array.dtype.kind
    if kind == "f":
        if array.dtype.itemsize > 8:  # long double: torch cannot hold it
            return array.astype(np.float64)
        return array
    if kind in "biu":
        # Integers would be quantized as floats anyway; float64 keeps them exact.
        return array.astype(np.float64)
    raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")


def _entries(index: Mapping[str, Any]) -> dict[str, Any] | None:
    """The string-keyed entries of a container's top-level dict, or None if it is not ours."""
    tree = index.get("tree")
    if not isinstance(tree, dict) or tree.get("t") not in ("dict", "odict"):
        return None
    entries = {}
    for key, node in tree.get("v", []):
        if isinstance(key, dict) and key.get("t") == "str":
            entries[key.get("v")] = node
    if entries.get("format") != {"t": "str", "v": FORMAT_TAG}:
        return None
    delta = entries.get("delta")
    if not isinstance(delta, dict) or delta.get("t") != "ndarray":
        return None
    return entries


def _container_of(value: Any, name: str) -> lctriton.Compressed:
    """The lctriton container inside what :func:`compress_data` returned."""
    if isinstance(value, CompressedDelta):
        compressed = value.compressed
    elif isinstance(value, lctriton.Compressed):
        compressed = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        try:
            compressed = lctriton.Compressed.from_bytes(value)
        except FormatError as exc:
            raise FormatError(f"{name} is not an lctriton container: {exc}") from exc
    else:
        raise TypeError(
            f"{name} must be what compress_data returned (a CompressedDelta, or its "
            f"lctriton.Compressed half), got {type(value).__name__}"
        )
    if _entries(compressed.index) is None:
        raise ValueError(f"{name} is an lctriton container, but not a delta made by compress_data")
    return compressed


def _check_encoder(encoder: Any, encoded: Any, compressed: lctriton.Compressed) -> None:
    """Check that ``encoder`` (if given) describes ``compressed``."""
    if encoder is None:
        return
    if not isinstance(encoder, DeltaInfo):
        raise TypeError(
            "encoder must be None or the DeltaInfo that compress_data returned, got "
            f"{type(encoder).__name__} (encoders of the lc_checkpoint package cannot be used)"
        )
    if isinstance(encoded, CompressedDelta):
        matches = encoded.encoder == encoder
    else:
        record = compressed.index["tensors"][0]
        matches = tuple(record["shape"]) == encoder.shape and record["dtype"] == encoder.dtype
    if not matches:
        raise ValueError("encoder does not belong to the compressed data it was passed with")


# --------------------------------------------------------------------------- the API


def initialize(
    model: torch.nn.Module,
    optimizer: Any,
    criterion: Any,
    checkpoint_dir: str | os.PathLike[str],
    num_buckets: int,
    num_bits: int,
) -> None:
    """Start a checkpoint chain for ``model``.

    Stores the arguments (readable as this module's ``net``, ``optimizer``, ... attributes),
    creates ``checkpoint_dir``, records a CPU copy of ``model.state_dict()`` as the base of
    the chain and starts the closed loop afresh (module docstring).

    Args:
        model: The model being trained.
        optimizer: Its optimizer (stored only).
        criterion: Its loss function (stored only).
        checkpoint_dir: Directory for checkpoints; created if missing.
        num_buckets: The package's number of buckets (stored only, see the module docstring).
        num_bits: The package's number of bits (stored; pass it on to compress_data).

    Raises:
        TypeError: If ``model`` is not a ``torch.nn.Module``, ``checkpoint_dir`` not a path,
            or ``num_buckets``/``num_bits`` not ints.
        ValueError: If ``num_buckets`` or ``num_bits`` is below 1.
    """
    global _chain
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = _check_path(checkpoint_dir, "checkpoint_dir")
    buckets = _check_int(num_buckets, "num_buckets", minimum=1)
    bits = _check_int(num_bits, "num_bits", minimum=1)
    os.makedirs(directory, exist_ok=True)
    # A copy: the live state_dict's tensors change in place as training goes on.
    base = {
        name: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
        for name, value in model.state_dict().items()
    }
    with _lock:
        _chain = _Chain(model, optimizer, criterion, directory, buckets, bits, base, None)
    logger.info(
        "lc_checkpoint chain started in %s: %d state entries, num_bits=%d (lctriton bits=%d)",
        directory, len(base), bits, _lct_bits(bits),
    )


def reset() -> None:
    """Forget what :func:`initialize` recorded and the closed loop's carried error.

    Not in the original package: after it, :func:`compress_data` codes each delta on its
    own, as before any :func:`initialize`.
    """
    global _chain
    with _lock:
        _chain = _Chain()


def compress_data(
    δt: Any, num_bits: int = 3, k: int = 5, treshold: bool | int | None = True
) -> CompressedDelta:
    """Compress a delta (typically the flattened difference of two state dicts).

    The delta is coded as one lossy ``lc/1`` tensor against an all-zero base, so that the
    delta itself is quantized; after :func:`initialize` the previous step's quantization
    error is folded in first (closed loop, module docstring).

    Args:
        δt: The delta: a NumPy array (any shape, kept), a torch tensor or a sequence of
            numbers. Floating dtypes are kept; integers and bools are coded as float64.
        num_bits: The package's bit count; 1 to 8 is lctriton's ``bits``, anything larger
            means the default of 3.
        k: The package's bucket count; checked, otherwise ignored.
        treshold: The package's priority-promotion setting (spelled as there); checked,
            otherwise ignored.

    Returns:
        A :class:`CompressedDelta` ``(compressed, encoder)``.

    Raises:
        TypeError: If ``δt`` is not an array of real numbers, or ``num_bits``, ``k`` or
            ``treshold`` has the wrong type.
        ValueError: If ``num_bits`` or ``k`` is below 1.
    """
    array = _as_delta(δt, "δt")
    bits = _lct_bits(num_bits)
    _check_int(k, "k", minimum=1)
    if treshold is not None and (
        isinstance(treshold, np.bool_) or not isinstance(treshold, (bool, int, np.integer))
    ):
        raise TypeError(f"treshold must be a bool, an int or None, got {type(treshold).__name__}")

    with _lock:
        closed = _chain.base is not None
        residual = _chain.residual
        same_chain = residual is not None and residual.shape == array.shape
        same_chain = same_chain and residual.dtype == array.dtype
        if closed and same_chain:
            target = array + residual
        else:
            if residual is not None:
                logger.info("δt changed shape or dtype: the closed loop starts a new chain")
            target = array
        compressed, reconstruction = lctriton.compress(
            {"format": FORMAT_TAG, "delta": target},
            return_reconstruction=True,
            lossless_key=False,
            min_numel=0,
            bits=bits,
        )
        if closed:
            with np.errstate(invalid="ignore", over="ignore"):
                carried = target - reconstruction["delta"]
            # NaN/inf are stored exactly; carrying inf - inf = NaN would poison every later step.
            carried[~np.isfinite(carried)] = 0
            _chain.residual = carried

    record = compressed.index["tensors"][0]
    bound = float(record.get("bound", 0.0)) if record["codec"] in ("lc/1", "lc/2") else 0.0
    info = DeltaInfo(bits, tuple(array.shape), str(array.dtype), bound, closed)
    logger.debug(
        "compressed a delta of %d elements: %d bytes, bound %g",
        array.size, compressed.nbytes, bound,
    )
    return CompressedDelta(compressed, info)


def decode_data(encoded: Any, encoder: DeltaInfo | None = None) -> np.ndarray:
    """Decode a delta.

    Accepts both the README's ``decode_data(compressed_data)`` and the package's
    ``decode_data(encoded, encoder)``. For the README's step 4, which passes on what
    :func:`load_checkpoint` returned, an already decoded ``(delta, epoch)`` pair or array is
    returned as it is.

    Args:
        encoded: What :func:`compress_data` returned, its ``compressed`` half, or the bytes of
            such a container; or :func:`load_checkpoint`'s ``(delta, epoch)``.
        encoder: Optional :class:`DeltaInfo` of ``encoded``, checked against it.

    Returns:
        The decoded delta: a floating NumPy array of the shape and dtype handed to
        :func:`compress_data`.

    Raises:
        TypeError: If ``encoded`` or ``encoder`` has the wrong type.
        ValueError: If ``encoder`` does not describe ``encoded``, or ``encoded`` is not a
            delta written by this module (:class:`lctriton.FormatError` if it is corrupt).
    """
    if isinstance(encoded, tuple) and not isinstance(encoded, CompressedDelta):
        if (
            len(encoded) == 2
            and isinstance(encoded[0], np.ndarray)
            and encoded[0].dtype.kind == "f"
            and isinstance(encoded[1], (int, np.integer))
        ):
            return encoded[0]
        raise TypeError(
            "encoded must be what compress_data or load_checkpoint returned, got a tuple of "
            f"({', '.join(type(v).__name__ for v in encoded)})"
        )
    if isinstance(encoded, np.ndarray):
        if encoded.dtype.kind != "f":
            raise TypeError(
                f"encoded must be a compressed delta or a float array, got dtype {encoded.dtype}"
            )
        return encoded
    compressed = _container_of(encoded, "encoded")
    _check_encoder(encoder, encoded, compressed)
    return lctriton.decompress(compressed)["delta"]


def save_checkpoint(
    filename: str | os.PathLike[str],
    compressed_data: Any,
    epoch: int,
    iteration: int,
    encoder: DeltaInfo | None = None,
) -> None:
    """Write a compressed delta, with its epoch and iteration, to ``filename``.

    The file is an lctriton container holding ``{"format", "delta", "epoch", "iteration"}``;
    the delta's coded bytes are copied, not coded again (a second quantization would add a
    second error). It is written under a temporary name and renamed, so a crash leaves the
    old file or the new one. Parent directories are created.

    Args:
        filename: Destination path (used as given, unlike the package).
        compressed_data: What :func:`compress_data` returned, or its ``compressed`` half.
        epoch: Epoch number, a non-negative int.
        iteration: Iteration number, a non-negative int.
        encoder: Optional :class:`DeltaInfo`, as the package's fifth argument; checked.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``epoch``/``iteration`` is negative, ``compressed_data`` is not a delta
            from :func:`compress_data`, or ``encoder`` does not describe it.
    """
    path = _check_path(filename, "filename")
    compressed = _container_of(compressed_data, "compressed_data")
    epoch = _check_int(epoch, "epoch", minimum=0)
    iteration = _check_int(iteration, "iteration", minimum=0)
    _check_encoder(encoder, compressed_data, compressed)

    source = compressed.index
    tree = source["tree"]
    # Re-saving a container that already has counters replaces them.
    items = [
        pair for pair in tree["v"]
        if not (pair[0].get("t") == "str" and pair[0].get("v") in ("epoch", "iteration"))
    ]
    items.append([{"t": "str", "v": "epoch"}, {"t": "int", "v": epoch}])
    items.append([{"t": "str", "v": "iteration"}, {"t": "int", "v": iteration}])
    index = {key: value for key, value in source.items() if key != "sections"}
    index["tree"] = {"t": tree["t"], "v": items}
    container = compressed.container
    sections = [
        [np.frombuffer(container.section(i), dtype=np.uint8)] for i in range(container.num_sections)
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    api.write_atomic(path, lambda f: fmt.write_container(f, index, sections))
    logger.debug("saved epoch %d iteration %d to %s", epoch, iteration, path)


def load_checkpoint(filename: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read a checkpoint written by :func:`save_checkpoint` and decode its delta.

    The file is checked (checksums, structure) and decoded without unpickling anything.

    Args:
        filename: The file.

    Returns:
        ``(delta, epoch)``: the decoded delta as a floating NumPy array, and the epoch.

    Raises:
        TypeError: If ``filename`` is not a path.
        FileNotFoundError: If it does not exist.
        lctriton.FormatError: If it is not a checkpoint written by :func:`save_checkpoint`
            (for instance a pickle written by the original package), or is corrupt.
    """
    path = _check_path(filename, "filename")
    try:
        state = lctriton.load(path)
    except FormatError as exc:
        hint = ""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read(1) == bytes([_PICKLE_OPCODE]):
                hint = (
                    " (it looks like a pickle, as the lc_checkpoint package writes; this module "
                    "never unpickles)"
                )
        raise type(exc)(f"filename {path!r}: {exc}{hint}") from exc
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT_TAG
        or not isinstance(state.get("delta"), np.ndarray)
        or not isinstance(state.get("epoch"), int)
    ):
        raise FormatError(
            f"filename {path!r} is an lctriton container but not a checkpoint written by "
            "save_checkpoint"
        )
    return state["delta"], state["epoch"]


def calculate_compression_rate(
    prev_state_dict: Any, num_bits: int = 3, num_buckets: int = 5
) -> float:
    """The compression ratio lctriton achieves: bytes in memory over bytes of the container.

    The package returns ``len(prev_state_dict) * log2(num_buckets) + num_buckets * num_bits``
    (the number of keys, not of elements, so not a size of anything). This returns a ratio
    (greater than 1 means smaller than in memory), measured by actually compressing:

    * a state dict is coded as a checkpoint of the chain: every floating tensor of at least
      lctriton's ``min_numel`` (1024) elements lossily, against the same-named tensor of the
      base recorded by :func:`initialize` if there is one, else against zero; smaller and
      non-floating tensors exactly;
    * an array (a flat delta) is coded as :func:`compress_data` codes it, without touching the
      closed loop.

    The ratio includes the container's header and index.

    Args:
        prev_state_dict: A state dict (any mapping lctriton can store), or a delta array.
        num_bits: As in :func:`compress_data`.
        num_buckets: Checked, otherwise ignored (module docstring).

    Returns:
        The ratio; 0.0 for a state without tensor data.

    Raises:
        TypeError: If ``prev_state_dict`` is neither a mapping nor an array of numbers, or
            holds something lctriton cannot store; or ``num_bits``/``num_buckets`` is not an int.
        ValueError: If ``num_bits`` or ``num_buckets`` is below 1.
    """
    bits = _lct_bits(num_bits)
    _check_int(num_buckets, "num_buckets", minimum=1)
    if isinstance(prev_state_dict, Mapping):
        with _lock:
            base = _chain.base
        compressed = lctriton.compress(prev_state_dict, base=base, lossless_key=False, bits=bits)
    else:
        array = _as_delta(prev_state_dict, "prev_state_dict")
        compressed = lctriton.compress(
            {"format": FORMAT_TAG, "delta": array}, lossless_key=False, min_numel=0, bits=bits
        )
    return float(compressed.ratio)


# --------------------------------------------------------------------------- restore


def _load_initial_state(path: str) -> Mapping[str, Any]:
    """The initial state: an lctriton container, or a ``torch.save`` file read weights-only."""
    with open(path, "rb") as f:
        magic = f.read(len(fmt.MAGIC))
    if magic == fmt.MAGIC:
        state = lctriton.load(path)
    else:
        # The package's users write this file with torch.save; weights_only=True reads it with
        # torch's restricted loader, which only rebuilds tensors and plain containers.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"init_filename {path!r} is neither an lctriton container nor a state dict that "
                f"torch.load(weights_only=True) accepts: {exc}"
            ) from exc
    if not isinstance(state, Mapping):
        raise ValueError(
            f"init_filename {path!r} does not hold a state dict (got {type(state).__name__})"
        )
    return state


def _chain_positions(last_epoch: int, last_iter: int, max_iter: int) -> Iterator[tuple[int, int]]:
    """(epoch, iteration) of every checkpoint after the initial one, in training order."""
    for epoch in range(last_epoch):
        for it in range(max_iter):
            if (epoch, it) != (0, 0):
                yield epoch, it
    for it in range(last_iter + 1):
        if (last_epoch, it) != (0, 0):
            yield last_epoch, it


def _layout(state: Mapping[str, Any], size: int, path: str) -> str:
    """Which entries of ``state`` a flat delta of ``size`` elements covers."""
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    every = sum(t.numel() for t in tensors)
    floating = sum(t.numel() for t in tensors if t.is_floating_point())
    if size == every:
        return "all"
    if size == floating:
        return "floating"
    raise ValueError(
        f"{path}: the delta has {size} elements, but init_model's state_dict has {every} "
        f"(all tensors) or {floating} (floating tensors)"
    )


def _apply(state: Mapping[str, Any], total: np.ndarray, layout: str) -> dict[str, torch.Tensor]:
    """``state`` plus the flat ``total``, tensor by tensor in state order."""
    out = {}
    offset = 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if layout == "floating" and not tensor.is_floating_point():
            continue
        n = tensor.numel()
        step = torch.from_numpy(total[offset : offset + n]).reshape(tensor.shape)
        offset += n  # advance, unlike the package (which resets the offset every tensor)
        current = tensor.detach().cpu()
        if tensor.is_floating_point() or tensor.is_complex():
            wide = torch.complex128 if tensor.is_complex() else torch.float64
            updated = (current.to(wide) + step).to(tensor.dtype)
        elif tensor.dtype == torch.bool:
            updated = (current.to(torch.float64) + step).round() != 0
        else:
            # Counters such as num_batches_tracked: the decoded delta is only near an integer.
            updated = (current.to(torch.float64) + step).round().to(tensor.dtype)
        out[name] = updated
    return out


def _restore(
    init_model: Any,
    last_epoch: Any,
    last_iter: Any,
    max_iter: Any,
    init_filename: Any,
    cpt_name: Any,
    workers: int,
) -> torch.nn.Module:
    if not isinstance(init_model, torch.nn.Module):
        raise TypeError(f"init_model must be a torch.nn.Module, got {type(init_model).__name__}")
    last_epoch = _check_int(last_epoch, "last_epoch", minimum=0)
    last_iter = _check_int(last_iter, "last_iter", minimum=0)
    max_iter = _check_int(max_iter, "max_iter", minimum=0)
    init_path = _check_path(init_filename, "init_filename")
    prefix = _check_path(cpt_name, "cpt_name")

    init_model.load_state_dict(_load_initial_state(init_path))
    state = init_model.state_dict()
    positions = _chain_positions(last_epoch, last_iter, max_iter)
    paths = [f"{prefix}_epoch{e}_iter{j}.pt" for e, j in positions]
    # Fail before decoding anything: a chain with a hole cannot be restored correctly.
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(paths)} checkpoints of the chain are missing, "
            f"the first is {missing[0]!r} (cpt_name={prefix!r})"
        )

    total: np.ndarray | None = None
    layout = ""
    for path, delta in zip(paths, _load_deltas(paths, workers), strict=True):
        flat = delta.reshape(-1)
        if total is None:
            layout = _layout(state, flat.size, path)
            total = np.zeros(flat.size, dtype=np.float64)  # float64: many small steps add up
        elif flat.size != total.size:
            raise ValueError(
                f"{path}: the delta has {flat.size} elements, the chain's first has {total.size}"
            )
        total += flat
    if total is not None:
        init_model.load_state_dict(_apply(state, total, layout), strict=False)
    logger.info(
        "restored %s from %s and %d deltas", type(init_model).__name__, init_path, len(paths)
    )
    return init_model


def _load_deltas(paths: list[str], workers: int) -> Iterable[np.ndarray]:
    """Decoded deltas of ``paths`` in order, at most ``2 * workers`` held at once."""
    if workers <= 1 or len(paths) <= 1:
        for path in paths:
            yield load_checkpoint(path)[0]
        return
    window = 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), window):
            yield from (d for d, _ in pool.map(load_checkpoint, paths[start : start + window]))


def restore_model(
    init_model: torch.nn.Module,
    last_epoch: int,
    last_iter: int,
    max_iter: int,
    init_filename: str | os.PathLike[str],
    cpt_name: str | os.PathLike[str] = "lc_checkpoint",
) -> torch.nn.Module:
    """Rebuild a model from its initial state and the chain of saved deltas.

    Follows the package's naming: the deltas are ``f"{cpt_name}_epoch{e}_iter{j}.pt"`` for
    every epoch ``e < last_epoch`` and iteration ``j < max_iter``, then epoch ``last_epoch``
    up to ``last_iter`` inclusive; ``(0, 0)`` is skipped, as ``init_filename`` holds the state
    it restores to. Each delta is the concatenation of the flattened ``state_dict`` tensors in
    order (the package's layout) or of the floating ones only; the sum of all deltas is added
    tensor by tensor (integer tensors rounded).

    Args:
        init_model: A model of the right architecture; loaded in place and returned.
        last_epoch: Epoch of the last checkpoint to apply.
        last_iter: Iteration of the last checkpoint to apply, within ``last_epoch``.
        max_iter: Iterations per epoch.
        init_filename: The initial state dict: an lctriton container or a ``torch.save``
            file (read with ``weights_only=True``, the restricted loader).
        cpt_name: Path prefix of the delta files.

    Returns:
        ``init_model``, holding the restored state.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a number is negative, or a delta does not fit ``init_model``.
        FileNotFoundError: If ``init_filename`` or any delta of the chain is missing.
    """
    return _restore(init_model, last_epoch, last_iter, max_iter, init_filename, cpt_name, workers=1)


def restore_model_async(
    init_model: torch.nn.Module,
    last_epoch: int,
    last_iter: int,
    max_iter: int,
    init_filename: str | os.PathLike[str],
    cpt_name: str | os.PathLike[str] = "lc_checkpoint",
    n_cores: int | None = None,
) -> torch.nn.Module:
    """:func:`restore_model`, decoding the deltas in ``n_cores`` threads.

    The package uses processes; lctriton's decoder releases the GIL in its NumPy/torch work,
    so threads suffice and nothing is pickled between processes. Deltas are still added in
    chain order, so the result equals :func:`restore_model`'s.

    Args:
        init_model: As in :func:`restore_model`.
        last_epoch: As in :func:`restore_model`.
        last_iter: As in :func:`restore_model`.
        max_iter: As in :func:`restore_model`.
        init_filename: As in :func:`restore_model`.
        cpt_name: As in :func:`restore_model`.
        n_cores: Threads; default half the CPUs (the package's default), at least 1.

    Returns:
        ``init_model``, holding the restored state.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: As :func:`restore_model`, or if ``n_cores`` is below 1.
        FileNotFoundError: As :func:`restore_model`.
    """
    if n_cores is None:
        workers = max(1, (os.cpu_count() or 2) // 2)
    else:
        workers = _check_int(n_cores, "n_cores", minimum=1)
    return _restore(
        init_model, last_epoch, last_iter, max_iter, init_filename, cpt_name, workers=workers
    )
