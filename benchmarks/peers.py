"""Baselines that the lctriton benchmarks compare against.

* :func:`torch_save_bytes` / :func:`torch_load_bytes`: plain ``torch.save`` and
  ``torch.load(weights_only=True)`` through an in-memory buffer (the uncompressed reference).
* :func:`zstd_compress` / :func:`zstd_decompress`: general-purpose lossless compression with
  the ``zstandard`` package (level 3 by default, zstd's own default).
* :class:`LcCheckpoint052`: the ``lc_checkpoint`` package, version 0.5.2 from PyPI (an
  implementation of Chen et al., "On Efficient Constructions of Checkpoints", ICML 2020),
  driven the way its README shows, on the flattened delta between two state dicts.

How lc_checkpoint 0.5.2 is run
------------------------------
Its README flattens every ``state_dict`` tensor with ``tensor.numpy().flatten()``,
concatenates them, subtracts the previous step's concatenation, and calls
``lc.compress_data(delta, num_bits=num_bits, k=num_buckets)`` with ``num_buckets = 5``, then
``lc.save_checkpoint(...)``. :func:`flatten_delta` does the flattening (float tensors only,
as float32); :meth:`LcCheckpoint052.compress` calls the package's own, unmodified
``compress_data`` with ``k=5`` (the README's value and the function's default), the default
``treshold=True``, and ``num_bits=3`` (the README passes 32; as shown below, ``num_bits``
cannot change the output, and we checked that 3 and 32 give byte-identical encodings).

Patches (all here, site-packages is not edited)
-----------------------------------------------
1. Decoding. The package's ``decode_data`` turns every decoded value into ``int(x) / 100.0``:
   it truncates the bucket means toward zero and divides by 100, so a bucket mean of 8.68
   comes back as 0.08 and any mean below 1 in magnitude as 0. :meth:`LcCheckpoint052.decompress`
   instead returns the codec's decoded symbols unchanged, as float32
   (``np.asarray(codec.decode(encoded), dtype=np.float32)``), i.e. exactly the ``new_δt``
   array that ``compress_data`` Huffman-encoded.
2. Size. ``save_checkpoint`` ignores its ``filename`` argument and always writes
   ``checkpoints/lc-checkpoint/lc_checkpoint_epoch{epoch}_iter{iteration}.pt`` under the
   current directory, as ``pickle.dump((compressed_data, encoder, epoch), f)``.
   :meth:`LcCheckpoint052.nbytes` returns ``len(pickle.dumps((encoded, codec, epoch)))`` with
   the same default pickle protocol and ``epoch=0``, which is the size of that file, without
   writing it.
3. Uninitialized memory. ``compress_data`` computes the binade of each rounded magnitude as
   ``exponent = np.floor(np.log2(x_abs, where=x_abs != 0))`` without ``out=``, so for every
   element that rounds to 0 (for real deltas: all of them, see below) the exponent is
   whatever the freshly allocated output buffer held. We saw both zeros (fresh pages) and
   reused garbage (huge values: NumPy overflow warnings, elements scattered over arbitrary
   "binades", a 5x change in speed between two calls on similar data), and a NaN there
   would make ``int(exponent[i])`` raise. With ``deterministic=True`` (the default),
   :meth:`LcCheckpoint052.compress` therefore runs ``compress_data`` with its module-level
   ``np`` swapped, for the duration of the call, for a proxy that is NumPy except that
   ``log2(x, where=...)`` without ``out=`` gets ``out=np.zeros_like(x)``: those elements get
   exponent 0, the value fresh memory gives, and results and timings are reproducible.
   Entries where ``x_abs != 0`` are computed exactly as before. ``deterministic=False`` runs
   the package untouched here too (NumPy's warning about it is silenced in both modes). The
   swap is not thread-safe: do not compress from two threads at once.

Patches 1 and 3 are the only ones that change values; nothing else in ``compress_data`` or
in the Huffman coding is altered.

Behaviours left as published (they define what the benchmark measures)
----------------------------------------------------------------------
For an input delta ``d`` (float32, one element per parameter), ``compress_data``:

1. Rounds magnitudes to integers first: ``x_abs = np.round(np.abs(d))`` (half to even), and
   does all bucketing on those integers. Every element with ``|d| < 0.5`` becomes 0. Per-step
   training deltas are orders of magnitude below 0.5 (the digits CNN's largest over ten Adam
   steps is about 0.013), so for real checkpoints every element rounds to 0.
2. Makes ``num_bits`` irrelevant: values are rounded to multiples of ``2**-num_bits``, but they
   are already integers after step 1.
3. Gives elements that round to 0 an uninitialized binade (patch 3 above pins it to 0, so
   they join the ``(sign, 0)`` group together with the elements that round to 1).
4. Groups elements by ``(sign, exponent)`` in a pure-Python loop over every element, which is
   why it runs at a few MB/s.
5. Keeps only the largest binade: the default ``treshold=True`` is used as a slice bound,
   ``sorted(exponents, reverse=True)[:True]``, i.e. ``[:1]``. Groups of the other binades are
   appended to a ``(sign, 0)`` group that is then not bucketed (unless 0 is itself the
   largest binade), so at most two groups survive: the positive and the negative elements of
   the largest binade. With ``k >= 2`` each gets its own bucket, so ``k`` does not matter
   either (the "merge buckets" branch only appends an empty bucket).
6. Reconstructs a delta that is the group mean (of the signed, integer-rounded values, each
   rounded to 2 decimals) on the elements of the largest binade of each sign and 0
   everywhere else, then Huffman-codes it with ``dahuffman`` (symbols are NumPy float32
   scalars; the codec object, code table included, is pickled into the checkpoint).
   Consequently, on real per-step deltas the decoded delta is exactly all zeros, the code has
   one data symbol plus end-of-file at 1 bit each, and the ratio is just under 32x of the
   float32 input, at a reconstruction error equal to the full delta.

Parts of the package not used here, also buggy as published: ``initialize`` only assigns
local variables; ``calculate_compression_rate``'s defaults are bound to ``None`` at import
time; ``restore_model`` resets ``last_idx = t_elements`` instead of advancing it and skips
the deltas of epoch ``last_epoch - 1``; ``load_checkpoint`` goes through the truncating
``decode_data``.
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "LC_CHECKPOINT_INSTALL_HINT",
    "LcCheckpoint052",
    "LcCompressed",
    "flatten_delta",
    "torch_load_bytes",
    "torch_save_bytes",
    "unflatten_delta",
    "zstd_compress",
    "zstd_decompress",
]

logger = logging.getLogger(__name__)

LC_CHECKPOINT_INSTALL_HINT = "pip install lc_checkpoint==0.5.2 dahuffman pathos"
"""The command that installs the package :class:`LcCheckpoint052` runs."""

_LC_VERSION = "0.5.2"
_UNINITIALIZED_WARNING = r"'where' used without 'out'"


def torch_save_bytes(state: Any) -> bytes:
    """Serializes ``state`` with ``torch.save`` into bytes.

    Args:
        state: Anything ``torch.save`` accepts, typically a ``state_dict``.

    Returns:
        The bytes ``torch.save`` would write to a file.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def torch_load_bytes(data: bytes) -> Any:
    """Inverse of :func:`torch_save_bytes`, with ``torch.load(weights_only=True)``.

    Args:
        data: Bytes produced by ``torch.save``.

    Returns:
        The loaded object.
    """
    return torch.load(io.BytesIO(data), weights_only=True)


def zstd_compress(data: bytes, level: int = 3) -> bytes:
    """Compresses ``data`` into one zstd frame (content size recorded in the header).

    Args:
        data: Bytes to compress.
        level: zstd compression level (3 is zstd's default).

    Returns:
        The zstd frame.

    Raises:
        ImportError: If the ``zstandard`` package is missing.
    """
    return _zstandard().ZstdCompressor(level=level).compress(data)


def zstd_decompress(data: bytes) -> bytes:
    """Decompresses a frame written by :func:`zstd_compress`.

    Args:
        data: A zstd frame.

    Returns:
        The original bytes.

    Raises:
        ImportError: If the ``zstandard`` package is missing.
    """
    return _zstandard().ZstdDecompressor().decompress(data)


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError("the zstd baseline needs zstandard: pip install zstandard") from exc
    return zstandard


def flatten_delta(
    previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """``current - previous``, float tensors only, flattened like lc_checkpoint's README.

    Tensors are visited in ``current``'s order and cast to float32 before subtracting.
    Non-floating tensors (step counters, integer buffers) are skipped: the README's
    ``np.concatenate`` would otherwise promote the whole delta to float64.

    Args:
        previous: The earlier state dict.
        current: The later state dict, with the same keys and shapes.

    Returns:
        A 1-D float32 array.

    Raises:
        ValueError: If the keys or shapes of the two state dicts differ.
    """
    if list(previous) != list(current):
        raise ValueError(
            f"state dicts have different keys: {sorted(set(previous) ^ set(current))}"
        )
    parts = []
    for name, now in current.items():
        before = previous[name]
        if now.shape != before.shape:
            raise ValueError(f"{name}: shape {tuple(before.shape)} became {tuple(now.shape)}")
        if now.is_floating_point():
            diff = now.detach().float().cpu() - before.detach().float().cpu()
            parts.append(diff.reshape(-1).numpy())
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def unflatten_delta(
    base: Mapping[str, torch.Tensor], delta: np.ndarray
) -> dict[str, torch.Tensor]:
    """Adds a flat delta from :func:`flatten_delta` back onto ``base``.

    Args:
        base: The earlier state dict.
        delta: A 1-D array with one value per floating-point element of ``base``.

    Returns:
        A new state dict: floating tensors are ``base + delta`` (in their own dtype),
        other tensors are copied unchanged.

    Raises:
        ValueError: If ``delta`` has the wrong number of elements.
    """
    flat = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float32).reshape(-1))
    expected = sum(t.numel() for t in base.values() if t.is_floating_point())
    if flat.numel() != expected:
        raise ValueError(f"delta has {flat.numel()} elements, the state dict has {expected} "
                         "floating-point elements")
    result, offset = {}, 0
    for name, tensor in base.items():
        if tensor.is_floating_point():
            piece = flat[offset : offset + tensor.numel()].view(tensor.shape)
            result[name] = (tensor.detach().float().cpu() + piece).to(tensor.dtype)
            offset += tensor.numel()
        else:
            result[name] = tensor.detach().clone()
    return result


@dataclass(frozen=True)
class LcCompressed:
    """What lc_checkpoint 0.5.2 keeps for one delta.

    Attributes:
        encoded: The Huffman bit stream ``compress_data`` returned.
        codec: The ``dahuffman.HuffmanCodec`` it returned (pickled into the checkpoint).
        size: Number of elements of the original delta.
    """

    encoded: bytes
    codec: Any
    size: int


class LcCheckpoint052:
    """The lc_checkpoint 0.5.2 package from PyPI, run the way its README shows.

    It works on the flattened delta between two state dicts (see :func:`flatten_delta`).

    Compression is the package's unmodified ``compress_data``; decoding and size accounting
    are patched as the module docstring lists, and nothing else is changed.

    Args:
        num_bits: Passed to ``compress_data`` (has no effect on its output, see the module
            docstring).
        k: Number of buckets passed to ``compress_data`` (5, as in the README).
        deterministic: Give elements that round to 0 the exponent 0 instead of uninitialized
            memory (patch 3 of the module docstring); ``False`` runs ``compress_data``
            exactly as published.

    Raises:
        ImportError: If ``lc_checkpoint`` (or its dependencies ``dahuffman``/``pathos``) is
            missing.
    """

    name = "lc_checkpoint 0.5.2"

    def __init__(self, num_bits: int = 3, k: int = 5, *, deterministic: bool = True) -> None:
        try:
            from lc_checkpoint import main as lc_main
        except ImportError as exc:
            raise ImportError(
                f"the LC-Checkpoint baseline needs lc_checkpoint {_LC_VERSION} "
                f"(missing: {exc.name}): {LC_CHECKPOINT_INSTALL_HINT}"
            ) from exc
        version = _installed_version("lc_checkpoint")
        if version != _LC_VERSION:
            # Other versions may behave differently from what the module docstring documents.
            logger.warning("lc_checkpoint %s is installed; this baseline documents %s",
                           version, _LC_VERSION)
        self._lc = lc_main
        self.num_bits = num_bits
        self.k = k
        self.deterministic = deterministic

    def compress(self, delta: np.ndarray) -> LcCompressed:
        """Runs ``lc_checkpoint.main.compress_data`` on a flat delta.

        Args:
            delta: 1-D delta, e.g. from :func:`flatten_delta`; cast to float32 like the
                README's ``tensor.numpy()`` values.

        Returns:
            The encoded stream and codec.

        Raises:
            ValueError: If ``delta`` is empty or not one-dimensional.
        """
        array = np.ascontiguousarray(delta, dtype=np.float32)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"delta must be a non-empty 1-D array, got shape {array.shape}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UNINITIALIZED_WARNING,
                                    category=UserWarning)
            if not self.deterministic:
                encoded, codec = self._lc.compress_data(array, num_bits=self.num_bits, k=self.k)
            else:
                published_np = self._lc.np
                self._lc.np = _ZeroFilledLog2(published_np)
                try:
                    encoded, codec = self._lc.compress_data(
                        array, num_bits=self.num_bits, k=self.k
                    )
                finally:
                    self._lc.np = published_np
        return LcCompressed(encoded=encoded, codec=codec, size=int(array.size))

    def nbytes(self, compressed: LcCompressed, epoch: int = 0) -> int:
        """Size of the file ``save_checkpoint`` would write for ``compressed``.

        Args:
            compressed: Output of :meth:`compress`.
            epoch: The epoch number it would pickle alongside.

        Returns:
            ``len(pickle.dumps((encoded, codec, epoch)))`` at the default protocol, as
            ``save_checkpoint``'s ``pickle.dump`` writes it.
        """
        return len(pickle.dumps((compressed.encoded, compressed.codec, epoch)))

    def decompress(self, compressed: LcCompressed) -> np.ndarray:
        """Decodes the Huffman stream into the delta ``compress_data`` encoded.

        This replaces the package's ``decode_data`` (which would return
        ``int(value) / 100``) by the codec's own decoded symbols.

        Args:
            compressed: Output of :meth:`compress`.

        Returns:
            A 1-D float32 array of ``compressed.size`` elements.

        Raises:
            ValueError: If the stream decodes to a different number of elements.
        """
        decoded = np.asarray(compressed.codec.decode(compressed.encoded), dtype=np.float32)
        if decoded.size != compressed.size:
            raise ValueError(f"lc_checkpoint stream decoded to {decoded.size} elements, "
                             f"expected {compressed.size}")
        return decoded


class _ZeroFilledLog2:
    """NumPy as lc_checkpoint sees it, except that a masked ``log2`` writes into zeros.

    Only ``log2(x, where=mask)`` without ``out=`` changes: it gets ``out=zeros_like(x)``
    so masked-out entries read 0 instead of uninitialized memory. Everything else is
    forwarded to the real module.
    """

    def __init__(self, numpy_module: Any) -> None:
        self._numpy = numpy_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._numpy, name)

    def log2(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if "where" in kwargs and kwargs.get("out") is None and not args:
            kwargs["out"] = self._numpy.zeros_like(x, dtype=self._numpy.result_type(x, 1.0))
        return self._numpy.log2(x, *args, **kwargs)


def _installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
