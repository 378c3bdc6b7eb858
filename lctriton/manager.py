"""CheckpointManager: frequent, cheap, crash-safe checkpoints that never stall training long.

A directory holds one checkpoint file per restore point and a manifest::

    directory/
      manifest.json                 the committed restore points (written last, atomically)
      step-000000000100.lct         a key checkpoint: the state stored exactly
      step-000000000110.lct         a delta against the reconstruction of step 100
      ...

Chains. The first save, every ``key_every``-th save, and any save after which replaying the
chain would read more bytes than a fresh key (``max_chain_bytes``) is a key; the others are
deltas against the reconstruction of the previous restore point, so quantization error never
accumulates. :meth:`CheckpointManager.merge` folds a chain into a new key.

Saving. :meth:`~CheckpointManager.save` returns a :class:`SaveHandle` with two futures:
``staged`` (the caller may now change the model and optimizer) and ``durable`` (the file and
the manifest are on storage). CPU state is copied into staging buffers and compressed by a
background worker; the bytes held by staged copies are capped by ``staging_bytes`` and
``save`` waits for room instead of exceeding it. CUDA state is compressed on the GPU before
``save`` returns, so only compressed bytes ever reach host memory.

Crash safety. Each file is written under a temporary name, flushed, fsynced and renamed; the
manifest is written the same way, after the file. Killing the process at any instant leaves
the last committed manifest and every file it names intact; a new manager removes temporary
files and files no manifest names.

Retention keeps the last ``keep_last`` restore points and every tagged one, and deletes only
files that no kept point needs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lctriton import api
from lctriton.config import CodecOptions
from lctriton.errors import FormatError, LctError
from lctriton.manifest import (
    FILE_PATTERN,
    CheckpointInfo,
    Manifest,
    ManifestError,
    check_manager_options,
    check_positive_int,
    open_store,
)
from lctriton.pipeline import iter_tensors

__all__ = ["CheckpointManager", "CheckpointInfo", "SaveHandle", "Restored", "ManifestError"]

logger = logging.getLogger(__name__)

class SaveHandle:
    """What :meth:`CheckpointManager.save` returns.

    Attributes:
        step: The step being saved.
        staged: Resolves when the caller may mutate the saved objects again (already done
            when ``save`` returns).
        durable: Resolves to the :class:`CheckpointInfo` once the file and the manifest are on
            storage; raises the error if saving failed.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.cpu_encoded = True
        self.staged: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.durable: concurrent.futures.Future[CheckpointInfo] = concurrent.futures.Future()

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        """Wait until durable; return its info or raise its error."""
        return self.durable.result(timeout)

    def __repr__(self) -> str:
        state = "durable" if self.durable.done() else "staged" if self.staged.done() else "staging"
        return f"SaveHandle(step={self.step}, {state})"


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` returns.

    Attributes:
        step: The step restored.
        state: The state as saved (restored from its chain).
        info: Its checkpoint info.
        requested: The step asked for, when a corrupt file made the manager fall back.
    """

    step: int
    state: Any
    info: CheckpointInfo
    requested: int | None = None


class _StagingBudget:
    """Bytes of staged copies in flight, capped; acquiring waits for room."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            # A single save larger than the cap may go alone, or it would wait forever.
            while self.used and self.used + n > self.cap:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _snapshot(obj: Any, memo: dict[int, torch.Tensor]) -> Any:
    """A copy of ``obj`` whose tensors are detached clones (shared tensors stay shared)."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.detach().clone()
        return memo[key]
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = _snapshot(v, memo)
        return out
    if isinstance(obj, list):
        return [_snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_snapshot(v, memo) for v in obj)
    return obj


class CheckpointManager:
    """Asynchronous, compressed, crash-safe checkpoints of a training run.

    Args:
        directory: Where checkpoints live (created if needed). A manager opened on an
            existing directory continues its chains.
        key_every: A key checkpoint at least every this many saves.
        max_chain_bytes: A new key when the deltas since the last key add up to more than
            this many bytes; default: the size of that key (replaying the chain would then
            read more than a fresh key).
        keep_last: Restore points kept, newest first, besides tagged ones.
        staging_bytes: Cap on host bytes held by staged copies of CPU state; ``save`` waits
            for room rather than exceed it.
        async_save: Save in a background thread; False makes ``save`` return durable.
        fsync: Flush files and the manifest to storage before they count as durable.
        every: :meth:`should_save` is true every this many steps (when no ``schedule``).
        schedule: A policy with ``should_save(step, loss, manager)`` (``lctriton.schedule``).
        **codec_options: Options of :func:`lctriton.compress` (``bits``, ``lossless``, ...).

    Raises:
        ValueError: If an option is invalid.
        ManifestError: If the directory's manifest is corrupt.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        key_every: int = 10,
        max_chain_bytes: int | None = None,
        keep_last: int = 3,
        staging_bytes: int = 4 << 30,
        async_save: bool = True,
        fsync: bool = True,
        every: int | None = None,
        schedule: Any = None,
        **codec_options: Any,
    ) -> None:
        check_manager_options(key_every, max_chain_bytes, keep_last)
        check_positive_int("staging_bytes", staging_bytes)
        if every is not None:
            check_positive_int("every", every)
        CodecOptions.from_kwargs(**codec_options)  # fail here, not in the background
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_every = key_every
        self.max_chain_bytes = max_chain_bytes
        self.keep_last = keep_last
        self.async_save = async_save
        self.fsync = fsync
        self.every = every
        self.schedule = schedule
        self.codec_options = dict(codec_options)
        self._lock = threading.RLock()
        self._manifest = Manifest(open_store(self.directory), layout="files", name_pattern=FILE_PATTERN, fsync=fsync)
        self._budget = _StagingBudget(staging_bytes)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lctriton-save")
        self._pending: list[SaveHandle] = []
        self._error: BaseException | None = None
        self._closed = False
        # The chain head: the reconstruction the next delta is coded against.
        self._base: Any = None
        self._base_step: int | None = None
        self._last_step: int | None = None
        #: Seconds ``save`` blocked, per save; the schedule and the benchmarks read them.
        self.stall_seconds: list[float] = []
        #: Seconds the background spent on each save (compress + write).
        self.background_seconds: list[float] = []
        self._manifest.load()
        if self._manifest.entries:
            self._last_step = max(self._manifest.entries)
        self._clean_directory()

    # ------------------------------------------------------------------ manifest

    @property
    def _entries(self) -> dict[int, CheckpointInfo]:
        """The committed restore points (replaced, never mutated, by a commit)."""
        return self._manifest.entries

    def _commit_manifest(self, entries: dict[int, CheckpointInfo] | None = None) -> None:
        """Commit ``entries`` (default: the current ones) with the lock held."""
        self._manifest.commit(entries)

    def _clean_directory(self) -> None:
        """Remove temporary files and checkpoint files no manifest entry names."""
        for name in self._manifest.stray_names():
            if FILE_PATTERN.match(name):
                logger.info("removing %s: no committed restore point names it", self.directory / name)
            self._unlink(self.directory / name)

    def _unlink(self, path: Path) -> None:
        """Remove a file of this directory; a missing one is fine, a failure is logged."""
        self._manifest.store.remove(path.name)

    # ------------------------------------------------------------------ queries

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed restore points, oldest first."""
        with self._lock:
            return [self._entries[s] for s in sorted(self._entries)]

    @property
    def latest_step(self) -> int | None:
        """Step of the newest committed restore point."""
        with self._lock:
            return max(self._entries) if self._entries else None

    def should_save(self, step: int, loss: float | None = None) -> bool:
        """Whether to checkpoint at ``step``: the schedule's decision, else every ``every``
        steps, else always."""
        if self.schedule is not None:
            return bool(self.schedule.should_save(step, loss, self))
        if self.every is not None:
            return step % self.every == 0
        return True

    def _chain(self, step: int) -> list[CheckpointInfo]:
        """Restore points from the key to ``step``, in decode order."""
        return self._manifest.chain(step)

    def _resolve(self, which: int | str) -> int:
        with self._lock:
            return self._manifest.resolve(which)

    # ------------------------------------------------------------------ saving

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise LctError(f"an earlier checkpoint save failed: {error}") from error

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed")

    def save(
        self,
        step: int,
        state: Any,
        *,
        tag: str | None = None,
        metadata: dict[str, Any] | None = None,
        key: bool = False,
    ) -> SaveHandle:
        """Checkpoint ``state`` at ``step``; return as soon as training may go on.

        Args:
            step: Training step, greater than every step saved before.
            state: A state dict, any nesting of dicts/lists/tuples over tensors and plain
                values, or an object with ``state_dict()`` (a ``lctriton.TrainingState``).
            tag: Tag the restore point (see :meth:`tag`).
            metadata: JSON object stored with the checkpoint.
            key: Force a key checkpoint.

        Returns:
            A handle whose ``staged`` future is already resolved and whose ``durable``
            future resolves once the checkpoint is committed.

        Raises:
            LctError: If an earlier background save failed (the error is its cause).
            ValueError: If ``step`` is not after the last saved step.
        """
        start = time.perf_counter()
        self._check_open()
        self._raise_background_error()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} is not after the last saved step {self._last_step} "
                "(rollback() discards later restore points)"
            )
        if hasattr(state, "state_dict") and not isinstance(state, Mapping):
            state = state.state_dict()
        if tag is not None and not isinstance(tag, str):
            raise TypeError(f"tag must be a str, got {type(tag).__name__}")
        metadata = dict(metadata or {})
        self._last_step = step
        handle = SaveHandle(step)
        on_device = any(t.device.type != "cpu" for t in iter_tensors(state))
        if on_device:
            # Compress on the GPU now: only compressed bytes reach the host, and the
            # caller may mutate the state as soon as the kernels have read it. Saves of
            # CPU state still being encoded in the background come first: the chain head
            # must be theirs.
            with self._lock:
                earlier = [h.durable for h in self._pending if h.cpu_encoded]
            concurrent.futures.wait(earlier)
            job = self._encode(step, state, metadata, key)
            # The chain advances now; a write that fails later makes every queued delta
            # built on it fail too (see _run_job), and the next save a key.
            self._base, self._base_step = job.pop("recon"), step
            nbytes = job["compressed"].payload_nbytes  # pinned host bytes, copy still running
            self._budget.acquire(nbytes)
            job["staged_bytes"] = nbytes
        else:
            nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(state))
            self._budget.acquire(nbytes)
            try:
                snapshot = _snapshot(state, {})
            except BaseException:
                self._budget.release(nbytes)
                raise
            job = {"step": step, "state": snapshot, "metadata": metadata, "key": key, "staged_bytes": nbytes}
        handle.cpu_encoded = not on_device
        job["tag"] = tag
        handle.staged.set_result(None)
        with self._lock:
            self._pending.append(handle)
        if self.async_save:
            self._worker.submit(self._run_job, job, handle)
        else:
            self._run_job(job, handle)
        self.stall_seconds.append(time.perf_counter() - start)
        if not self.async_save:
            handle.durable.result()
        return handle

    def _want_key(self, forced: bool) -> bool:
        if forced or self._base is None:
            return True
        with self._lock:
            return self._manifest.want_key(self._base_step, self.key_every, self.max_chain_bytes)

    def _encode(self, step: int, state: Any, metadata: dict, forced_key: bool) -> dict:
        kind = "key" if self._want_key(forced_key) else "delta"
        base = None if kind == "key" else self._base
        meta = dict(metadata, lctriton_step=step, lctriton_kind=kind,
                    lctriton_base_step=None if kind == "key" else self._base_step)
        compressed, recon = api.compress(
            state, base, return_reconstruction=True, metadata=meta, **self.codec_options
        )
        return {"step": step, "kind": kind, "base_step": None if kind == "key" else self._base_step,
                "compressed": compressed, "recon": recon, "metadata": metadata}

    def _run_job(self, job: dict, handle: SaveHandle) -> None:
        start = time.perf_counter()
        staged_bytes = job["staged_bytes"]
        try:
            if "compressed" not in job:
                encoded = self._encode(job["step"], job.pop("state"), job["metadata"], job["key"])
                encoded["staged_bytes"], encoded["tag"] = staged_bytes, job["tag"]
                job = encoded
            elif job["base_step"] is not None and job["base_step"] not in self._entries:
                raise LctError(f"step {job['step']} is a delta against step {job['base_step']}, which was never committed")
            info = self._write(job)
            if "recon" in job:
                # The chain advances only once the restore point is durable: after a
                # failed write the next save is a key, never a delta against a missing file.
                self._base, self._base_step = job["recon"], job["step"]
            handle.durable.set_result(info)
        except BaseException as exc:  # surfaced from the future and from the next call
            logger.error("checkpoint save of step %s failed: %s", job["step"], exc)
            self._base, self._base_step = None, None
            if self._error is None:
                self._error = exc
            handle.durable.set_exception(exc)
        finally:
            self._budget.release(staged_bytes)
            self.background_seconds.append(time.perf_counter() - start)
            with self._lock:
                if handle in self._pending:
                    self._pending.remove(handle)

    def _write(self, job: dict) -> CheckpointInfo:
        step = job["step"]
        name = f"step-{step:012d}.lct"
        path = self.directory / name
        nbytes = api.write_atomic(path, job["compressed"], fsync=self.fsync)
        compressed = job["compressed"]
        info = CheckpointInfo(
            step=step, file=name, kind=job["kind"], base_step=job["base_step"],
            tags=(job["tag"],) if job["tag"] else (), nbytes=nbytes,
            raw_nbytes=compressed.raw_nbytes, time=time.time(), metadata=job["metadata"],
        )
        with self._lock:
            entries = dict(self._entries)
            if job["tag"]:
                self._untag(job["tag"], entries)
            entries[step] = info
            doomed = self._retention(entries)
            try:
                self._commit_manifest(entries)
            except BaseException:
                # The file is complete but no manifest names it: remove it now rather
                # than leave it for the next manager to find.
                self._unlink(path)
                raise
        for p in doomed:
            self._unlink(p)
        return info

    def _untag(self, name: str, entries: dict[int, CheckpointInfo]) -> None:
        Manifest.untag(entries, name)

    def _retention(self, entries: dict[int, CheckpointInfo]) -> list[Path]:
        """Drop from ``entries`` the points no kept restore point needs; return their files,
        to delete after the manifest commit (lock held)."""
        return [self.directory / name for name in self._manifest.retention(entries, self.keep_last, self._base_step)]

    def wait(self) -> None:
        """Block until every pending save is durable.

        Raises:
            LctError: If a background save failed.
        """
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait([h.durable for h in pending])
        self._raise_background_error()

    def close(self) -> None:
        """Wait for pending saves and stop the background worker."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._worker.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the caller's exception with a save error
            try:
                self.close()
            except Exception as close_error:  # noqa: BLE001
                logger.error("while closing after an error: %s", close_error)

    # ------------------------------------------------------------------ tags

    def tag(self, step: int, name: str) -> None:
        """Name a restore point; the name moves if another point had it. Tagged points are
        kept by retention until untagged.

        Raises:
            LookupError: If no restore point exists at ``step``.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"tag name must be a non-empty str, got {name!r}")
        self.wait()
        with self._lock:
            if step not in self._entries:
                raise LookupError(f"no checkpoint at step {step} in {self.directory}")
            entries = dict(self._entries)
            self._untag(name, entries)
            entries[step] = dataclasses.replace(entries[step], tags=entries[step].tags + (name,))
            self._commit_manifest(entries)

    def untag(self, name: str) -> None:
        """Remove a tag (its restore point then follows ordinary retention)."""
        self.wait()
        with self._lock:
            entries = dict(self._entries)
            self._untag(name, entries)
            doomed = self._retention(entries)
            self._commit_manifest(entries)
        for p in doomed:
            self._unlink(p)

    # ------------------------------------------------------------------ restoring

    def _decode_chain(
        self, chain: list[CheckpointInfo], device: Any
    ) -> tuple[int | None, Any, Exception | None, CheckpointInfo | None]:
        """Decode a chain; return the last step decoded, its state, and the error and file
        that stopped it (None when the whole chain decoded)."""
        state, step = None, None
        for info in chain:
            try:
                state = api.load(self.directory / info.file, base=state, device=device)
            except (LctError, OSError) as exc:
                return step, state, exc, info
            step = info.step
        return step, state, None, None

    def restore(
        self,
        which: int | str = "latest",
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        into: Any = None,
        device: torch.device | str | None = None,
        fallback: bool = False,
        discard_later: bool = False,
    ) -> Restored:
        """Restore a checkpoint: ``"latest"``, a step, or a tag.

        Args:
            which: What to restore.
            model: If given, ``model.load_state_dict(state["model"])``.
            optimizer: If given, ``optimizer.load_state_dict(state["optimizer"])``.
            into: An object with ``load_state_dict`` (a ``lctriton.TrainingState``) that takes
                the whole state.
            device: Device of the restored tensors (CPU by default).
            fallback: If a file of the chain is corrupt or missing, restore the newest intact
                point before it instead of raising (a warning names what was skipped).
            discard_later: Drop every restore point after the restored one, so that training
                continues from it and saves its later steps again.

        Returns:
            The step and the state.

        Raises:
            LookupError: If ``which`` names no checkpoint.
            FormatError: If a needed file is corrupt and ``fallback`` is False.
        """
        self._check_open()
        self.wait()
        target = self._resolve(which)
        with self._lock:
            chain = self._chain(target)
        head_devices = {t.device for t in iter_tensors(self._base)} if self._base is not None else set()
        wanted = torch.device(device) if device is not None else torch.device("cpu")
        if target == self._base_step and self._base is not None and head_devices <= {wanted}:
            # The chain head is in memory already: no file to decode.
            step, state, error, bad = target, _snapshot(self._base, {}), None, None
        else:
            step, state, error, bad = self._decode_chain(chain, device)
        requested = None
        if error is not None:
            if not fallback:
                raise FormatError(f"cannot restore step {target}: {bad.file} is unusable: {error}") from error
            if step is None:
                earlier = [s for s in self._entries if s < chain[0].step]
                if not earlier:
                    raise FormatError(f"no intact restore point at or before step {target}: {error}") from error
                restored = self.restore(max(earlier), device=device, fallback=True)
                step, state = restored.step, restored.state
            logger.warning(
                "step %s cannot be restored (%s is unusable: %s); restored step %s instead",
                target, bad.file, error, step,
            )
            requested = target
        info = self._entries[step]
        if discard_later:
            with self._lock:
                entries = dict(self._entries)
                doomed = [self.directory / name for name in self._manifest.later_than(entries, step)]
                self._commit_manifest(entries)
            for p in doomed:
                self._unlink(p)
            self._last_step = step
        if self._base_step != step or discard_later:
            # Continue the chain from what was restored: it is the exact reconstruction.
            self._base, self._base_step = _snapshot(state, {}), step
        if into is not None:
            into.load_state_dict(state)
        if model is not None:
            model.load_state_dict(state["model"] if isinstance(state, Mapping) and "model" in state else state)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return Restored(step, state, info, requested)

    def rollback(self, name: str, **kwargs: Any) -> Restored:
        """Return to the restore point tagged ``name`` (the last clean state) and discard every
        later one, for instance after a poisoned data window or a divergence.

        Keyword arguments are those of :meth:`restore`.
        """
        return self.restore(name, discard_later=True, **kwargs)

    def merge(self, step: int | str = "latest") -> CheckpointInfo:
        """Fold the chain ending at ``step`` into a key checkpoint of that step; the deltas
        before it are then deleted unless another kept point needs them."""
        self.wait()
        target = self._resolve(step)
        restored = self.restore(target)
        compressed = api.compress(restored.state, None, metadata={"lctriton_step": target, "lctriton_kind": "key"},
                                  **self.codec_options)
        old = self._entries[target]
        name = f"step-{target:012d}-m{int(time.time() * 1000) % 10**9}.lct"
        nbytes = api.write_atomic(self.directory / name, compressed, fsync=self.fsync)
        with self._lock:
            info = dataclasses.replace(old, file=name, kind="key", base_step=None, nbytes=nbytes)
            entries = dict(self._entries)
            entries[target] = info
            # Deltas coded against the old chain stay valid: they point at this step's
            # reconstruction, which the new key reproduces exactly.
            doomed = self._retention(entries)
            self._commit_manifest(entries)
        for p in doomed + [self.directory / old.file]:
            if p.name != name:
                self._unlink(p)
        return info
