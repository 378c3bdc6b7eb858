"""The drop-in calls: compress, decompress, save, load and inspect.

A delta checkpoint is coded against a *base*: the state the previous checkpoint restores
to (what :func:`decompress` or :func:`load` returned for it, or the reconstruction that
``compress(..., return_reconstruction=True)`` hands back). Using the reconstruction rather
than the true previous weights keeps the error of every checkpoint in a chain within one
quantization step.

Example:
    >>> key = lctriton.compress(model.state_dict())             # lossless key checkpoint
    >>> base = lctriton.decompress(key)
    >>> delta, base = lctriton.compress(model.state_dict(), base=base, return_reconstruction=True)
    >>> restored = lctriton.decompress(delta, base=lctriton.decompress(key))
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch

from lctriton import codecs, pipeline
from lctriton import format as fmt
from lctriton.config import CodecOptions

__all__ = ["Compressed", "compress", "compress_each", "decompress", "save", "load", "inspect"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class Compressed:
    """A compressed state: a container in memory.

    Attributes:
        raw_nbytes: Bytes of the state's tensors as held in memory.
    """

    def __init__(self, encoded: pipeline.EncodedState | None = None, container: fmt.Container | None = None):
        self._encoded = encoded
        self._container = container
        self._bytes: bytes | None = None
        if encoded is not None:
            self.raw_nbytes = encoded.raw_nbytes
        else:
            if container is None:
                raise ValueError("Compressed needs an encoded state or a container (use compress or from_bytes)")
            shapes = pipeline.validate_index(container.index)
            self.raw_nbytes = sum(n * torch.empty(0, dtype=d).element_size() for d, _, n in shapes)

    def to_bytes(self, format_version: int | None = None) -> bytes:
        """The container's bytes, as :func:`save` writes them.

        Args:
            format_version: Container major: 2 deflates the index, 1 writes the file that
                readers older than format 2 take (where they know every codec it uses),
                with the same sections. None: 2 for a state compressed here, the file's own
                version for one parsed from bytes. A parsed file written in the other
                version keeps its sections and its index text byte for byte.
        """
        native = self._native_version()
        version = native if format_version is None else fmt.check_version(format_version)
        if version != native:
            buf = io.BytesIO()
            self.write(buf, version)
            return buf.getvalue()
        if self._bytes is None:
            if self._encoded is None:
                self._bytes = bytes(self._container._buffer)  # noqa: SLF001 (own module family)
            else:
                self._encoded.wait_ready()
                buf = io.BytesIO()
                fmt.write_container(buf, self._encoded.index, self._encoded.sections, version)
                self._bytes = buf.getvalue()
        return self._bytes

    def write(self, stream: Any, format_version: int | None = None) -> int:
        """Write the container to a binary stream; returns the bytes written.

        Args:
            stream: Writable binary stream.
            format_version: As in :meth:`to_bytes`.
        """
        native = self._native_version()
        version = native if format_version is None else fmt.check_version(format_version)
        if self._encoded is not None and (self._bytes is None or version != native):
            self._encoded.wait_ready()
            return fmt.write_container(stream, self._encoded.index, self._encoded.sections, version)
        if self._encoded is None and version != native:
            # A parsed file in the other version: its sections and index text, copied.
            return fmt.rewrite_container(self.container, stream, version)
        data = self.to_bytes(version)
        stream.write(data)
        return len(data)

    def _native_version(self) -> int:
        """The major :meth:`to_bytes` writes by default."""
        return fmt.MAJOR_VERSION if self._encoded is not None else self.container.version[0]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Compressed:
        """Parse a container held in memory.

        Raises:
            FormatError: If the bytes are not a valid container (saying what is wrong).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        c = cls(container=fmt.read_container(data))
        c._bytes = bytes(data)
        return c

    @property
    def container(self) -> fmt.Container:
        if self._container is None:
            self._container = fmt.read_container(self.to_bytes())
        return self._container

    @property
    def nbytes(self) -> int:
        """Bytes of the container."""
        return len(self.to_bytes())

    @property
    def payload_nbytes(self) -> int:
        """Bytes of the coded tensors (the container less its index and padding), known
        without serializing and without waiting for a GPU's copies to the host."""
        if self._encoded is None:
            return self.nbytes
        return sum(part.nbytes for parts in self._encoded.sections for part in parts)

    @property
    def ratio(self) -> float:
        """``raw_nbytes / nbytes``."""
        return self.raw_nbytes / self.nbytes

    @property
    def index(self) -> dict[str, Any]:
        """The container's index (tree and tensor records)."""
        return self._encoded.index if self._encoded is not None else self.container.index

    def __repr__(self) -> str:
        return f"Compressed({len(self.index['tensors'])} tensors, {self.raw_nbytes} -> {self.nbytes} bytes, {self.ratio:.1f}x)"


def compress(
    obj: Any,
    base: Any = None,
    *,
    return_reconstruction: bool = False,
    progress: Progress | None = None,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> Compressed | tuple[Compressed, Any]:
    """Compress a state (a state dict, or any nesting of dicts, lists and tuples).

    Args:
        obj: The state.
        base: The state the previous checkpoint restores to. Floating tensors are coded as
            deltas against the same-named tensor of ``base``; without a base the state is a
            key checkpoint, stored losslessly by default.
        return_reconstruction: Also return the state a decoder restores: the ``base`` of the
            next checkpoint in a chain, without decoding this one.
        progress: Called with (bytes done, bytes total).
        metadata: A JSON object (str keys; numbers, strings, bools, None, lists and objects)
            stored in the container's index; :func:`inspect` returns it.
        **options: Codec options (:class:`lctriton.config.CodecOptions`): ``bits``,
            ``lossless``, ``lossless_key``, ``exact``, ``min_numel``, ``chunk_symbols``.

    Returns:
        The compressed state, or ``(compressed, reconstruction)``.

    Raises:
        TypeError: If an option is unknown or the state holds an object that cannot be
            stored (the message names where).
        ValueError: If an option's value is invalid.
    """
    opts = CodecOptions.from_kwargs(**options)
    encoded = pipeline.encode_state(obj, base, opts, reconstruct=return_reconstruction, progress=progress)
    if metadata is not None:
        encoded.index["meta"] = _checked_metadata(metadata)
    result = Compressed(encoded)
    if return_reconstruction:
        return result, encoded.reconstruction
    return result


def compress_each(
    states: list[Any],
    bases: list[Any] | None = None,
    *,
    return_reconstruction: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> list[Compressed] | tuple[list[Compressed], list[Any]]:
    """Compress several independent states, each as :func:`compress` would, at once.

    The tensors of every state are coded by one pool of threads, so many small states
    (the chunks one rank writes in a distributed checkpoint) cost no more than one state
    holding them all, and each still gets its own container.

    Args:
        states: The states.
        bases: One base per state (None entries for keys), or None for all keys.
        return_reconstruction: Also return the reconstruction of each state.
        progress: Called with (bytes done, bytes total) over all states.
        **options: Codec options, as for :func:`compress`.

    Returns:
        The compressed states in order, or ``(compressed states, reconstructions)``.

    Raises:
        ValueError: If ``bases`` does not have one entry per state, or an option is invalid.
        TypeError: If an option is unknown or a state holds an object that cannot be stored.
    """
    states = list(states)
    bases = [None] * len(states) if bases is None else list(bases)
    if len(bases) != len(states):
        raise ValueError(
            f"bases must have one entry per state: {len(bases)} bases, {len(states)} states"
        )
    opts = CodecOptions.from_kwargs(**options)
    encoded = pipeline.encode_states(
        list(zip(states, bases, strict=True)), opts, reconstruct=return_reconstruction, progress=progress
    )
    results = [Compressed(e) for e in encoded]
    if return_reconstruction:
        return results, [e.reconstruction for e in encoded]
    return results


def _checked_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise TypeError("metadata must be a dict with str keys")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be plain JSON (str keys, finite numbers): {exc}") from None
    return metadata


def decompress(
    compressed: Compressed | bytes | bytearray | memoryview,
    base: Any = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Any:
    """Restore a state from :func:`compress`'s output (or its bytes).

    Args:
        compressed: A :class:`Compressed` or the bytes of a container.
        base: For a delta checkpoint, the state its predecessor restores to.
        device: Device for the restored tensors (default: the base tensor's device for
            deltas, else CPU).
        progress: Called with (bytes done, bytes total).

    Raises:
        BaseMismatchError: If the base is missing or is not the one the delta was coded
            against.
        FormatError: If the data is corrupt, truncated or not a container.
    """
    if isinstance(compressed, (bytes, bytearray, memoryview)):
        compressed = Compressed.from_bytes(compressed)
    if not isinstance(compressed, Compressed):
        raise TypeError(f"compressed must be a Compressed or bytes, got {type(compressed).__name__}")
    return pipeline.decode_state(compressed.container, base, device, progress)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames in ``directory`` durable; platforms without directory fds skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(
    path: str | os.PathLike[str],
    obj: Any,
    base: Any = None,
    *,
    progress: Progress | None = None,
    metadata: dict[str, Any] | None = None,
    format_version: int = fmt.MAJOR_VERSION,
    **options: Any,
) -> Compressed:
    """Compress a state and write it to ``path`` atomically.

    The file is written under a temporary name in the same directory, flushed to storage,
    then renamed over ``path``: a crash at any moment leaves either the old file or the new
    one, never a mix.

    Args:
        path: Destination file.
        obj: The state.
        base: As in :func:`compress`.
        progress: Called with (bytes done, bytes total) while encoding.
        metadata: As in :func:`compress`.
        format_version: Container major, as in :meth:`Compressed.to_bytes`: 1 writes a file
            that readers older than format 2 take, where they know every codec it uses.
        **options: Codec options, as in :func:`compress`.

    Returns:
        The compressed state (its ``nbytes`` is the size of the default, version 2 file).
    """
    format_version = fmt.check_version(format_version)
    compressed = compress(obj, base, progress=progress, metadata=metadata, **options)
    write_atomic(path, lambda f: compressed.write(f, format_version))
    return compressed


def write_atomic(
    path: str | os.PathLike[str], source: Compressed | Callable[[Any], int], fsync: bool = True
) -> int:
    """Write a container to ``path`` atomically: temporary file, flush, fsync, rename.

    A crash at any moment leaves either the previous file or the new one.

    Args:
        path: Destination.
        source: A :class:`Compressed`, or a function that writes to a binary file and
            returns the number of bytes written.
        fsync: Flush the file and the directory to storage.

    Returns:
        The number of bytes written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # A fresh name with O_EXCL, created with mode 0o666 so that the umask applies as for
    # any new file (mkstemp would force 0o600).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            written = source(f) if callable(source) else source.write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(directory)
    return written


def load(
    path: str | os.PathLike[str],
    base: Any = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Any:
    """Read a state saved by :func:`save`.

    The file is memory-mapped and each section is checked against its checksum before it
    is decoded. Loading never unpickles: a file from an untrusted source cannot run code.

    Args:
        path: The file.
        base: For a delta checkpoint, the state its predecessor restores to.
        device: Device for the restored tensors.
        progress: Called with (bytes done, bytes total).

    Raises:
        BaseMismatchError: If the base is missing or wrong.
        FormatError: If the file is corrupt, truncated or not an lctriton file.
    """
    container = fmt.open_container(path)
    try:
        return pipeline.decode_state(container, base, device, progress)
    finally:
        container.close()


def inspect(path: str | os.PathLike[str] | bytes | Compressed) -> dict[str, Any]:
    """Describe a container without decoding it.

    Args:
        path: A file path, the bytes of a container, or a :class:`Compressed`.

    Returns:
        ``{"version", "nbytes", "raw_nbytes", "ratio", "delta", "tensors": [...]}`` where each
        tensor entry has ``name``, ``dtype``, ``shape``, ``codec``, ``raw_nbytes``,
        ``stored_nbytes``, ``ratio``, ``error_bound`` (the record's bound on the quantization
        error: absolute for ``lc`` deltas, relative to the value's bin for ``lq``, in units of
        ``sqrt(v)`` for ``sq/1`` and ``sq/2``; 0 for exact codecs), ``exceptions`` and ``base``
        (fingerprint or None).

    Raises:
        FormatError: If the container is invalid.
    """
    opened = None
    if isinstance(path, Compressed):
        container = path.container
    elif isinstance(path, (bytes, bytearray, memoryview)):
        container = fmt.read_container(path)
    else:
        container = opened = fmt.open_container(path)
    try:
        return _describe(container)
    finally:
        if opened is not None:
            opened.close()


def _describe(container: fmt.Container) -> dict[str, Any]:
    index = container.index
    shapes = pipeline.validate_index(index)
    tensors = []
    for rec, (dtype, shape, numel) in zip(index["tensors"], shapes, strict=True):
        raw = numel * torch.empty(0, dtype=dtype).element_size()
        stored = index["sections"][rec["section"]][1]
        tensors.append(
            {
                "name": rec["name"],
                "dtype": rec["dtype"],
                "shape": list(shape),
                "codec": rec["codec"],
                "raw_nbytes": raw,
                "stored_nbytes": stored,
                "ratio": raw / stored if stored else float("inf"),
                "error_bound": (rec.get("bound") or 0.0) if rec["codec"] in codecs.LOSSY_CODECS else 0.0,
                "bits": rec.get("bits"),
                "exceptions": rec.get("exceptions", 0),
                "base": rec.get("base"),
            }
        )
    raw_total = sum(t["raw_nbytes"] for t in tensors)
    return {
        "version": "{}.{}".format(*container.version),
        "nbytes": container.size,
        "raw_nbytes": raw_total,
        "ratio": raw_total / container.size,
        "delta": any(t["base"] for t in tensors),
        "metadata": index.get("meta") if isinstance(index.get("meta"), dict) else None,
        "tensors": tensors,
    }
