"""Reliability of CheckpointManager: SIGKILL at random moments during saves, disk full,
permission errors, corrupt, truncated and missing files.

The crash test runs ``tests/crash_child.py`` (a deterministic training loop that saves every
step asynchronously) in a subprocess, kills it with SIGKILL after a seeded random delay, and
checks that a new manager on the directory opens, cleans it, restores the last durable
checkpoint bit for bit and keeps saving.

Errors of the file system are simulated by patching narrowly (one call, one kind of path):
the tests run as root, which ignores permission bits, so a chmod would not make a write
fail.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import lctriton
from lctriton import api
from lctriton import manifest as manifest_module
from lctriton.errors import FormatError, LctError
from lctriton.manager import CheckpointManager
from lctriton.manifest import MANIFEST

CHILD = Path(__file__).with_name("crash_child.py")
_spec = importlib.util.spec_from_file_location("crash_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

LOSSLESS = child.MANAGER_OPTIONS["lossless"]
_STEP_FILE = re.compile(r"^step-(\d{12})(-m\d+)?\.lct$")


# ---------------------------------------------------------------------------- helpers


def _flat(obj, prefix=""):
    """Dotted name -> leaf (tensors and plain values) of a nested state."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _assert_bitwise_equal(restored, expected):
    got, want = _flat(restored), _flat(expected)
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.equal(g.view(torch.int32), w.view(torch.int32)), f"{name} differs"
        else:
            assert type(g) is type(w) and g == w, name


def _assert_within_bound(restored, expected, path):
    """Lossy mode: each tensor within the quantization bound its file records."""
    bounds = {t["name"]: t["error_bound"] for t in lctriton.inspect(path)["tensors"]}
    got, want = _flat(restored), _flat(expected)
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if isinstance(w, torch.Tensor):
            err = float((g - w).abs().max())
            bound = bounds.get(name, 0.0)
            assert err <= bound * 1.001 + 1e-12, f"{name}: error {err} > bound {bound}"
        else:
            assert g == w, name


def _check_state(mgr, restored, seed, lossless):
    expected = child.state_at(seed, restored.step)
    if lossless:
        _assert_bitwise_equal(restored.state, expected)
    else:
        _assert_within_bound(restored.state, expected, mgr.directory / restored.info.file)


def _disk_steps(directory):
    data = json.loads((Path(directory) / MANIFEST).read_text())
    return [e["step"] for e in data["checkpoints"]]


def _tmp_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _clone(state):
    return {k: _clone(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _restore_fresh(directory, which):
    """Restore with a manager of its own (as a new process would)."""
    with CheckpointManager(directory, **LOSSLESS) as mgr:
        return mgr.restore(which)


def _train(mgr, state, steps):
    for s in steps:
        child.train_step(state, s)
        mgr.save(s, state).result(timeout=120)


# ---------------------------------------------------------------------------- SIGKILL


class _Child:
    """A crash_child.py process and the lines it printed (complete lines only)."""

    def __init__(self, directory: Path, seed: int, mode: str, stderr: Path):
        self.directory, self.seed, self.mode = directory, seed, mode
        self._stderr_path = stderr
        self._stderr = open(stderr, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(directory), "--seed", str(seed), "--mode", mode,
             "--wait-go"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.partial = ""
        self.ready_at: float | None = None
        self._events = {"LOADED": threading.Event(), "READY": threading.Event()}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if not line.endswith("\n"):  # cut short by the kill
                self.partial = line
                break
            line = line.rstrip("\n")
            self.lines.append(line)
            if line == "READY":
                self.ready_at = time.monotonic()
            if line in self._events:
                self._events[line].set()

    def wait_for(self, word: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._events[word].wait(0.02):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                stderr = self._stderr_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"child exited or stalled before {word} "
                            f"(rc {self.proc.returncode}): {self.lines[-5:]}\n{stderr}")

    def go(self) -> None:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(30)
        for f in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass

    def steps(self, word: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith(word + " ")]


def _classify(directory: Path) -> dict:
    """What a killed run left behind, looked at before any manager opens the directory."""
    names = os.listdir(directory)
    committed = _disk_steps(directory) if MANIFEST in names else []
    named = {f"step-{s:012d}.lct" for s in committed}
    orphans = sorted(
        int(m.group(1)) for n in names if (m := _STEP_FILE.match(n)) and n not in named
    )
    newest = max(committed, default=-1)
    return {
        "committed": committed,
        "data_tmp": [n for n in names if n.startswith(".step-") and n.endswith(".tmp")],
        "manifest_tmp": [n for n in names if n.startswith(f".{MANIFEST}") and n.endswith(".tmp")],
        "uncommitted_files": [s for s in orphans if s > newest],  # renamed, manifest not yet
        "unreclaimed_files": [s for s in orphans if s <= newest],  # retention had not unlinked
    }


def _kill_trial(proc: _Child, rng: random.Random) -> dict:
    directory, seed, lossless = proc.directory, proc.seed, proc.mode == "lossless"
    options = child.MANAGER_OPTIONS[proc.mode]
    proc.wait_for("LOADED")
    proc.go()
    proc.wait_for("READY")
    delay = rng.uniform(0.05, 1.0)
    time.sleep(max(0.0, proc.ready_at + delay - time.monotonic()))
    proc.kill()
    assert proc.proc.returncode == -signal.SIGKILL, (proc.proc.returncode, proc.lines[-3:])
    assert not [line for line in proc.lines if line.startswith("FAILED")], proc.lines
    durable, started = proc.steps("DURABLE"), proc.steps("SAVING")
    assert durable and durable == sorted(durable)
    last_durable = max(durable)

    left = _classify(directory)
    mgr = CheckpointManager(directory, **options)  # must not raise
    try:
        after = os.listdir(directory)
        assert not [n for n in after if n.endswith(".tmp")], after
        named = {info.file for info in mgr.checkpoints()}
        assert {n for n in after if _STEP_FILE.match(n)} == named, (sorted(after), sorted(named))
        assert [info.step for info in mgr.checkpoints()] == left["committed"]

        restored = mgr.restore("latest")
        # Newer than the last report is fine: the manifest may commit before the print.
        assert last_durable <= restored.step <= max(started), (
            last_durable, restored.step, max(started))
        assert restored.step == max(left["committed"])
        assert restored.state["step"] == restored.step
        _check_state(mgr, restored, seed, lossless)

        # The directory is usable: training continues from the restored point.
        nxt = restored.step + 1
        info = mgr.save(nxt, child.state_at(seed, nxt)).result(timeout=120)
        assert info.step == nxt
    finally:
        mgr.close()

    reopened = CheckpointManager(directory, **options)
    try:
        assert reopened.latest_step == nxt
        for point in reopened.checkpoints():  # every committed point, not only the newest
            _check_state(reopened, reopened.restore(point.step), seed, lossless)
    finally:
        reopened.close()
    return {
        "delay": delay,
        "last_durable": last_durable,
        "restored": restored.step,
        "ahead_of_report": restored.step - last_durable,
        "last_started": max(started),
        **{k: len(v) for k, v in left.items() if k != "committed"},
    }


def _summarize(stats: list[dict]) -> str:
    phases = Counter()
    for s in stats:
        if s["data_tmp"]:
            phases["data file being written (.tmp removed)"] += 1
        if s["manifest_tmp"]:
            phases["manifest being written (.tmp removed)"] += 1
        if s["uncommitted_files"]:
            phases["data file renamed, manifest not yet committed (file removed)"] += 1
        if s["unreclaimed_files"]:
            phases["manifest committed, old files not yet unlinked (removed)"] += 1
        if s["ahead_of_report"]:
            phases["committed but DURABLE not yet printed"] += 1
        on_disk = ("data_tmp", "manifest_tmp", "uncommitted_files", "unreclaimed_files")
        if not any(s[k] for k in on_disk):
            phases["nothing on disk in flight (compressing or idle)"] += 1
    lines = [f"{len(stats)} SIGKILL trials; steps reached {min(s['last_started'] for s in stats)}"
             f"..{max(s['last_started'] for s in stats)}; restored = last DURABLE + "
             f"{dict(sorted(Counter(s['ahead_of_report'] for s in stats).items()))}"]
    lines += [f"  {n:3d}  {what}" for what, n in phases.most_common()]
    return "\n".join(lines)


def _run_kill_trials(tmp_path, modes: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    stats = []

    def start(i):
        d = tmp_path / f"trial{i:02d}"
        return _Child(d, seed=1000 + i, mode=modes[i], stderr=tmp_path / f"trial{i:02d}.stderr")

    upcoming = start(0)
    try:
        for i in range(len(modes)):
            current = upcoming
            # The next interpreter imports torch while this trial runs and is checked; it
            # starts training only when told, so its kill is timed from its own READY.
            upcoming = start(i + 1) if i + 1 < len(modes) else None
            try:
                stats.append(dict(_kill_trial(current, rng), mode=modes[i]))
            finally:
                current.kill()
    finally:
        if upcoming is not None:
            upcoming.kill()
    return stats


@pytest.mark.slow  # 25-45 s on 2 cores (each trial starts an interpreter and imports torch)
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_leaves_last_durable_checkpoint_restorable(tmp_path):
    """20 lossless trials (bit-exact) and 2 lossy ones (within each file's error bound)."""
    modes = ["lossless"] * 20 + ["lossy"] * 2
    stats = _run_kill_trials(tmp_path, modes, seed=20240917)
    print("\n" + _summarize(stats))
    assert len(stats) == len(modes)
    # The delays spread over the save cycle: not every kill found the same step.
    assert len({s["last_durable"] for s in stats}) > 3


# ---------------------------------------------------------------------------- disk full


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_surfaces_from_future_and_next_save_and_training_keeps_state(
    tmp_path, monkeypatch
):
    seed = 11
    state = child.initial_state(seed)
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    _train(mgr, state, range(1, 4))
    assert _disk_steps(tmp_path) == [1, 2, 3]

    # The disk fills up halfway through the data file: the temporary file exists and holds
    # part of the container when the write fails.
    real_write = api.Compressed.write
    tmp_seen = []

    def full_write(self, stream):
        data = self.to_bytes()
        stream.write(data[: len(data) // 2])
        stream.flush()
        tmp_seen.extend(_tmp_files(tmp_path))
        raise _enospc()

    monkeypatch.setattr(api.Compressed, "write", full_write)
    child.train_step(state, 4)
    before = _clone(state)
    handle = mgr.save(4, state)
    assert handle.staged.done()
    with pytest.raises(OSError) as failure:
        handle.result(timeout=120)
    assert failure.value.errno == errno.ENOSPC
    assert isinstance(handle.durable.exception(), OSError)
    assert tmp_seen and tmp_seen[0].startswith(".step-000000000004.lct.")
    assert _tmp_files(tmp_path) == []  # write_atomic removed its partial file
    assert not (tmp_path / "step-000000000004.lct").exists()

    # Training keeps its state: the object handed to save is untouched and exact.
    _assert_bitwise_equal(state, before)
    _assert_bitwise_equal(state, child.state_at(seed, 4))

    # Only committed points are listed, on disk and in the manager.
    assert _disk_steps(tmp_path) == [1, 2, 3]
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3]

    # The next save reports the failure (as its cause) and saves nothing.
    child.train_step(state, 5)
    with pytest.raises(LctError, match="earlier checkpoint save failed") as surfaced:
        mgr.save(5, state)
    assert surfaced.value.__cause__ is failure.value
    assert _disk_steps(tmp_path) == [1, 2, 3]

    # The disk frees up: saving works again, starting a new chain with a key.
    monkeypatch.setattr(api.Compressed, "write", real_write)
    child.train_step(state, 6)
    info = mgr.save(6, state).result(timeout=120)
    assert info.kind == "key"
    child.train_step(state, 7)
    info = mgr.save(7, state).result(timeout=120)
    assert (info.kind, info.base_step) == ("delta", 6)
    mgr.close()

    reopened = CheckpointManager(tmp_path, **LOSSLESS)
    steps = [c.step for c in reopened.checkpoints()]
    assert 4 not in steps and 5 not in steps and steps[-2:] == [6, 7]
    for s in (3, 6, 7):
        restored = reopened.restore(s)
        _assert_bitwise_equal(restored.state, child.state_at(seed, s))
    reopened.close()


def test_disk_full_in_a_queue_of_async_saves(tmp_path, monkeypatch):
    """Saves queued behind the failing one do not build deltas on the missing file."""
    seed = 12
    state = child.initial_state(seed)
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    _train(mgr, state, [1])
    real_write_atomic = api.write_atomic
    gate = threading.Event()

    def write_atomic(path, compressed, fsync=True):
        gate.wait(60)  # hold the worker until every save below is queued
        if Path(path).name == "step-000000000002.lct":
            raise _enospc()
        return real_write_atomic(path, compressed, fsync=fsync)

    monkeypatch.setattr(api, "write_atomic", write_atomic)
    handles = []
    for s in (2, 3, 4):
        child.train_step(state, s)
        handles.append(mgr.save(s, state))
    gate.set()
    with pytest.raises(OSError, match="No space"):
        handles[0].result(timeout=120)
    infos = [h.result(timeout=120) for h in handles[1:]]
    assert [(i.step, i.kind, i.base_step) for i in infos] == [(3, "key", None), (4, "delta", 3)]
    with pytest.raises(LctError):
        mgr.wait()  # the failure still surfaces once
    mgr.close()
    reopened = CheckpointManager(tmp_path, **LOSSLESS)
    assert [c.step for c in reopened.checkpoints()] == [1, 3, 4]
    _assert_bitwise_equal(reopened.restore("latest").state, child.state_at(seed, 4))
    reopened.close()


# ---------------------------------------------------------------------------- permissions
# Root ignores permission bits (chmod 0o500 on the directory would not stop a write), so a
# PermissionError(EACCES) is raised by patching exactly the call that would fail.


def test_permission_denied_on_data_file(tmp_path, monkeypatch):
    seed = 13
    state = child.initial_state(seed)
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    _train(mgr, state, range(1, 3))
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        if name.startswith(".step-") and name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    child.train_step(state, 3)
    before = _clone(state)
    handle = mgr.save(3, state)
    with pytest.raises(PermissionError) as failure:
        handle.result(timeout=120)
    assert failure.value.errno == errno.EACCES
    _assert_bitwise_equal(state, before)
    with pytest.raises(LctError) as surfaced:
        mgr.save(4, state)
    assert surfaced.value.__cause__ is failure.value
    assert _disk_steps(tmp_path) == [1, 2]
    assert [c.step for c in mgr.checkpoints()] == [1, 2]
    monkeypatch.setattr(os, "open", real_open)

    later = CheckpointManager(tmp_path, **LOSSLESS)
    restored = later.restore("latest")
    assert restored.step == 2
    _assert_bitwise_equal(restored.state, child.state_at(seed, 2))
    later.close()

    # Permission back: the original manager saves again, as a key.
    child.train_step(state, 4)
    child.train_step(state, 5)
    assert mgr.save(5, state).result(timeout=120).kind == "key"
    mgr.close()
    _assert_bitwise_equal(_restore_fresh(tmp_path, "latest").state, child.state_at(seed, 5))


def _fail_manifest_commit(monkeypatch, how: str):
    """Make the manifest commit fail: EACCES on its rename, or ENOSPC while writing it."""
    if how == "rename-eacces":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(os.fspath(dst)) == MANIFEST:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    else:
        # The manifest's temporary file is opened with the builtin open; a module global of
        # that name shadows it for lctriton.manifest only.
        import builtins

        class FullFile:
            def __init__(self, f):
                self._f = f

            def write(self, s):
                raise _enospc()

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def full_open(file, mode="r", *args, **kwargs):
            f = builtins.open(file, mode, *args, **kwargs)
            return FullFile(f) if "w" in mode else f

        monkeypatch.setattr(manifest_module, "open", full_open, raising=False)


@pytest.mark.parametrize("how", ["rename-eacces", "write-enospc"])
def test_manifest_commit_failure_surfaces_and_last_committed_point_restores(
    tmp_path, monkeypatch, how
):
    seed = 14
    state = child.initial_state(seed)
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    _train(mgr, state, range(1, 4))
    _fail_manifest_commit(monkeypatch, how)
    child.train_step(state, 4)
    before = _clone(state)
    handle = mgr.save(4, state)
    expected = PermissionError if how == "rename-eacces" else OSError
    with pytest.raises(expected) as failure:
        handle.result(timeout=120)
    assert failure.value.errno == (errno.EACCES if how == "rename-eacces" else errno.ENOSPC)
    _assert_bitwise_equal(state, before)
    with pytest.raises(LctError) as surfaced:
        mgr.save(5, state)
    assert surfaced.value.__cause__ is failure.value
    assert _disk_steps(tmp_path) == [1, 2, 3]  # the old manifest is intact
    monkeypatch.undo()

    # A later manager (say, after the process died here) restores the last committed point
    # and removes the data file of step 4 and the manifest's temporary file.
    mgr.close()  # nothing in flight while another manager cleans the directory
    later = CheckpointManager(tmp_path, **LOSSLESS)
    assert _tmp_files(tmp_path) == []
    assert not (tmp_path / "step-000000000004.lct").exists()
    restored = later.restore("latest")
    assert restored.step == 3
    _assert_bitwise_equal(restored.state, child.state_at(seed, 3))
    child.train_step(state, 5)
    child.train_step(state, 6)
    assert later.save(6, state).result(timeout=120).step == 6
    later.close()
    _assert_bitwise_equal(_restore_fresh(tmp_path, "latest").state, child.state_at(seed, 6))


def test_failed_manifest_commit_leaves_no_phantom_restore_point(tmp_path, monkeypatch):
    seed = 15
    state = child.initial_state(seed)
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    _train(mgr, state, range(1, 4))
    _fail_manifest_commit(monkeypatch, "rename-eacces")
    child.train_step(state, 4)
    with pytest.raises(PermissionError):
        mgr.save(4, state).result(timeout=120)
    monkeypatch.undo()
    with pytest.raises(LctError):
        mgr.wait()
    try:
        # "Committed restore points": the manager's view matches the manifest on disk ...
        assert [c.step for c in mgr.checkpoints()] == _disk_steps(tmp_path) == [1, 2, 3]
        assert mgr.latest_step == 3
        # ... and a later commit does not bring back the step whose save failed.
        child.train_step(state, 5)
        mgr.save(5, state).result(timeout=120)
        assert 4 not in _disk_steps(tmp_path)
    finally:
        mgr.close()


# ---------------------------------------------------------------------------- corrupt files


def _history(tmp_path, seed, last=7):
    """Steps 1..last, keys 1 and 5, deltas between; every point kept. (Lossless deltas of
    this state are as big as a key, so the chain is capped by key_every alone here.)"""
    state = child.initial_state(seed)
    options = dict(LOSSLESS, keep_last=20, max_chain_bytes=1 << 40)
    with CheckpointManager(tmp_path, **options) as mgr:
        _train(mgr, state, range(1, last + 1))
        kinds = [(c.step, c.kind) for c in mgr.checkpoints()]
    assert kinds == [(s, "key" if s in (1, 5) else "delta") for s in range(1, last + 1)]
    return tmp_path


def _file(step):
    return f"step-{step:012d}.lct"


def _flip_middle(path: Path, n=16):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.name == "lctriton.manager"]


def test_corrupt_delta_is_detected_and_fallback_only_when_asked(tmp_path, caplog):
    seed = 21
    _history(tmp_path, seed)
    _flip_middle(tmp_path / _file(6))
    mgr = CheckpointManager(tmp_path, **LOSSLESS)  # opening does not read the data files
    for which in ("latest", 7, 6):
        with pytest.raises(FormatError, match=re.escape(_file(6))):
            mgr.restore(which)
    _assert_bitwise_equal(mgr.restore(5).state, child.state_at(seed, 5))  # 6 is not needed
    caplog.clear()
    with caplog.at_level("WARNING", logger="lctriton.manager"):
        restored = mgr.restore(fallback=True)
    assert (restored.step, restored.requested) == (5, 7)
    _assert_bitwise_equal(restored.state, child.state_at(seed, 5))
    (message,) = _warnings(caplog)
    assert "step 7 cannot be restored" in message and "restored step 5 instead" in message
    mgr.close()


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_key_falls_back_to_an_earlier_chain(tmp_path, caplog):
    seed = 22
    _history(tmp_path, seed)
    _truncate(tmp_path / _file(5))
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    for which in ("latest", 5, 6):
        with pytest.raises(FormatError, match=re.escape(_file(5))):
            mgr.restore(which)
    with caplog.at_level("WARNING", logger="lctriton.manager"):
        restored = mgr.restore(fallback=True)
    assert (restored.step, restored.requested) == (4, 7)  # newest intact point: end of chain 1
    _assert_bitwise_equal(restored.state, child.state_at(seed, 4))
    assert any("step 7 cannot be restored" in m for m in _warnings(caplog))
    # The manager continues from what it restored (chain 1-4 is full: a key).
    state = child.state_at(seed, 8)
    info = mgr.save(8, state).result(timeout=120)
    assert (info.kind, info.base_step) == ("key", None)
    mgr.close()
    _assert_bitwise_equal(_restore_fresh(tmp_path, 8).state, state)


def test_truncated_key_fallback_warning_names_the_restored_step(tmp_path, caplog):
    _history(tmp_path, 23)
    _truncate(tmp_path / _file(5))
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    with caplog.at_level("WARNING", logger="lctriton.manager"):
        assert mgr.restore(fallback=True).step == 4
    mgr.close()
    assert any("restored step 4 instead" in m for m in _warnings(caplog)), _warnings(caplog)


def test_no_intact_point_raises_even_with_fallback(tmp_path):
    _history(tmp_path, 24, last=3)
    _flip_middle(tmp_path / _file(1))
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    with pytest.raises(FormatError, match="no intact restore point"):
        mgr.restore(fallback=True)
    mgr.close()


# ---------------------------------------------------------------------------- missing files
# A manifest naming a file that is gone (deleted by hand): opening the directory succeeds
# (the manager does not stat the files it lists), restoring a point whose chain needs the
# file raises FormatError naming it (the cause is the FileNotFoundError), points that do not
# need it restore normally, and fallback=True restores the newest intact point before it.


def test_missing_file_named_by_manifest(tmp_path, caplog):
    seed = 25
    _history(tmp_path, seed)
    (tmp_path / _file(6)).unlink()
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    assert [c.step for c in mgr.checkpoints()] == list(range(1, 8))
    with pytest.raises(FormatError, match=re.escape(_file(6))) as failure:
        mgr.restore("latest")
    assert isinstance(failure.value.__cause__, FileNotFoundError)
    _assert_bitwise_equal(mgr.restore(3).state, child.state_at(seed, 3))
    with caplog.at_level("WARNING", logger="lctriton.manager"):
        restored = mgr.restore(fallback=True, discard_later=True)
    assert (restored.step, restored.requested) == (5, 7)
    assert any("restored step 5 instead" in m for m in _warnings(caplog))
    _assert_bitwise_equal(restored.state, child.state_at(seed, 5))
    # discard_later drops 6 and 7 from the manifest: training redoes them.
    assert _disk_steps(tmp_path) == [1, 2, 3, 4, 5]
    state = child.state_at(seed, 6)
    assert mgr.save(6, state).result(timeout=120).base_step == 5
    mgr.close()
    reopened = CheckpointManager(tmp_path, **LOSSLESS)
    _assert_bitwise_equal(reopened.restore("latest").state, state)
    reopened.close()


def test_missing_key_file_falls_back_to_earlier_chain(tmp_path):
    seed = 26
    _history(tmp_path, seed)
    (tmp_path / _file(5)).unlink()
    mgr = CheckpointManager(tmp_path, **LOSSLESS)
    with pytest.raises(FormatError, match=re.escape(_file(5))):
        mgr.restore(6)
    restored = mgr.restore(6, fallback=True)
    assert (restored.step, restored.requested) == (4, 6)
    _assert_bitwise_equal(restored.state, child.state_at(seed, 4))
    mgr.close()
