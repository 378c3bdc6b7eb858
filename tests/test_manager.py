"""CheckpointManager: chains, async saves, retention, tags, rollback, merge, errors."""

import json
import threading

import pytest
import torch

import lctriton
from lctriton.manager import CheckpointManager, ManifestError


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(16, 64, generator=g)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model, opt):
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _bound(mgr, step):
    info = lctriton.inspect(mgr.directory / mgr._entries[step].file)
    return {t["name"]: t["error_bound"] for t in info["tensors"]}


def test_chain_key_every_and_exact_lossless_restore(tmp_path):
    model, opt = _model()
    saved = {}
    with CheckpointManager(tmp_path, key_every=3, keep_last=10, lossless=True) as mgr:
        for step in range(1, 8):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt))
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.wait()
        kinds = [(c.step, c.kind, c.base_step) for c in mgr.checkpoints()]
    assert kinds == [(1, "key", None), (2, "delta", 1), (3, "delta", 2), (4, "key", None),
                     (5, "delta", 4), (6, "delta", 5), (7, "key", None)]
    mgr = CheckpointManager(tmp_path)
    for step in (3, 6, 7):
        restored = mgr.restore(step).state["model"]
        assert all(torch.equal(restored[k], v) for k, v in saved[step].items())
    mgr.close()


def test_lossy_chain_stays_within_one_step_of_error(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, key_every=50, keep_last=50) as mgr:
        for step in range(1, 15):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt))
        mgr.wait()
        bounds = _bound(mgr, 14)
    restored = CheckpointManager(tmp_path).restore("latest").state
    for name, value in model.state_dict().items():
        err = float((restored["model"][name] - value).abs().max())
        assert err <= bounds[f"model.{name}"] * 1.001 + 1e-12, name


def test_save_returns_staged_and_mutation_after_save_is_not_seen(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, lossless=True) as mgr:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        handle = mgr.save(1, _state(model, opt))
        assert handle.staged.done()
        with torch.no_grad():  # training goes on and changes the weights at once
            for p in model.parameters():
                p.add_(1.0)
        info = handle.result()
        assert info.step == 1 and info.kind == "key"
        restored = mgr.restore(1).state["model"]
    assert all(torch.equal(restored[k], v) for k, v in before.items())


def test_retention_keeps_last_and_tagged_and_their_chains(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, key_every=4, keep_last=2) as mgr:
        for step in range(1, 11):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt), tag="clean" if step == 3 else None)
        mgr.wait()
        steps = [c.step for c in mgr.checkpoints()]
    # 9 and 10 are kept with their key (9); 3 is tagged and needs 1 and 2.
    assert steps == [1, 2, 3, 9, 10]
    files = sorted(p.name for p in tmp_path.glob("*.lct"))
    assert files == [f"step-{s:012d}.lct" for s in steps]


def test_rekey_when_chain_outgrows_a_key(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, key_every=1000, max_chain_bytes=1, keep_last=10) as mgr:
        for step in range(1, 5):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt))
        mgr.wait()
        kinds = [c.kind for c in mgr.checkpoints()]
    assert kinds == ["key", "delta", "key", "delta"]  # the first delta already outweighs 1 byte


def test_tag_rollback_and_continue(tmp_path):
    model, opt = _model()
    mgr = CheckpointManager(tmp_path, key_every=100, keep_last=5)
    for step in range(1, 5):
        _step(model, opt, step)
        mgr.save(step, _state(model, opt))
    mgr.tag(2, "clean")
    with pytest.raises(LookupError):
        mgr.tag(99, "nope")
    restored = mgr.rollback("clean", model=model, optimizer=opt)
    assert restored.step == 2 and [c.step for c in mgr.checkpoints()] == [1, 2]
    _step(model, opt, 30)
    mgr.save(3, _state(model, opt)).result()
    assert [(c.step, c.kind, c.base_step) for c in mgr.checkpoints()] == [(1, "key", None), (2, "delta", 1), (3, "delta", 2)]
    mgr.close()
    reopened = CheckpointManager(tmp_path)
    assert reopened.restore("clean").step == 2
    reopened.close()


def test_merge_folds_a_chain_into_a_key(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, key_every=100, keep_last=1) as mgr:
        for step in range(1, 6):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt))
        before = mgr.restore(5).state
        info = mgr.merge()
        assert info.kind == "key" and [c.step for c in mgr.checkpoints()] == [5]
        after = CheckpointManager(tmp_path).restore(5).state
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v)


def test_steps_must_increase_and_arguments_are_checked(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, {"w": torch.zeros(3)})
        with pytest.raises(ValueError, match="not after the last saved step 5"):
            mgr.save(5, {"w": torch.zeros(3)})
        with pytest.raises(ValueError, match="step must be"):
            mgr.save(-1, {"w": torch.zeros(3)})
        with pytest.raises(LookupError, match="step 99"):
            mgr.restore(99)
        with pytest.raises(LookupError, match="tagged 'x'"):
            mgr.restore("x")
    for bad in ({"key_every": 0}, {"keep_last": 0}, {"every": 0}, {"bits": 12}, {"colour": 1}):
        with pytest.raises((ValueError, TypeError)):
            CheckpointManager(tmp_path / "other", **bad)
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save(6, {"w": torch.zeros(3)})


def test_background_error_surfaces_from_future_and_next_call(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.randn(2000)}).result()

    def failing_write(path, compressed, fsync=True):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lctriton.api, "write_atomic", failing_write)
    handle = mgr.save(2, {"w": torch.randn(2000)})
    with pytest.raises(OSError, match="No space left"):
        handle.result()
    with pytest.raises(lctriton.LctError, match="earlier checkpoint save failed"):
        mgr.save(3, {"w": torch.randn(2000)})
    monkeypatch.undo()
    info = mgr.save(4, {"w": torch.randn(2000)}).result()
    assert info.kind == "key"  # never a delta against the step that was not written
    assert [c.step for c in mgr.checkpoints()] == [1, 4]
    mgr.close()


def test_backpressure_bounds_staged_bytes(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, staging_bytes=3 * 4 * 10_000)
    gate = threading.Event()
    real = lctriton.api.write_atomic

    def slow_write(*args, **kwargs):
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(lctriton.api, "write_atomic", slow_write)
    waiter = threading.Thread(target=lambda: [mgr.save(s, {"w": torch.randn(10_000)}) for s in range(1, 6)])
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # blocked: staged copies would exceed the cap
    assert mgr._budget.used <= mgr._budget.cap
    gate.set()
    waiter.join(10)
    mgr.close()
    assert mgr._budget.peak <= mgr._budget.cap and [c.step for c in mgr.checkpoints()][-1] == 5


def test_corrupt_file_is_detected_and_fallback_only_when_asked(tmp_path, caplog):
    model, opt = _model()
    with CheckpointManager(tmp_path, key_every=100, keep_last=10) as mgr:
        for step in range(1, 5):
            _step(model, opt, step)
            mgr.save(step, _state(model, opt))
    path = tmp_path / "step-000000000003.lct"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(lctriton.FormatError, match="step-000000000003.lct is unusable"):
        mgr.restore("latest")
    with caplog.at_level("WARNING"):
        restored = mgr.restore("latest", fallback=True)
    assert restored.step == 2 and restored.requested == 4
    assert "restored step 2 instead" in caplog.text
    mgr.close()


def test_manifest_is_checked_and_orphans_are_cleaned(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": torch.randn(100)})
    (tmp_path / "step-000000000009.lct").write_bytes(b"half-written")
    (tmp_path / ".step-000000000010.lct.abc.tmp").write_bytes(b"x")
    CheckpointManager(tmp_path).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "step-000000000001.lct"]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ManifestError):
        CheckpointManager(tmp_path)


def test_synchronous_mode_and_should_save(tmp_path):
    with CheckpointManager(tmp_path, async_save=False, every=5) as mgr:
        handle = mgr.save(10, {"w": torch.randn(100)})
        assert handle.durable.done()
        assert mgr.should_save(15) and not mgr.should_save(16)
        assert len(mgr.stall_seconds) == 1 and len(mgr.background_seconds) == 1
