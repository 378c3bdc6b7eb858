"""Compressed, pickle-free storage for ``torch.distributed.checkpoint`` (DCP).

:class:`CompressedStorageWriter` and :class:`CompressedStorageReader` subclass DCP's
filesystem writer and reader and work unchanged with :func:`torch.distributed.checkpoint.save`,
:func:`~torch.distributed.checkpoint.load` and :func:`~torch.distributed.checkpoint.async_save`.
:class:`DistributedCheckpointManager` keeps a run of them (chains, retention, tags, crash
safety) under the same rules and manifest as :class:`lctriton.CheckpointManager`.

A checkpoint is a directory, local or any fsspec URL (``s3://bucket/run/step-1``)::

    step-1/
      __0_0.distcp     rank 0's chunks: one lctriton container (docs/format.md) per chunk
      __1_0.distcp     rank 1's chunks ...
      .metadata        written last by the coordinator: the completion marker

Each rank codes the chunks DCP plans for it (its shards: on the GPU for CUDA shards) in one
pass over a thread pool and writes them to its own file. A tensor chunk is a one-tensor
container; with a ``previous`` checkpoint, each floating chunk is a delta against the chunk
of ``previous`` with the same fully-qualified name and offsets, as that checkpoint restores
it; a chunk with no such match (new tensor, changed layout or shape) is a key chunk. A
non-tensor object (``param_groups``, counters) is stored as a lossless container of its
value tree, never pickled.

``.metadata`` is not DCP's pickle: it is ``MAGIC`` followed by strict ASCII JSON::

    {"format": "lctriton-dcp", "version": 1, "dcp_version": "...",
     "tensors": {fqn: {"dtype": "float32", "size": [..], "requires_grad": false,
                       "chunks": [{"offsets": [..], "sizes": [..]}, ...]}},
     "objects": [fqn, ...],
     "storage": [{"fqn": .., "offset": [..] | null, "file": "__0_0.distcp",
                  "at": byte offset, "length": .., "codec": "lct" | "obj",
                  "base": "../step-0" | null, "depth": 0}, ...],
     "planner": {fqn: [key, ...]} | null,
     "meta": {"checkpoint_id": .., "save_id": ..}}

Loading therefore never unpickles anything from storage. DCP's default load planner still
calls ``torch.load`` on the bytes it is handed for non-tensor objects; the reader hands it
bytes it has just serialized itself from the decoded value tree, not bytes from the file.

The reader decodes whole stored chunks (following delta bases into earlier checkpoints,
on the device of the tensor being loaded) and narrows them to the requested region, so
DCP's load planner reshards: save at one world size, load at another.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from lctriton import api, codecs
from lctriton.config import CodecOptions
from lctriton.errors import FormatError, LctError, TruncatedError
from lctriton.manager import Restored, SaveHandle
from lctriton.manifest import (
    CheckpointInfo,
    Manifest,
    check_manager_options,
    is_url,
    open_store,
)

__all__ = [
    "CompressedStorageInfo",
    "CompressedStorageReader",
    "CompressedStorageWriter",
    "DistributedCheckpointManager",
    "IncompleteCheckpointError",
    "ReconstructionCache",
    "is_complete",
    "load",
    "read_metadata",
    "save",
]

logger = logging.getLogger(__name__)

METADATA = ".metadata"
MAGIC = b"LCTDCP1\n"
_FORMAT = "lctriton-dcp"
_VERSION = 1
_KEY = "t"
#: Raw bytes of the chunks one rank codes in one batch: bounds the host memory that
#: compressed-but-unwritten containers (and, for keys, their raw copies) can hold.
_BATCH_BYTES = 256 << 20


class IncompleteCheckpointError(LctError, FileNotFoundError):
    """A DCP checkpoint directory has no ``.metadata``: its save never finished."""


@dataclasses.dataclass
class CompressedStorageInfo:
    """Where one stored chunk lives and how to decode it (kept in the checkpoint metadata).

    Attributes:
        relative_path: The rank file holding the chunk, relative to the checkpoint.
        offset: Byte offset of the chunk in that file.
        length: Byte length of the chunk.
        codec: ``"lct"``: a one-tensor container; ``"obj"``: a lossless container of a
            non-tensor object's value tree.
        base: Path of the checkpoint this chunk is a delta against, relative to this
            checkpoint; None for a key chunk.
        depth: Number of deltas between this chunk and its key chunk.
    """

    relative_path: str
    offset: int
    length: int
    codec: str = "lct"
    base: str | None = None
    depth: int = 0


# --------------------------------------------------------------------------- paths


def _filesystem(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """DCP's file-system layer for ``path`` (local, or fsspec for URLs) and the path as it
    takes it."""
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://") :]
    if is_url(path):
        # The fsspec layer torch's own FsspecWriter and FsspecReader use.
        from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFS

        fs = FsspecFS()
        return fs, fs.init_path(os.fspath(path))
    from torch.distributed.checkpoint.filesystem import FileSystem as LocalFS

    fs = LocalFS()
    return fs, fs.init_path(os.path.abspath(os.fspath(path)))


def _resolve(path: Any, relative: str) -> str:
    """``relative`` (a base checkpoint, ``../step-1``) resolved against checkpoint ``path``."""
    text = os.fspath(path)
    if is_url(text):
        proto, rest = text.split("://", 1)
        return f"{proto}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return os.path.normpath(os.path.join(text, relative))


def _relative(path: Any, start: Any) -> str:
    """``path`` relative to ``start`` (both local, or both URLs of one file system)."""
    a, b = os.fspath(path), os.fspath(start)
    if is_url(a) or is_url(b):
        pa, pb = a.split("://", 1), b.split("://", 1)
        if len(pa) != 2 or len(pb) != 2 or pa[0] != pb[0]:
            raise ValueError(f"previous checkpoint {a!r} is not on the file system of {b!r}")
        return posixpath.relpath(pa[1], pb[1])
    return os.path.relpath(os.path.abspath(a), os.path.abspath(b))


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    a, b = os.fspath(a), os.fspath(b)
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (local or fsspec URL) holds a finished checkpoint: its ``.metadata``
    exists."""
    fs, root = _filesystem(path)
    return bool(fs.exists(fs.concat_path(root, METADATA)))


# --------------------------------------------------------------------------- metadata

_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve": torch.preserve_format,
}
_MEMORY_FORMAT_NAMES = {v: k for k, v in _MEMORY_FORMATS.items()}


def _metadata_to_json(metadata: Metadata) -> bytes:
    tensors: dict[str, Any] = {}
    objects: list[str] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            objects.append(fqn)
            continue
        props = md.properties
        if props.dtype not in codecs.DTYPE_NAMES or props.layout != torch.strided:
            raise TypeError(f"{fqn}: cannot store a tensor of dtype {props.dtype}, layout {props.layout}")
        tensors[fqn] = {
            "dtype": codecs.DTYPE_NAMES[props.dtype],
            "size": list(md.size),
            "requires_grad": bool(props.requires_grad),
            "memory_format": _MEMORY_FORMAT_NAMES.get(props.memory_format, "contiguous"),
            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
        }
    storage = []
    for index, info in (metadata.storage_data or {}).items():
        storage.append({
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "file": info.relative_path, "at": info.offset, "length": info.length,
            "codec": info.codec, "base": info.base, "depth": info.depth,
        })
    planner = metadata.planner_data
    if planner is not None and not (
        isinstance(planner, dict)
        and all(
            isinstance(k, str) and isinstance(v, (tuple, list))
            and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in v)
            for k, v in planner.items()
        )
    ):
        # Only the default planners' flattening map has a known, plain shape; loading does
        # not need it (the load planner flattens the target state itself).
        logger.warning("planner data of type %s is not stored", type(planner).__name__)
        planner = None
    if planner is not None:
        planner = {k: list(v) for k, v in planner.items()}
    sm = metadata.storage_meta
    doc = {
        "format": _FORMAT, "version": _VERSION, "dcp_version": metadata.version,
        "tensors": tensors, "objects": objects, "storage": storage, "planner": planner,
        "meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id,
        },
    }
    return MAGIC + json.dumps(doc, ensure_ascii=True, allow_nan=False).encode("ascii")


def _fail(where: str, what: str) -> FormatError:
    return FormatError(f"{where}: {what}")


def _int_list(value: Any, where: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _fail(where, f"{what} must be a list of non-negative ints")
    return value


def _checked_int(d: dict, key: str, where: str, low: int = 0) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _fail(where, f"{key!r} must be an int >= {low}, got {v!r}")
    return v


def _metadata_from_json(data: bytes, where: str) -> Metadata:
    """Parse and check a ``.metadata`` document.

    Raises:
        FormatError: If it is not one (a pickle from plain DCP included), naming the problem.
    """
    if not data.startswith(MAGIC):
        raise _fail(where, "not written by lctriton's CompressedStorageWriter (unknown "
                           "metadata format; plain DCP metadata is a pickle and is not read)")
    try:
        doc = json.loads(data[len(MAGIC) :].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(where, f"metadata is not ASCII JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise _fail(where, "metadata is not an lctriton-dcp document")
    if doc.get("version") != _VERSION:
        raise _fail(where, f"metadata version {doc.get('version')!r} is not supported")
    tensors, objects, storage = doc.get("tensors"), doc.get("objects"), doc.get("storage")
    if not isinstance(tensors, dict) or not isinstance(objects, list) or not isinstance(storage, list):
        raise _fail(where, "metadata lacks its tensors, objects or storage table")
    sdm: dict[str, Any] = {}
    for fqn, t in tensors.items():
        w = f"{where}: tensor {fqn!r}"
        if not isinstance(t, dict) or t.get("dtype") not in codecs.DTYPES:
            raise _fail(w, "unknown or missing dtype")
        if t.get("memory_format", "contiguous") not in _MEMORY_FORMATS:
            raise _fail(w, "unknown memory format")
        size = _int_list(t.get("size"), w, "size")
        chunks = t.get("chunks")
        if not isinstance(chunks, list):
            raise _fail(w, "chunks must be a list")
        parsed = []
        for c in chunks:
            if not isinstance(c, dict):
                raise _fail(w, "a chunk must be an object")
            offsets = _int_list(c.get("offsets"), w, "chunk offsets")
            sizes = _int_list(c.get("sizes"), w, "chunk sizes")
            if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)
            ):
                raise _fail(w, f"chunk {offsets}+{sizes} lies outside size {size}")
            parsed.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        props = TensorProperties(
            dtype=codecs.DTYPES[t["dtype"]], layout=torch.strided,
            requires_grad=bool(t.get("requires_grad", False)),
            memory_format=_MEMORY_FORMATS[t.get("memory_format", "contiguous")],
        )
        sdm[fqn] = TensorStorageMetadata(props, torch.Size(size), parsed)
    for fqn in objects:
        if not isinstance(fqn, str) or fqn in sdm:
            raise _fail(where, f"object entry {fqn!r} is not a new name")
        sdm[fqn] = BytesStorageMetadata()
    storage_data: dict[MetadataIndex, CompressedStorageInfo] = {}
    for s in storage:
        if not isinstance(s, dict) or not isinstance(s.get("fqn"), str) or s["fqn"] not in sdm:
            raise _fail(where, f"storage entry {s!r} names no stored tensor or object")
        w = f"{where}: chunk {s['fqn']!r}"
        offset = s.get("offset")
        offset = None if offset is None else torch.Size(_int_list(offset, w, "offset"))
        rel = s.get("file")
        if not isinstance(rel, str) or not rel.endswith(".distcp") or "/" in rel or "\\" in rel or rel.startswith("."):
            raise _fail(w, f"file {rel!r} is not a rank file of this checkpoint")
        codec = s.get("codec")
        if codec not in ("lct", "obj"):
            raise _fail(w, f"unknown codec {codec!r}")
        base = s.get("base")
        if base is not None and (not isinstance(base, str) or not base):
            raise _fail(w, f"base {base!r} must be a relative path or null")
        depth = _checked_int(s, "depth", w)
        if (base is None) != (depth == 0):
            raise _fail(w, "a chunk has a base exactly when its depth is positive")
        info = CompressedStorageInfo(rel, _checked_int(s, "at", w), _checked_int(s, "length", w),
                                     codec, base, depth)
        storage_data[MetadataIndex(s["fqn"], offset)] = info
    planner = doc.get("planner")
    if planner is not None:
        if not isinstance(planner, dict) or not all(
            isinstance(v, list) and all(isinstance(p, (str, int)) for p in v) for v in planner.values()
        ):
            raise _fail(where, "planner data is malformed")
        planner = {k: tuple(v) for k, v in planner.items()}
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise _fail(where, "meta must be an object")
    return Metadata(
        state_dict_metadata=sdm, planner_data=planner, storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=meta.get("checkpoint_id"), save_id=meta.get("save_id")),
        version=doc.get("dcp_version") if isinstance(doc.get("dcp_version"), str) else None,
    )


def read_metadata(path: str | os.PathLike[str]) -> Metadata:
    """The metadata of checkpoint ``path`` (local or fsspec URL).

    Raises:
        IncompleteCheckpointError: If it has no ``.metadata`` (the save never finished).
        FormatError: If the metadata is not lctriton's, or is invalid.
    """
    fs, root = _filesystem(path)
    md_path = fs.concat_path(root, METADATA)
    if not fs.exists(md_path):
        raise IncompleteCheckpointError(
            f"{os.fspath(path)!r} is not a complete checkpoint: {METADATA} is missing "
            "(the save did not finish, or this is not a checkpoint directory)"
        )
    with fs.create_stream(md_path, "rb") as f:
        data = f.read()
    return _metadata_from_json(data, os.fspath(md_path))


# --------------------------------------------------------------------------- chunks


class ReconstructionCache:
    """This rank's floating chunks as the last checkpoint written through it restores them.

    Pass one cache to the writer of every save of a run: the next delta is then coded
    against the chunks in memory instead of decoding the previous checkpoint from storage
    (the same values: a delta's base fingerprint would refuse any other). It holds one copy
    of the rank's floating chunks, on their device (GPU memory for CUDA shards).
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self.chunks: dict[MetadataIndex, torch.Tensor] = {}

    def lookup(self, path: Any, index: MetadataIndex) -> torch.Tensor | None:
        """The chunk ``index`` of checkpoint ``path``, if this cache holds that checkpoint."""
        if not _same_path(self.path, path):
            return None
        return self.chunks.get(MetadataIndex(index.fqn, index.offset))

    def replace(self, path: Any, chunks: dict[MetadataIndex, torch.Tensor]) -> None:
        self.path = os.fspath(path)
        self.chunks = chunks

    def clear(self) -> None:
        self.path, self.chunks = None, {}

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self.chunks.values())


class _ChunkSource:
    """Reads and decodes the stored chunks of one checkpoint, following delta bases."""

    def __init__(self, path: Any, storage_data: Mapping[MetadataIndex, Any] | None = None):
        self.fs, self.path = _filesystem(path)
        if storage_data is None:
            storage_data = read_metadata(self.path).storage_data
        self.storage_data: Mapping[MetadataIndex, Any] = storage_data
        self._bases: dict[str, _ChunkSource] = {}

    def find(self, index: MetadataIndex) -> CompressedStorageInfo | None:
        info = self.storage_data.get(MetadataIndex(index.fqn, index.offset))
        return info if isinstance(info, CompressedStorageInfo) else None

    def base(self, rel: str) -> _ChunkSource:
        path = _resolve(self.path, rel)
        if path not in self._bases:
            self._bases[path] = _ChunkSource(path)
        return self._bases[path]

    def read_bytes(self, info: CompressedStorageInfo) -> bytes:
        with self.fs.create_stream(self.fs.concat_path(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise TruncatedError(
                f"{os.fspath(self.path)}/{info.relative_path}: chunk at byte {info.offset} "
                f"is truncated ({len(data)} of {info.length} bytes)"
            )
        return data

    def decode(self, index: MetadataIndex, info: CompressedStorageInfo, device: Any = None) -> torch.Tensor:
        """The whole stored chunk ``index`` as this checkpoint restores it, on ``device``."""
        base = None
        if info.base is not None:
            src = self.base(info.base)
            binfo = src.find(index)
            if binfo is None:
                raise LctError(
                    f"base chunk {index.fqn}@{tuple(index.offset or ())} is missing from "
                    f"{os.fspath(src.path)}"
                )
            if binfo.depth != info.depth - 1:  # also stops a crafted cycle of bases
                raise FormatError(
                    f"{index.fqn}: base chunk depth {binfo.depth} does not precede {info.depth}"
                )
            base = {_KEY: src.decode(index, binfo, device)}
        state = api.decompress(self.read_bytes(info), base=base, device=device)
        if not isinstance(state, dict) or set(state) != {_KEY} or not torch.is_tensor(state[_KEY]):
            raise FormatError(f"{index.fqn}: stored chunk is not a single tensor")
        return state[_KEY]

    def decode_object(self, index: MetadataIndex, info: CompressedStorageInfo) -> Any:
        state = api.decompress(self.read_bytes(info))
        if not isinstance(state, dict) or set(state) != {_KEY}:
            raise FormatError(f"{index.fqn}: stored object is malformed")
        return state[_KEY]


# --------------------------------------------------------------------------- writer


class CompressedStorageWriter(FileSystemWriter):
    """A DCP storage writer that codes every chunk with lctriton.

    Args:
        path: The checkpoint directory (one per checkpoint): a local path or an fsspec URL.
        previous: A finished checkpoint written by this writer: floating chunks are coded
            as deltas against its same-named, same-offset chunks. None writes a key.
        cache: A :class:`ReconstructionCache` shared by the saves of a run: deltas against
            ``previous`` use the chunks it holds instead of decoding them from storage,
            and it is refilled with this checkpoint's chunks.
        max_chain: Write a key chunk instead of a delta once the base chunk is already
            this many deltas away from its key chunk.
        sync_files: fsync the files (and the directory after ``.metadata``).
        **options: lctriton codec options (``bits``, ``lossless``, ``lossless_key``, ...).

    Raises:
        ValueError, TypeError: If a codec option or ``max_chain`` is invalid.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        previous: str | os.PathLike[str] | None = None,
        cache: ReconstructionCache | None = None,
        max_chain: int = 16,
        sync_files: bool = True,
        **options: Any,
    ) -> None:
        fs, root = _filesystem(path)
        super().__init__(
            root if not is_url(root) else os.fspath(path),
            single_file_per_rank=True, sync_files=sync_files, thread_count=1, overwrite=True,
        )
        self.fs, self.path = fs, root
        CodecOptions.from_kwargs(**options)  # validate early, on every rank
        if isinstance(max_chain, bool) or not isinstance(max_chain, int) or max_chain < 0:
            raise ValueError(f"max_chain must be a non-negative int, got {max_chain!r}")
        if cache is not None and not isinstance(cache, ReconstructionCache):
            raise TypeError(f"cache must be a ReconstructionCache, got {type(cache).__name__}")
        self.options = dict(options)
        self.previous = None if previous is None else os.fspath(previous)
        self.cache = cache
        self.max_chain = max_chain
        self.delta_chunks = 0
        self.key_chunks = 0

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.fs, self.path = _filesystem(checkpoint_id)

    def _previous_source(self) -> _ChunkSource | None:
        if self.previous is None:
            return None
        try:
            return _ChunkSource(self.previous)
        except IncompleteCheckpointError:
            logger.warning("previous checkpoint %s is incomplete; writing key chunks", self.previous)
        except (FormatError, OSError) as exc:
            logger.warning("previous checkpoint %s is unreadable (%s); writing key chunks", self.previous, exc)
        return None

    def _base(self, item: Any, tensor: torch.Tensor, prev: _ChunkSource | None) -> tuple[torch.Tensor | None, int]:
        """The chunk this one is a delta against, and its depth; (None, 0) for a key."""
        if prev is None or not tensor.is_floating_point():
            return None, 0
        pinfo = prev.find(item.index)
        if pinfo is None or pinfo.codec != "lct" or pinfo.depth >= self.max_chain:
            return None, 0
        cand = self.cache.lookup(self.previous, item.index) if self.cache is not None else None
        if cand is None:
            try:
                cand = prev.decode(item.index, pinfo, tensor.device)
            except (LctError, OSError) as exc:  # an unreadable base: a key chunk instead
                logger.warning("base chunk %s unreadable (%s); writing a key chunk", item.index.fqn, exc)
                return None, 0
        if cand.shape != tensor.shape or cand.dtype != tensor.dtype:
            return None, 0
        return cand.to(tensor.device), pinfo.depth + 1

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Code this rank's items and write them to one file, ``__<rank>_0.distcp``."""
        file_name = f"{plan.storage_data.prefix}0.distcp"
        prev = self._previous_source()
        base_rel = None if prev is None else _relative(prev.path, self.path)
        results: list[WriteResult] = []
        recons: dict[MetadataIndex, torch.Tensor] = {}
        tensor_items = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
        object_items = [item for item in plan.items if item.type == WriteItemType.BYTE_IO]
        with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
            position = 0

            def put(item: Any, comp: api.Compressed, codec: str, base: str | None, depth: int) -> None:
                nonlocal position
                length = comp.write(stream)
                info = CompressedStorageInfo(file_name, position, length, codec, base, depth)
                position += length
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))

            for batch in _batches(tensor_items, planner):
                tensors, bases, depths = [], [], []
                for item in batch:
                    tensor = planner.resolve_data(item).detach()
                    base, depth = self._base(item, tensor, prev)
                    tensors.append({_KEY: tensor})
                    bases.append(None if base is None else {_KEY: base})
                    depths.append(depth)
                coded = api.compress_each(
                    tensors, bases, return_reconstruction=self.cache is not None, **self.options
                )
                comps, batch_recons = coded if self.cache is not None else (coded, [None] * len(batch))
                for item, comp, depth, recon in zip(batch, comps, depths, batch_recons, strict=True):
                    put(item, comp, "lct", base_rel if depth else None, depth)
                    if depth:
                        self.delta_chunks += 1
                    else:
                        self.key_chunks += 1
                    if recon is not None and recon[_KEY].is_floating_point():
                        recons[MetadataIndex(item.index.fqn, item.index.offset)] = recon[_KEY]
                del tensors, bases, comps
            for item in object_items:
                # The value tree itself, not DCP's pickle of it: loading never unpickles.
                if not hasattr(planner, "lookup_object"):
                    raise TypeError(
                        f"cannot store {item.index.fqn!r}: CompressedStorageWriter stores the "
                        "objects themselves and needs a planner with lookup_object "
                        "(DefaultSavePlanner or a subclass)"
                    )
                value = planner.lookup_object(item.index)
                try:
                    comp = api.compress({_KEY: value}, lossless=True)
                except TypeError as exc:
                    raise TypeError(f"cannot store {item.index.fqn!r} in a compressed checkpoint: {exc}") from None
                put(item, comp, "obj", None, 0)
            if self.sync_files:
                _fsync(stream)
        if self.cache is not None:
            self.cache.replace(self.path, recons)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write ``.metadata`` (lctriton's JSON) atomically: the completion marker."""
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        data = _metadata_to_json(metadata)
        tmp = self.fs.concat_path(self.path, f"{METADATA}.tmp")
        with self.fs.create_stream(tmp, "wb") as f:
            f.write(data)
            if self.sync_files:
                _fsync(f)
        final = self.fs.concat_path(self.path, METADATA)
        if self.fs.exists(final):
            self.fs.rm_file(final)
        self.fs.rename(tmp, final)
        if self.sync_files and not is_url(os.fspath(self.path)):
            api.fsync_dir(self.path)


def _fsync(stream: Any) -> None:
    """Flush a stream to storage where it is a local file; remote streams persist on close."""
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return
    os.fsync(fd)


def _batches(items: list[Any], planner: SavePlanner) -> list[list[Any]]:
    """Items in groups of about ``_BATCH_BYTES`` raw bytes (from the plan, before resolving)."""
    batches: list[list[Any]] = [[]]
    size = 0
    for item in items:
        td = item.tensor_data
        n = td.size.numel() * torch.empty(0, dtype=td.properties.dtype).element_size() if td else 0
        if batches[-1] and size + n > _BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += n
    return [b for b in batches if b]


# --------------------------------------------------------------------------- reader


class CompressedStorageReader(FileSystemReader):
    """A DCP storage reader for :class:`CompressedStorageWriter` checkpoints.

    Decodes each stored chunk whole (following delta bases into earlier checkpoints, on
    the device of the tensor it loads into) and narrows it to the region each read item
    asks for, so DCP reshards at load time.

    Args:
        path: The checkpoint directory: a local path or an fsspec URL.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        fs, root = _filesystem(path)
        super().__init__(root if not is_url(root) else os.fspath(path))
        self.fs, self.path = fs, root

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.fs, self.path = _filesystem(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read and check ``.metadata`` (never unpickled).

        Raises:
            IncompleteCheckpointError: If the checkpoint never finished.
            FormatError: If the metadata is not lctriton's or is invalid.
        """
        metadata = read_metadata(self.path)
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Decode, narrow and copy every requested chunk into the planner's targets."""
        source = _ChunkSource(self.path, self.storage_data)
        uses = collections.Counter(r.storage_index for r in plan.items if r.type != LoadItemType.BYTE_IO)
        decoded: dict[MetadataIndex, torch.Tensor] = {}
        for req in plan.items:
            info = self.storage_data.get(req.storage_index)
            if not isinstance(info, CompressedStorageInfo):
                raise LctError(f"{req.storage_index.fqn}: not written by CompressedStorageWriter")
            if req.type == LoadItemType.BYTE_IO:
                if info.codec != "obj":
                    raise FormatError(f"{req.storage_index.fqn}: stored as a tensor, read as an object")
                value = source.decode_object(req.storage_index, info)
                # DCP's planner takes serialized bytes; these are made here from the decoded
                # value tree, never read from storage.
                buf = io.BytesIO()
                torch.save(value, buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            if info.codec != "lct":
                raise FormatError(f"{req.storage_index.fqn}: stored as an object, read as a tensor")
            target = planner.resolve_tensor(req).detach()
            key = req.storage_index
            if key not in decoded:
                decoded[key] = source.decode(key, info, target.device)
            tensor = _narrow(decoded[key], req.storage_offsets, req.lengths)
            uses[key] -= 1
            if uses[key] == 0:  # the last region of this chunk: free it
                del decoded[key]
            if target.size() != tensor.size():
                raise FormatError(
                    f"{req.storage_index.fqn}: stored region is {tuple(tensor.size())}, "
                    f"the load asks for {tuple(target.size())}"
                )
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _narrow(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    if len(offsets) != tensor.dim() or len(lengths) != tensor.dim():
        raise FormatError(f"a read of rank {len(offsets)} does not fit a stored chunk of rank {tensor.dim()}")
    for dim, (off, length) in enumerate(zip(offsets, lengths, strict=True)):
        if off < 0 or off + length > tensor.size(dim):
            raise FormatError(f"a read of {off}+{length} in dim {dim} lies outside the stored chunk")
        if off != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, off, length)
    return tensor


# --------------------------------------------------------------------------- one call each


def _to_state_dicts(state: Mapping[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping such as {{'model': ..., 'optimizer': ...}}, got {type(state).__name__}")
    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            out[k] = get_model_state_dict(v)
        elif isinstance(v, torch.optim.Optimizer):
            if len(models) != 1:
                raise ValueError(f"state[{k!r}]: an optimizer needs exactly one nn.Module in the same state, found {len(models)}")
            out[k] = get_optimizer_state_dict(models[0], v)
        elif hasattr(v, "state_dict") and hasattr(v, "load_state_dict"):
            out[k] = v.state_dict()  # schedulers, samplers, TrainingState parts
        else:
            out[k] = v
    return out


def _apply_state_dicts(state: Mapping[str, Any], sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            set_model_state_dict(v, sd[k])
        elif isinstance(v, torch.optim.Optimizer):
            set_optimizer_state_dict(models[0], v, sd[k])
        elif hasattr(v, "state_dict") and hasattr(v, "load_state_dict"):
            v.load_state_dict(sd[k])


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    previous: str | os.PathLike[str] | None = None,
    cache: ReconstructionCache | None = None,
    process_group: Any = None,
    async_save: bool = False,
    **options: Any,
) -> Any:
    """Save ``{"model": module, "optimizer": optim, ...}`` as a compressed DCP checkpoint.

    Every rank calls it. Modules and optimizers become (possibly DTensor-sharded) state
    dicts through :mod:`torch.distributed.checkpoint.state_dict`; objects with
    ``state_dict``/``load_state_dict`` are saved through those; other values as they are.

    Args:
        path: The checkpoint directory, local or an fsspec URL.
        state: The state.
        previous: The previous checkpoint, for delta coding.
        cache: See :class:`CompressedStorageWriter`.
        process_group: Passed to DCP.
        async_save: Use :func:`torch.distributed.checkpoint.async_save`; returns its future.
        **options: Codec options.

    Returns:
        DCP's metadata, or the future of an async save.
    """
    import torch.distributed.checkpoint as dcp

    writer = CompressedStorageWriter(path, previous=previous, cache=cache, **options)
    sd = _to_state_dicts(state)
    if async_save:
        return dcp.async_save(sd, storage_writer=writer, process_group=process_group)
    return dcp.save(sd, storage_writer=writer, process_group=process_group)


def load(path: str | os.PathLike[str], state: Mapping[str, Any], *, process_group: Any = None) -> None:
    """Load a checkpoint written by :func:`save` into ``state`` in place (every rank calls it).

    Tensors (plain or DTensor) are filled in place, resharded from the saved layout;
    modules and optimizers load through :mod:`torch.distributed.checkpoint.state_dict`.

    Raises:
        IncompleteCheckpointError: If ``path`` has no ``.metadata`` (the save never finished).
        FormatError: If the checkpoint is not lctriton's or is corrupt.
    """
    import torch.distributed.checkpoint as dcp

    if not is_complete(path):
        read_metadata(path)  # raises IncompleteCheckpointError, naming the path
    sd = _to_state_dicts(state)
    dcp.load(sd, storage_reader=CompressedStorageReader(path), process_group=process_group)
    _apply_state_dicts(state, sd)


# --------------------------------------------------------------------------- manager

_POINT_PATTERN = re.compile(r"^step-(\d{12})$")


class DistributedCheckpointManager:
    """A run of compressed DCP checkpoints: delta chains, retention, tags, crash safety.

    The distributed twin of :class:`lctriton.CheckpointManager`, with its rules and its
    manifest (``docs/manager.md``; points are directories ``step-<12 digits>``). Every rank
    constructs it and calls every method in the same order; rank 0 of the process group
    commits the manifest and deletes what retention drops, and broadcasts the committed
    manifest at the start of each call, so every rank takes the same key/delta decision.

    A point exists once DCP has written its ``.metadata`` *and* rank 0 has committed a
    manifest naming it. A rank killed mid-save leaves neither; the next manager removes the
    partial directory and the last committed point restores.

    Args:
        directory: The run directory: a local path or an fsspec URL.
        key_every: A key checkpoint at least every this many saves.
        max_chain_bytes: A new key when the deltas since the last key add up to more than
            this many bytes; default: the size of that key.
        keep_last: Restore points kept, newest first, besides tagged ones.
        async_save: Save through :func:`torch.distributed.checkpoint.async_save` (state
            staged to CPU memory, coded and written in the background).
        process_group: The group the state is sharded over (default: the world).
        fsync: Flush files and the manifest before they count as durable.
        **codec_options: Options of :func:`lctriton.compress`.

    Raises:
        ValueError: If an option is invalid.
        ManifestError: If the run's manifest is corrupt.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        key_every: int = 10,
        max_chain_bytes: int | None = None,
        keep_last: int = 3,
        async_save: bool = False,
        process_group: Any = None,
        fsync: bool = True,
        **codec_options: Any,
    ) -> None:
        check_manager_options(key_every, max_chain_bytes, keep_last)
        CodecOptions.from_kwargs(**codec_options)
        self.key_every, self.max_chain_bytes, self.keep_last = key_every, max_chain_bytes, keep_last
        self.async_save = bool(async_save)
        self.process_group = process_group
        self.fsync = fsync
        self.codec_options = dict(codec_options)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.directory = os.fspath(directory)
        self._store = open_store(self.directory) if self.rank == 0 else None
        self._barrier()  # rank 0 has created the directory
        if self._store is None:
            self._store = open_store(self.directory)
        self._manifest = Manifest(self._store, layout="dcp", name_pattern=_POINT_PATTERN, fsync=fsync)
        self._cache = ReconstructionCache()
        self._head: int | None = None  # the point the next delta builds on
        self._last_step: int | None = None
        self._pending: SaveHandle | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        error = None
        if self.rank == 0:
            try:
                self._manifest.load()
                for name in self._manifest.stray_names():
                    logger.info("removing %s: no committed restore point names it", self._store.join(name))
                    self._store.remove(name)
            except BaseException as exc:  # noqa: BLE001 - every rank raises it below
                error = exc
        self._sync(error)
        if self._manifest.entries:
            # Chains continue across restarts: the next delta decodes its base from storage.
            self._last_step = self._head = max(self._manifest.entries)
        #: Seconds each ``save`` blocked the caller.
        self.stall_seconds: list[float] = []

    # ------------------------------------------------------------------ collectives

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.process_group)

    def _broadcast(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.process_group)
        return box[0]

    def _sync(self, error: BaseException | None = None) -> None:
        """Adopt rank 0's committed manifest on every rank; raise rank 0's error everywhere."""
        if self.rank == 0:
            payload = {"manifest": json.dumps(self._manifest.to_json()),
                       "error": None if error is None else f"{type(error).__name__}: {error}"}
        else:
            payload = None
        payload = self._broadcast(payload)
        if error is not None:
            raise error
        if payload["error"] is not None:
            raise LctError(f"rank 0 of the checkpoint group failed: {payload['error']}")
        if self.rank != 0:
            self._manifest.entries = self._manifest.parse(json.loads(payload["manifest"]), "rank 0's manifest")

    # ------------------------------------------------------------------ queries

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed restore points, oldest first (as of the last call on this rank)."""
        return [self._manifest.entries[s] for s in sorted(self._manifest.entries)]

    @property
    def latest_step(self) -> int | None:
        """Step of the newest committed restore point."""
        return max(self._manifest.entries) if self._manifest.entries else None

    def path_of(self, step: int) -> str:
        """The checkpoint directory of restore point ``step``."""
        return self._store.join(self._manifest.entries[step].file)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        key: bool = False,
    ) -> SaveHandle:
        """Checkpoint ``state`` at ``step`` (every rank calls it).

        Args:
            step: Training step, greater than every step saved before.
            state: ``{"model": module, "optimizer": optim, ...}``, as for :func:`save`.
            tag: Tag the restore point.
            metadata: JSON object stored in the manifest entry.
            key: Force a key checkpoint.

        Returns:
            A handle: ``staged`` resolves when the state may change again, ``durable``
            once the point is committed (already, unless ``async_save``).

        Raises:
            LctError: If an earlier save failed (on any rank: it is raised on every rank).
            ValueError: If ``step`` is not after the last saved step.
        """
        start = time.perf_counter()
        self.wait()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last saved step {self._last_step}")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise TypeError(f"tag must be a non-empty str, got {tag!r}")
        metadata = dict(metadata or {})
        api._checked_metadata(metadata)  # noqa: SLF001 - one rule for JSON metadata
        self._last_step = step
        entries = self._manifest.entries
        want_key = key or self._head not in entries or self._manifest.want_key(
            self._head, self.key_every, self.max_chain_bytes
        )
        name = f"step-{step:012d}"
        path = self._store.join(name)
        previous = None if want_key else self._store.join(entries[self._head].file)
        if previous is None:
            self._cache.clear()
        job = {"step": step, "name": name, "base_step": None if want_key else self._head,
               "tag": tag, "metadata": metadata}
        writer = CompressedStorageWriter(
            path, previous=previous, cache=self._cache, sync_files=self.fsync,
            max_chain=self.key_every, **self.codec_options,
        )
        handle = SaveHandle(step)
        sd = _to_state_dicts(state)
        import torch.distributed.checkpoint as dcp

        if self.async_save:
            response = dcp.async_save(sd, storage_writer=writer, process_group=self.process_group)
            future = getattr(response, "upload_completion", response)
            staging = getattr(response, "staging_completion", None)
            if staging is not None:
                staging.result()
            handle.staged.set_result(None)
            self._pending = handle
            future.add_done_callback(lambda f: self._finish_save(job, writer, f, handle))
        else:
            handle.staged.set_result(None)
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                fut.set_result(dcp.save(sd, storage_writer=writer, process_group=self.process_group))
            except BaseException as exc:  # noqa: BLE001 - recorded, raised below
                fut.set_exception(exc)
            self._finish_save(job, writer, fut, handle)
            if self._error is not None:
                self.wait()  # raises on every rank
        self.stall_seconds.append(time.perf_counter() - start)
        return handle

    def _finish_save(self, job: dict, writer: CompressedStorageWriter, fut: Any, handle: SaveHandle) -> None:
        """Commit the point (rank 0) once DCP has finished it; runs on every rank."""
        try:
            md = fut.result()
            if not isinstance(md, Metadata):  # an async save's future may not carry it
                md = read_metadata(writer.path)
            kind = "delta" if any(i.base is not None for i in md.storage_data.values()) else "key"
            base_step = job["base_step"] if kind == "delta" else None
            info = CheckpointInfo(
                step=job["step"], file=job["name"], kind=kind, base_step=base_step,
                tags=(job["tag"],) if job["tag"] else (),
                nbytes=sum(i.length for i in md.storage_data.values()),
                raw_nbytes=_raw_nbytes(md), time=time.time(), metadata=job["metadata"],
            )
            with self._lock:
                entries = dict(self._manifest.entries)
                if job["tag"]:
                    Manifest.untag(entries, job["tag"])
                entries[info.step] = info
                doomed = self._manifest.retention(entries, self.keep_last, info.step)
                if self.rank == 0:
                    self._manifest.commit(entries)
                    for name in doomed:
                        self._store.remove(name)
                else:
                    self._manifest.entries = entries  # provisional until the next _sync
                self._head = info.step
            handle.durable.set_result(info)
        except BaseException as exc:  # surfaced by the handle and the next call
            logger.error("distributed checkpoint save of step %s failed: %s", job["step"], exc)
            self._head = None
            self._cache.clear()
            if self._error is None:
                self._error = exc
            handle.durable.set_exception(exc)

    def wait(self) -> None:
        """Wait for the pending save; then agree with rank 0 on the committed manifest.

        Raises:
            LctError: If a save failed on this rank or on rank 0 (raised on every rank).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending.durable])
        error, self._error = self._error, None
        wrapped = None if error is None else LctError(f"an earlier distributed checkpoint save failed: {error}")
        if wrapped is not None:
            wrapped.__cause__ = error
        if self.rank == 0:
            self._sync(wrapped)
            return
        self._sync(None)
        if self._head not in self._manifest.entries:
            self._head = None  # rank 0 did not commit it: the next save is a key everywhere
        if wrapped is not None:
            raise wrapped

    def close(self) -> None:
        """Wait for the pending save."""
        self.wait()

    def __enter__(self) -> DistributedCheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # ------------------------------------------------------------------ tags

    def _rank0_edit(self, edit: Any) -> None:
        """Apply ``edit(entries) -> doomed names`` on rank 0, commit, and share the result
        (callers have just agreed on the manifest with :meth:`wait`)."""
        error = None
        if self.rank == 0:
            try:
                entries = dict(self._manifest.entries)
                doomed = edit(entries)
                self._manifest.commit(entries)
                for name in doomed:
                    self._store.remove(name)
            except BaseException as exc:  # noqa: BLE001 - raised on every rank by _sync
                error = exc
        self._sync(error)

    def tag(self, step: int, name: str) -> None:
        """Name a restore point (the name moves if another point had it); tagged points are
        kept by retention until untagged.

        Raises:
            LookupError: If no restore point exists at ``step``.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"tag name must be a non-empty str, got {name!r}")
        self.wait()
        if step not in self._manifest.entries:
            raise LookupError(f"no checkpoint at step {step} in {self.directory}")

        def edit(entries: dict[int, CheckpointInfo]) -> list[str]:
            Manifest.untag(entries, name)
            entries[step] = dataclasses.replace(entries[step], tags=entries[step].tags + (name,))
            return []

        self._rank0_edit(edit)

    def untag(self, name: str) -> None:
        """Remove a tag (its point then follows ordinary retention)."""
        self.wait()

        def edit(entries: dict[int, CheckpointInfo]) -> list[str]:
            Manifest.untag(entries, name)
            return self._manifest.retention(entries, self.keep_last, self._head)

        self._rank0_edit(edit)

    # ------------------------------------------------------------------ restoring

    def restore(
        self,
        which: int | str = "latest",
        state: Mapping[str, Any] | None = None,
        *,
        fallback: bool = False,
        discard_later: bool = False,
    ) -> Restored:
        """Load a restore point into ``state`` in place (every rank calls it).

        Args:
            which: ``"latest"``, a step, or a tag.
            state: ``{"model": module, "optimizer": optim, ...}`` to fill, at any world size.
            fallback: If a needed chunk is corrupt or missing, restore the newest earlier
                point that loads instead (a warning names both).
            discard_later: Drop every point after the restored one.

        Returns:
            The step restored (``state`` is the state given, now filled).

        Raises:
            LookupError: If ``which`` names no restore point.
            FormatError: If the point cannot be loaded and ``fallback`` is False.
        """
        if state is None:
            raise TypeError("restore needs the state to load into, e.g. {'model': model}")
        self.wait()
        target = self._manifest.resolve(which)
        candidates = [target] + (sorted((s for s in self._manifest.entries if s < target), reverse=True) if fallback else [])
        first_error: BaseException | None = None
        for step in candidates:
            try:
                load(self.path_of(step), state, process_group=self.process_group)
            except (LctError, OSError, CheckpointException) as exc:  # the same on every rank
                if not fallback:
                    raise FormatError(f"cannot restore step {step} from {self.path_of(step)}: {exc}") from exc
                first_error = first_error or exc
                continue
            if step != target:
                logger.warning("step %s cannot be restored (%s); restored step %s instead", target, first_error, step)
            if discard_later:
                self._rank0_edit(lambda entries, s=step: self._manifest.later_than(entries, s))
                self._last_step = step
            # The next save is a delta against what was just loaded, chunk by chunk where
            # the layout still matches; the reconstructions come from storage once.
            self._cache.clear()
            self._head = step
            return Restored(step, state, self._manifest.entries[step], target if step != target else None)
        raise FormatError(f"no restore point at or before step {target} loads: {first_error}") from first_error

    def rollback(self, name: str, state: Mapping[str, Any]) -> Restored:
        """Return to the point tagged ``name`` and discard every later one."""
        return self.restore(name, state, discard_later=True)


def _raw_nbytes(md: Metadata) -> int:
    total = 0
    for v in md.state_dict_metadata.values():
        if isinstance(v, TensorStorageMetadata):
            total += v.size.numel() * torch.empty(0, dtype=v.properties.dtype).element_size()
    return total

