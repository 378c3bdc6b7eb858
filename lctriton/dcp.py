"""Compressed storage for ``torch.distributed.checkpoint`` (DCP).

:class:`CompressedStorageWriter` and :class:`CompressedStorageReader` subclass DCP's
filesystem writer and reader and work unchanged with :func:`torch.distributed.checkpoint.save`,
:func:`~torch.distributed.checkpoint.load` and :func:`~torch.distributed.checkpoint.async_save`.

Each rank codes its own chunks (the ``WriteItem`` s DCP plans for it) with lctriton and
writes them to its own file. The codec record of each chunk (file, offset, length, base
checkpoint) is a :class:`CompressedStorageInfo` in DCP's storage metadata. When a
``previous`` checkpoint is given, each floating chunk is coded as a delta against the chunk
of that checkpoint with the same fully-qualified name and offsets, as that checkpoint
restores it; a chunk with no match there (new tensor, changed layout or shape) is written
as a key chunk. Chains are resolved recursively at load time.

The reader decodes whole stored chunks and narrows them to the requested region, so DCP's
load planner reshards (save at one world size, load at another).

Non-tensor objects (``BYTE_IO`` items such as optimizer ``param_groups``) keep DCP's default
handling: DCP serializes them with ``torch.save`` (pickle) itself and they are stored as-is.

Completion: DCP writes ``.metadata`` last, on the coordinator, after every rank has written
its data. A checkpoint directory without ``.metadata`` is incomplete, and the reader raises
:class:`IncompleteCheckpointError` for it. Use one directory per checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
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

from . import api
from .config import CodecOptions
from .errors import LctError, TruncatedError

__all__ = [
    "CompressedStorageInfo",
    "CompressedStorageReader",
    "CompressedStorageWriter",
    "IncompleteCheckpointError",
    "is_complete",
    "load",
    "save",
]

logger = logging.getLogger(__name__)

_METADATA = ".metadata"
_KEY = "t"


class IncompleteCheckpointError(LctError, FileNotFoundError):
    """A DCP checkpoint directory has no ``.metadata``: its save never finished."""


@dataclasses.dataclass
class CompressedStorageInfo:
    """Where one stored chunk lives and how to decode it (kept in DCP's metadata).

    Attributes:
        relative_path: The rank file holding the chunk, relative to the checkpoint.
        offset: Byte offset of the chunk in that file.
        length: Byte length of the chunk.
        codec: ``"lct"`` for an lctriton container, ``"raw"`` for DCP's own bytes
            (``BYTE_IO`` objects).
        base: Path of the checkpoint this chunk is a delta against, relative to this
            checkpoint's directory; None for a key chunk.
        depth: Number of deltas between this chunk and its key chunk.
    """

    relative_path: str
    offset: int
    length: int
    codec: str = "lct"
    base: str | None = None
    depth: int = 0


def _narrow(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    # Same as DCP's private narrow_tensor_by_index, kept local because its module moved.
    for dim, (off, length) in enumerate(zip(offsets, lengths, strict=True)):
        if off != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, off, length)
    return tensor


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished DCP checkpoint (its ``.metadata`` exists)."""
    return os.path.isfile(os.path.join(os.fspath(path), _METADATA))


def _read_metadata_file(path: str) -> Metadata:
    md_path = os.path.join(path, _METADATA)
    if not os.path.isfile(md_path):
        raise IncompleteCheckpointError(
            f"{path!r} is not a complete checkpoint: {_METADATA} is missing "
            "(the save did not finish, or this is not a DCP checkpoint directory)"
        )
    # DCP's own metadata format (torch serializes it; lctriton containers never are): read
    # it the way torch's reader does rather than unpickling here.
    return FileSystemReader(path).read_metadata()


class _ChunkSource:
    """Decodes stored chunks of one checkpoint (following delta bases), with caches."""

    def __init__(self, path: str, storage_data: Mapping[MetadataIndex, Any] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        if storage_data is None:
            storage_data = _read_metadata_file(self.path).storage_data
        self.storage_data: Mapping[MetadataIndex, Any] = storage_data
        self._bases: dict[str, _ChunkSource] = {}

    def find(self, index: MetadataIndex) -> CompressedStorageInfo | None:
        info = self.storage_data.get(MetadataIndex(index.fqn, index.offset))
        return info if isinstance(info, CompressedStorageInfo) else None

    def _base(self, rel: str) -> _ChunkSource:
        path = os.path.normpath(os.path.join(self.path, rel))
        if path not in self._bases:
            self._bases[path] = _ChunkSource(path)
        return self._bases[path]

    def read_bytes(self, info: CompressedStorageInfo) -> bytes:
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        if len(data) != info.length:
            raise TruncatedError(f"{info.relative_path}: chunk at {info.offset} truncated")
        return data

    def decode(self, index: MetadataIndex, info: CompressedStorageInfo) -> torch.Tensor:
        """The whole stored chunk ``index``, as this checkpoint restores it."""
        base = None
        if info.base is not None:
            src = self._base(info.base)
            binfo = src.find(index)
            if binfo is None:
                raise LctError(
                    f"base chunk {index.fqn}@{tuple(index.offset or ())} missing from {src.path}"
                )
            base = {_KEY: src.decode(index, binfo)}
        return api.decompress(self.read_bytes(info), base=base)[_KEY]


class CompressedStorageWriter(FileSystemWriter):
    """A DCP storage writer that codes every tensor chunk with lctriton.

    Args:
        path: The checkpoint directory (one per checkpoint).
        previous: A finished checkpoint written by this writer: chunks are coded as deltas
            against its same-named, same-offset chunks. None writes a key checkpoint.
        max_chain: Write a key chunk instead of a delta once the base chunk is already
            this many deltas away from its key chunk.
        sync_files: fsync the files (and the directory after ``.metadata``).
        **options: lctriton codec options (``bits``, ``lossless``, ``lossless_key``, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        previous: str | os.PathLike[str] | None = None,
        max_chain: int = 16,
        sync_files: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            path, single_file_per_rank=True, sync_files=sync_files, thread_count=1, overwrite=True
        )
        CodecOptions(**options)  # validate early, on every rank
        self.options = dict(options)
        self.previous = None if previous is None else os.fspath(previous)
        self.max_chain = int(max_chain)

    def _previous_source(self) -> _ChunkSource | None:
        if self.previous is None:
            return None
        try:
            return _ChunkSource(self.previous)
        except IncompleteCheckpointError:
            logger.warning(
                "previous checkpoint %s is incomplete; writing a key checkpoint", self.previous
            )
            return None

    def _encode(
        self, item: Any, tensor: torch.Tensor, prev: _ChunkSource | None
    ) -> tuple[bytes, str | None, int]:
        tensor = tensor.detach().to("cpu").contiguous()
        base = None
        base_rel = None
        depth = 0
        if prev is not None and tensor.is_floating_point():
            pinfo = prev.find(item.index)
            if pinfo is not None and pinfo.depth < self.max_chain:
                try:
                    cand = prev.decode(item.index, pinfo)
                except (LctError, OSError) as exc:  # unreadable base: fall back to a key chunk
                    logger.warning(
                        "base chunk %s unreadable (%s); writing a key chunk", item.index.fqn, exc
                    )
                    cand = None
                if cand is not None and cand.shape == tensor.shape and cand.dtype == tensor.dtype:
                    base = {_KEY: cand}
                    base_rel = os.path.relpath(prev.path, os.path.abspath(os.fspath(self.path)))
                    depth = pinfo.depth + 1
        comp = api.compress({_KEY: tensor}, base=base, **self.options)
        return comp.to_bytes(), base_rel, depth

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Code and write this rank's items to one file ``__<rank>_0.distcp``."""
        prefix = plan.storage_data.prefix
        file_name = f"{prefix}0.distcp"
        prev = self._previous_source()
        results: list[WriteResult] = []
        with open(os.path.join(os.fspath(self.path), file_name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                offset = stream.tell()
                if item.type == WriteItemType.BYTE_IO:
                    # DCP's own pickle-based serialization of non-tensor objects, kept as-is.
                    assert isinstance(data, io.BytesIO)
                    stream.write(data.getbuffer())
                    info = CompressedStorageInfo(
                        file_name, offset, stream.tell() - offset, codec="raw"
                    )
                else:
                    blob, base_rel, depth = self._encode(item, data, prev)
                    stream.write(blob)
                    info = CompressedStorageInfo(
                        file_name, offset, len(blob), base=base_rel, depth=depth
                    )
                results.append(
                    WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info)
                )
            stream.flush()
            if self.sync_files:
                os.fsync(stream.fileno())
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write ``.metadata`` atomically (the completion marker) and sync the directory."""
        super().finish(metadata, results)
        if self.sync_files:
            api.fsync_dir(self.path)


class CompressedStorageReader(FileSystemReader):
    """A DCP storage reader for :class:`CompressedStorageWriter` checkpoints.

    Decodes each stored chunk whole (following delta bases into earlier checkpoints) and
    narrows it to the region each read item asks for, so DCP reshards at load time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read ``.metadata``.

        Raises:
            IncompleteCheckpointError: If the checkpoint never finished.
        """
        if not is_complete(self.path):
            _read_metadata_file(os.fspath(self.path))  # raises the clear error
        return super().read_metadata(*args, **kwargs)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Decode, narrow and copy every requested chunk into the planner's targets."""
        source = _ChunkSource(os.fspath(self.path), self.storage_data)
        cache: dict[MetadataIndex, torch.Tensor] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if not isinstance(info, CompressedStorageInfo):
                raise LctError(f"{req.storage_index.fqn}: not written by CompressedStorageWriter")
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(source.read_bytes(info)))
                continue
            key = req.storage_index
            if key not in cache:
                cache[key] = source.decode(key, info)
            tensor = _narrow(cache[key], req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise LctError(
                    f"{req.storage_index.fqn}: size mismatch "
                    f"{tuple(target.size())} vs {tuple(tensor.size())}"
                )
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _to_state_dicts(state: Mapping[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            out[k] = get_model_state_dict(v)
        elif isinstance(v, torch.optim.Optimizer):
            if len(models) != 1:
                raise ValueError("an optimizer needs exactly one nn.Module in the same state")
            out[k] = get_optimizer_state_dict(models[0], v)
        else:
            out[k] = v
    return out


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    previous: str | os.PathLike[str] | None = None,
    process_group: Any = None,
    async_save: bool = False,
    **options: Any,
) -> Any:
    """Save ``{"model": module, "optimizer": optim, ...}`` as a compressed DCP checkpoint.

    Modules and optimizers are turned into (possibly DTensor-sharded) state dicts with
    :mod:`torch.distributed.checkpoint.state_dict`; other values are saved as they are.

    Args:
        path: The checkpoint directory.
        state: The state.
        previous: The previous checkpoint, for delta coding.
        process_group: Passed to DCP.
        async_save: Use :func:`torch.distributed.checkpoint.async_save`; returns its future.
        **options: Codec options.
    """
    import torch.distributed.checkpoint as dcp

    writer = CompressedStorageWriter(path, previous=previous, **options)
    sd = _to_state_dicts(state)
    if async_save:
        return dcp.async_save(sd, storage_writer=writer, process_group=process_group)
    return dcp.save(sd, storage_writer=writer, process_group=process_group)


def load(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, process_group: Any = None
) -> None:
    """Load a checkpoint written by :func:`save` into ``state`` in place.

    Modules and optimizers are loaded through :mod:`torch.distributed.checkpoint.state_dict`;
    tensors (plain or DTensor) are filled in place, resharded from the saved layout.

    Raises:
        IncompleteCheckpointError: If ``path`` has no ``.metadata`` (the save never finished).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not is_complete(path):
        _read_metadata_file(os.fspath(path))  # raises IncompleteCheckpointError
    sd = _to_state_dicts(state)
    dcp.load(sd, storage_reader=CompressedStorageReader(path), process_group=process_group)
    models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    for k, v in state.items():
        if isinstance(v, torch.nn.Module):
            set_model_state_dict(v, sd[k])
        elif isinstance(v, torch.optim.Optimizer):
            set_optimizer_state_dict(models[0], v, sd[k])
