"""The manifest of a run directory: which restore points exist, how they chain, what to keep.

Both checkpoint managers keep one run per directory and commit its restore points to a
``manifest.json`` (specified in ``docs/manager.md``): :class:`lctriton.CheckpointManager`,
whose points are lctriton files, and :class:`lctriton.dcp.DistributedCheckpointManager`,
whose points are directories written through ``torch.distributed.checkpoint``. This module
holds what they share, so both follow the same rules:

* a point exists once a manifest naming it is committed (temporary file, fsync, rename,
  directory fsync), and a failed commit leaves the previous manifest in force;
* a save is a key when the chain since the last key is ``key_every`` long, or its deltas
  outweigh the key (or ``max_chain_bytes``);
* retention keeps the newest ``keep_last`` points, tagged points, the chain head, and every
  point these need to decode; the rest leave the manifest first and are deleted after;
* a directory is cleaned of temporary entries and of points no manifest names.

Directories are local paths or, for the distributed manager, fsspec URLs (``s3://...``,
``memory://...``); see :func:`open_store`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from lctriton.api import fsync_dir
from lctriton.errors import FormatError

__all__ = [
    "FILE_PATTERN",
    "MANIFEST",
    "CheckpointInfo",
    "Manifest",
    "ManifestError",
    "check_manager_options",
    "check_positive_int",
    "is_url",
    "open_store",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = "lctriton-manifest"
_VERSION = 1


class ManifestError(FormatError):
    """The manifest of a checkpoint directory is not valid."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed restore point.

    Attributes:
        step: Training step it was saved at.
        file: Its file (or, for a distributed checkpoint, directory) within the run.
        kind: ``"key"`` (stored on its own) or ``"delta"`` (against ``base_step``).
        base_step: The restore point a delta was coded against.
        tags: Names given to it with ``tag()``.
        nbytes: Bytes stored.
        raw_nbytes: Bytes of the state's tensors in memory.
        time: Unix time it became durable.
        metadata: The caller's metadata.
    """

    step: int
    file: str
    kind: str
    base_step: int | None
    tags: tuple[str, ...]
    nbytes: int
    raw_nbytes: int
    time: float
    metadata: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_json(cls, d: Any, name_pattern: re.Pattern[str] | None = None) -> CheckpointInfo:
        """Parse and check one manifest entry.

        Args:
            d: The entry.
            name_pattern: What ``file`` must match (default: lctriton checkpoint files).

        Raises:
            ManifestError: If a field is missing, mistyped or inconsistent.
        """
        pattern = FILE_PATTERN if name_pattern is None else name_pattern
        if not isinstance(d, dict):
            raise ManifestError(f"manifest entry {d!r} is not an object")
        try:
            info = cls(
                step=d["step"], file=d["file"], kind=d["kind"], base_step=d["base_step"],
                tags=tuple(d["tags"]), nbytes=d["nbytes"], raw_nbytes=d["raw_nbytes"],
                time=d["time"], metadata=d["metadata"],
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest entry is missing or mistypes a field: {exc}") from None
        if (
            isinstance(info.step, bool)
            or not isinstance(info.step, int)
            or info.step < 0
            or info.kind not in ("key", "delta")
            or not isinstance(info.file, str)
            or not pattern.match(info.file)
            or (info.kind == "delta") != (isinstance(info.base_step, int) and not isinstance(info.base_step, bool))
            or not all(isinstance(t, str) for t in info.tags)
            or not isinstance(info.metadata, dict)
        ):
            raise ManifestError(f"manifest entry for step {d.get('step')!r} is inconsistent")
        return info


#: Names of the restore points of a CheckpointManager (``-m...``: written by merge()).
FILE_PATTERN = re.compile(r"^step-(\d{12})(-m\d+)?\.lct$")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


class _LocalStore:
    """A run directory on a local file system."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.directory)

    def join(self, name: str) -> str:
        return str(self.directory / name)

    def read_text(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text_atomic(self, name: str, text: str, fsync: bool) -> None:
        tmp = self.directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
        except BaseException:
            self.remove(tmp.name)
            raise
        if fsync:
            fsync_dir(self.directory)

    def listdir(self) -> list[str]:
        return [p.name for p in self.directory.iterdir()]

    def remove(self, name: str) -> None:
        path = self.directory / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)


class _FsspecStore:
    """A run directory behind fsspec (object stores, remote and in-memory file systems).

    The manifest is written to a temporary name and moved into place: a rename on file
    systems that have one, and on object stores a copy whose final object appears whole or
    not at all, so readers never see a partial manifest.
    """

    def __init__(self, url: str) -> None:
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)

    def __str__(self) -> str:
        return self.url

    def join(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open(self._path(name), "rb") as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text_atomic(self, name: str, text: str, fsync: bool) -> None:
        tmp = self._path(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(text.encode("utf-8"))
            self.fs.mv(tmp, self._path(name))
        except BaseException:
            self.remove(tmp.rsplit("/", 1)[-1])
            raise

    def listdir(self) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]

    def remove(self, name: str) -> None:
        path = self._path(name)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an fsspec location (``proto://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def open_store(directory: str | os.PathLike[str]) -> _LocalStore | _FsspecStore:
    """The run directory ``directory``: a local path, or an fsspec URL such as ``s3://b/run``.

    ``file://`` URLs are local paths.
    """
    if isinstance(directory, str) and directory.startswith("file://"):
        directory = directory[len("file://") :]
    if is_url(directory):
        return _FsspecStore(os.fspath(directory))
    return _LocalStore(directory)


class Manifest:
    """The committed restore points of one run directory.

    Callers hold their own lock around calls that read or replace :attr:`entries`.

    Args:
        store: The run directory (:func:`open_store`).
        layout: What the points are: ``"files"`` (CheckpointManager) or ``"dcp"``
            (DistributedCheckpointManager); a manifest of the other layout is refused.
        name_pattern: What point names must match.
        fsync: Flush the manifest to storage before it counts as committed.
    """

    def __init__(
        self, store: Any, *, layout: str, name_pattern: re.Pattern[str], fsync: bool = True
    ) -> None:
        self.store = store
        self.layout = layout
        self.name_pattern = name_pattern
        self.fsync = fsync
        self.entries: dict[int, CheckpointInfo] = {}

    # ------------------------------------------------------------------ storage

    def to_json(self, entries: dict[int, CheckpointInfo] | None = None) -> dict[str, Any]:
        """The manifest document for ``entries`` (default: the committed ones)."""
        entries = self.entries if entries is None else entries
        data: dict[str, Any] = {"format": _FORMAT, "version": _VERSION}
        if self.layout != "files":  # files-layout manifests predate the field
            data["layout"] = self.layout
        data["checkpoints"] = [entries[s].to_json() for s in sorted(entries)]
        return data

    def parse(self, data: Any, where: str) -> dict[int, CheckpointInfo]:
        """Check a manifest document and return its entries.

        Raises:
            ManifestError: If it is not a manifest of this version and layout, lists a step
                twice, or has a delta against a step it does not list.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ManifestError(f"{where} is not an lctriton manifest of version {_VERSION}")
        layout = data.get("layout", "files")
        if layout != self.layout:
            raise ManifestError(
                f"{where} holds {layout!r} restore points, not {self.layout!r} "
                "(written by the other checkpoint manager)"
            )
        raw_entries = data.get("checkpoints")
        if not isinstance(raw_entries, list):
            raise ManifestError(f"{where} has no checkpoint list")
        entries: dict[int, CheckpointInfo] = {}
        for raw in raw_entries:
            info = CheckpointInfo.from_json(raw, self.name_pattern)
            if info.step in entries:
                raise ManifestError(f"{where} lists step {info.step} twice")
            entries[info.step] = info
        for info in entries.values():
            if info.kind == "delta" and info.base_step not in entries:
                raise ManifestError(
                    f"{where}: step {info.step} is a delta against step {info.base_step}, "
                    "which it does not list"
                )
        return entries

    def load(self) -> None:
        """Read the committed manifest (none yet: no points).

        Raises:
            ManifestError: If it is unreadable or invalid.
        """
        where = self.store.join(MANIFEST)
        try:
            text = self.store.read_text(MANIFEST)
            data = None if text is None else json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"{where} is not a readable manifest: {exc}") from None
        self.entries = {} if data is None else self.parse(data, where)

    def commit(self, entries: dict[int, CheckpointInfo] | None = None) -> None:
        """Write the manifest atomically, then adopt ``entries``.

        Args:
            entries: The restore points to commit; the current ones when None. They become
                :attr:`entries` only once they are on storage: a failed commit leaves what
                the manifest on storage says.
        """
        entries = self.entries if entries is None else entries
        self.store.write_text_atomic(MANIFEST, json.dumps(self.to_json(entries), indent=1), self.fsync)
        self.entries = entries

    def stray_names(self) -> list[str]:
        """Temporary entries, and points (by name) that no committed entry names."""
        named = {info.file for info in self.entries.values()}
        return [
            name
            for name in self.store.listdir()
            if _is_temporary(name) or (self.name_pattern.match(name) and name not in named)
        ]

    # ------------------------------------------------------------------ queries

    def chain(self, step: int, entries: dict[int, CheckpointInfo] | None = None) -> list[CheckpointInfo]:
        """Restore points from the key to ``step``, in decode order."""
        entries = self.entries if entries is None else entries
        chain = []
        info = entries[step]
        while True:
            chain.append(info)
            if info.kind == "key":
                return chain[::-1]
            info = entries[info.base_step]

    def resolve(self, which: int | str) -> int:
        """The step ``which`` names: ``"latest"``, a step, or a tag.

        Raises:
            LookupError: If it names no restore point.
            TypeError: If it is none of these.
        """
        if which == "latest":
            if not self.entries:
                raise LookupError(f"no checkpoint in {self.store}")
            return max(self.entries)
        if isinstance(which, str):
            for info in self.entries.values():
                if which in info.tags:
                    return info.step
            raise LookupError(f"no checkpoint is tagged {which!r} in {self.store}")
        if isinstance(which, bool) or not isinstance(which, int):
            raise TypeError(f"which must be 'latest', a step or a tag, got {which!r}")
        if which not in self.entries:
            raise LookupError(f"no checkpoint at step {which} in {self.store}")
        return which

    def want_key(self, head_step: int | None, key_every: int, max_chain_bytes: int | None) -> bool:
        """Whether the save after ``head_step`` (the chain head, None if there is none)
        must be a key: the chain is ``key_every`` long, or its deltas outweigh the key (or
        ``max_chain_bytes``)."""
        if head_step is None or head_step not in self.entries:
            return True
        chain = self.chain(head_step)
        if len(chain) >= key_every:
            return True
        if len(chain) > 1:
            deltas = sum(info.nbytes for info in chain[1:])
            limit = chain[0].nbytes if max_chain_bytes is None else max_chain_bytes
            if deltas > limit:
                return True
        return False

    # ------------------------------------------------------------------ edits

    @staticmethod
    def untag(entries: dict[int, CheckpointInfo], name: str) -> None:
        """Remove tag ``name`` from whichever entry has it (in place)."""
        for s, info in list(entries.items()):
            if name in info.tags:
                entries[s] = dataclasses.replace(info, tags=tuple(t for t in info.tags if t != name))

    def retention(
        self, entries: dict[int, CheckpointInfo], keep_last: int, head_step: int | None
    ) -> list[str]:
        """Drop from ``entries`` the points no kept point needs; return their names, to
        delete once the manifest without them is committed.

        Kept: the newest ``keep_last`` points, tagged points, the chain head the next delta
        builds on (``head_step``), and every point one of these needs to decode.
        """
        steps = sorted(entries)
        keep = set(steps[-keep_last:]) | {s for s in steps if entries[s].tags}
        if head_step in entries:
            keep.add(head_step)
        needed = set()
        for s in keep:
            needed.update(info.step for info in self.chain(s, entries))
        return [entries.pop(s).file for s in steps if s not in needed]

    def later_than(self, entries: dict[int, CheckpointInfo], step: int) -> list[str]:
        """Drop from ``entries`` every point after ``step``; return their names."""
        return [entries.pop(s).file for s in sorted(entries) if s > step]


def check_positive_int(name: str, value: Any, low: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_manager_options(key_every: Any, max_chain_bytes: Any, keep_last: Any) -> None:
    """Validate the chain and retention options both managers take.

    Raises:
        ValueError: Naming the option that is invalid.
    """
    check_positive_int("key_every", key_every)
    check_positive_int("keep_last", keep_last)
    if max_chain_bytes is not None and (
        isinstance(max_chain_bytes, bool) or not isinstance(max_chain_bytes, int) or max_chain_bytes < 0
    ):
        raise ValueError(f"max_chain_bytes must be a non-negative int or None, got {max_chain_bytes!r}")

