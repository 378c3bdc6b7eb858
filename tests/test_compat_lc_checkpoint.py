"""Tests of lctriton.compat.lc_checkpoint, the drop-in for the lc_checkpoint package.

The central test runs the README's training loop (seed 000) with the one-import switch and
checks what the package gets wrong: decoded deltas close to the true ones (the package's
are all zeros), the file written where asked, as an lctriton container read without pickle.
"""

from __future__ import annotations

import inspect as pyinspect
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn, optim

import lctriton
import lctriton.compat.lc_checkpoint as lc_checkpoint

API = [
    "initialize",
    "compress_data",
    "decode_data",
    "save_checkpoint",
    "load_checkpoint",
    "calculate_compression_rate",
    "restore_model",
    "restore_model_async",
]


@pytest.fixture(autouse=True)
def _fresh_chain():
    # The module keeps the chain in module state, like the package: isolate every test.
    lc_checkpoint.reset()
    yield
    lc_checkpoint.reset()


def _flat(model: nn.Module) -> np.ndarray:
    """The README's delta layout: every state_dict tensor flattened, concatenated."""
    parts = [t.detach().numpy().ravel() for t in model.state_dict().values()]
    return np.concatenate(parts).astype(np.float32)


def _setup(seed: int = 0, batchnorm: bool = False):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, 64)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(64))
    layers += [nn.ReLU(), nn.Linear(64, 4)]
    model = nn.Sequential(*layers)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    inputs = torch.randn(160, 16)
    labels = torch.randint(0, 4, (160,))
    batches = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 160, 16)]
    return model, optimizer, criterion, batches


def _step(model, optimizer, criterion, batch) -> None:
    inputs, labels = batch
    loss = criterion(model(inputs), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _random_delta(n: int = 3000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 1e-3).astype(np.float32)


def test_readme_training_loop(tmp_path: Path) -> None:
    model, optimizer, criterion, batches = _setup()
    checkpoint_dir = tmp_path / "checkpoints" / "lc-checkpoint"
    lc_checkpoint.initialize(model, optimizer, criterion, str(checkpoint_dir), 5, 32)
    assert checkpoint_dir.is_dir()

    start = prev = _flat(model)
    true_sum = np.zeros_like(start)
    decoded_sum = np.zeros_like(start)
    prev_bound = 0.0
    for i, batch in enumerate(batches):
        _step(model, optimizer, criterion, batch)
        now = _flat(model)
        delta = now - prev
        prev = now

        compressed_data = lc_checkpoint.compress_data(delta, num_bits=32, k=5)
        filename = checkpoint_dir / f"step{i}.lct"
        lc_checkpoint.save_checkpoint(str(filename), compressed_data, 0, i)
        # README step 4: load, then decode what load_checkpoint returned.
        loaded = lc_checkpoint.load_checkpoint(str(filename))
        decoded = lc_checkpoint.decode_data(loaded)
        assert loaded[1] == 0
        np.testing.assert_array_equal(decoded, lc_checkpoint.decode_data(compressed_data))
        assert decoded.dtype == np.float32 and decoded.shape == delta.shape

        info = lctriton.inspect(str(filename))
        (record,) = info["tensors"]
        assert record["codec"] in ("lc/1", "lc/2") and record["bits"] == 3  # num_bits=32 -> lctriton's 3
        assert lctriton.load(str(filename))["iteration"] == i
        bound = compressed_data.error_bound
        assert bound == record["error_bound"] > 0

        # Closed loop: a decoded delta also corrects the previous step's error ...
        assert np.abs(decoded - delta).max() <= bound + prev_bound
        assert np.any(decoded != 0)  # the package decodes every real delta to zeros
        true_sum += delta
        decoded_sum += decoded
        # ... so the running sums stay within one step's bound of each other.
        assert np.abs(decoded_sum - true_sum).max() <= bound * (1 + 1e-5) + 1e-6
        prev_bound = bound

    relative = np.linalg.norm(decoded_sum - true_sum) / np.linalg.norm(true_sum)
    assert relative < 0.2
    assert not any(Path.cwd().glob("checkpoints/lc-checkpoint/lc_checkpoint_epoch*"))


def test_open_loop_without_initialize_and_package_call_form(tmp_path: Path) -> None:
    delta = _random_delta()
    # The package's form: unpack (encoded, encoder) and pass both on.
    encoded, encoder = lc_checkpoint.compress_data(delta)
    assert isinstance(encoded, lctriton.Compressed)
    assert isinstance(encoder, lc_checkpoint.DeltaInfo) and not encoder.closed_loop
    decoded = lc_checkpoint.decode_data(encoded, encoder)
    assert np.abs(decoded - delta).max() <= encoder.error_bound
    assert np.linalg.norm(decoded - delta) / np.linalg.norm(delta) < 0.5
    # Without a chain each call is coded on its own: same input, same bytes.
    again = lc_checkpoint.compress_data(delta)
    assert again.compressed.to_bytes() == encoded.to_bytes()

    path = tmp_path / "a" / "b" / "ckpt.lct"
    lc_checkpoint.save_checkpoint(path, encoded, 3, 7, encoder)
    loaded, epoch = lc_checkpoint.load_checkpoint(path)
    assert epoch == 3
    np.testing.assert_array_equal(loaded, decoded)
    np.testing.assert_array_equal(lc_checkpoint.decode_data(encoded.to_bytes()), decoded)
    assert os.listdir(path.parent) == ["ckpt.lct"]  # no temporary file left behind

    # Saving again over the same name replaces the file and its counters.
    lc_checkpoint.save_checkpoint(path, encoded, 4, 0)
    assert lc_checkpoint.load_checkpoint(path)[1] == 4
    assert lctriton.load(path)["iteration"] == 0


def test_shapes_and_dtypes_are_kept() -> None:
    delta64 = _random_delta(2048).astype(np.float64).reshape(32, 64)
    decoded = lc_checkpoint.decode_data(lc_checkpoint.compress_data(delta64, 8))
    assert decoded.dtype == np.float64 and decoded.shape == (32, 64)
    ints = lc_checkpoint.decode_data(lc_checkpoint.compress_data([1, 2, 3, 4]))
    assert ints.dtype == np.float64
    tensor = torch.from_numpy(_random_delta(512)).to(torch.bfloat16)
    assert lc_checkpoint.decode_data(lc_checkpoint.compress_data(tensor)).dtype == np.float32


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pth"
    compressed = lc_checkpoint.compress_data(_random_delta())
    lc_checkpoint.save_checkpoint(path, compressed, 1, 2)
    package_file = tmp_path / "package.pt"
    package_file.write_bytes(pickle.dumps((b"\x00", None, 0)))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)

    delta, epoch = lc_checkpoint.load_checkpoint(path)
    assert epoch == 1
    np.testing.assert_array_equal(delta, lc_checkpoint.decode_data(compressed))
    # A pickle as the package writes it is refused, with a hint, not loaded.
    with pytest.raises(lctriton.FormatError, match="filename.*pickle"):
        lc_checkpoint.load_checkpoint(package_file)


def test_foreign_container_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.lct"
    lctriton.save(path, {"w": torch.zeros(4)})
    with pytest.raises(lctriton.FormatError, match="filename"):
        lc_checkpoint.load_checkpoint(path)
    with pytest.raises(ValueError, match="compressed_data"):
        foreign = lctriton.compress({"w": torch.zeros(4)})
        lc_checkpoint.save_checkpoint(tmp_path / "x.lct", foreign, 0, 0)


def test_initialize_stores_its_arguments(tmp_path: Path) -> None:
    model, optimizer, criterion, batches = _setup()
    lc_checkpoint.initialize(model, optimizer, criterion, tmp_path / "dir", 5, 32)
    assert lc_checkpoint.net is model
    assert lc_checkpoint.optimizer is optimizer and lc_checkpoint.criterion is criterion
    assert lc_checkpoint.checkpoint_dir == str(tmp_path / "dir")
    assert (lc_checkpoint.num_buckets, lc_checkpoint.num_bits) == (5, 32)
    base = lc_checkpoint.prev_state_dict
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer, criterion, batches[0])
    # The base is a copy of the state at initialize(), not a view of the live weights.
    for name, value in before.items():
        torch.testing.assert_close(base[name], value, rtol=0, atol=0)
    with pytest.raises(AttributeError):
        lc_checkpoint.no_such_attribute  # noqa: B018


def test_restore_model(tmp_path: Path) -> None:
    model, optimizer, criterion, batches = _setup(seed=1, batchnorm=True)
    prefix = str(tmp_path / "ckpt" / "lc_checkpoint")
    max_iter = 4
    # Epoch 0, iteration 0 is the initial state (the package's convention).
    _step(model, optimizer, criterion, batches[0])
    init_torch = tmp_path / "init.pt"
    torch.save(model.state_dict(), init_torch)
    init_lct = tmp_path / "init.lct"
    lctriton.save(init_lct, model.state_dict())
    lc_checkpoint.initialize(model, optimizer, criterion, tmp_path / "ckpt", 5, 3)
    prev = _flat(model)
    last_bound = 0.0
    step = 1
    for epoch in range(3):
        for it in range(max_iter):
            if (epoch, it) == (0, 0):
                continue
            if (epoch, it) == (2, 2):
                break
            _step(model, optimizer, criterion, batches[step % len(batches)])
            step += 1
            now = _flat(model)
            compressed = lc_checkpoint.compress_data(now - prev)
            prev = now
            filename = f"{prefix}_epoch{epoch}_iter{it}.pt"
            lc_checkpoint.save_checkpoint(filename, compressed, epoch, it)
            last_bound = compressed.error_bound
    expected = model.state_dict()

    restored, _, _, _ = _setup(seed=99, batchnorm=True)
    lc_checkpoint.restore_model(restored, 2, 1, max_iter, str(init_torch), cpt_name=prefix)
    state = restored.state_dict()
    for name, value in expected.items():
        if value.is_floating_point():
            # Every tensor within one step's bound of its own true value: offsets advance.
            assert (state[name] - value).abs().max().item() <= last_bound * (1 + 1e-4) + 1e-5, name
        else:
            assert torch.equal(state[name], value), name

    again, _, _, _ = _setup(seed=98, batchnorm=True)
    lc_checkpoint.restore_model_async(again, 2, 1, max_iter, init_lct, prefix, n_cores=2)
    for name, value in state.items():
        assert torch.equal(again.state_dict()[name], value), name

    with pytest.raises(FileNotFoundError, match="epoch2_iter2"):
        lc_checkpoint.restore_model(again, 2, 2, max_iter, init_lct, prefix)


def test_calculate_compression_rate(tmp_path: Path) -> None:
    delta = _random_delta()
    ratio = lc_checkpoint.calculate_compression_rate(delta, 3, 5)
    assert isinstance(ratio, float) and ratio > 1
    assert ratio == pytest.approx(lc_checkpoint.compress_data(delta).ratio)

    model, optimizer, criterion, batches = _setup()
    unrelated = lc_checkpoint.calculate_compression_rate(model.state_dict())
    lc_checkpoint.initialize(model, optimizer, criterion, tmp_path, 5, 3)
    _step(model, optimizer, criterion, batches[0])
    against_base = lc_checkpoint.calculate_compression_rate(model.state_dict())
    assert against_base > 1 and unrelated > 1
    assert lc_checkpoint.calculate_compression_rate({}) == 0.0


def test_closed_loop_carries_error_and_restarts_on_new_shape(tmp_path: Path) -> None:
    model, optimizer, criterion, _ = _setup()
    lc_checkpoint.initialize(model, optimizer, criterion, tmp_path, 5, 3)
    delta = _random_delta()
    first = lc_checkpoint.compress_data(delta)
    lc_checkpoint.calculate_compression_rate(delta)  # measuring must not disturb the chain
    second = lc_checkpoint.compress_data(delta)
    assert first.encoder.closed_loop and second.encoder.closed_loop
    # The second call codes delta plus the first call's error: the sums track 2 * delta.
    total = lc_checkpoint.decode_data(first) + lc_checkpoint.decode_data(second)
    assert np.abs(total - 2 * delta).max() <= second.error_bound
    assert first.compressed.to_bytes() != second.compressed.to_bytes()
    # A delta of another shape starts a new chain instead of failing.
    other = _random_delta(100, seed=1)
    fresh = lc_checkpoint.compress_data(other)
    assert fresh.encoder.shape == (100,)
    assert np.abs(lc_checkpoint.decode_data(fresh) - other).max() <= fresh.error_bound


def test_signatures_match_the_package() -> None:
    try:
        import lc_checkpoint.main as original
    except ImportError as exc:
        pytest.skip(f"lc_checkpoint is not installed: {exc}")
    for name in API:
        ours = list(pyinspect.signature(getattr(lc_checkpoint, name)).parameters)
        theirs = list(pyinspect.signature(getattr(original, name)).parameters)
        assert ours == theirs, name


def test_signature_defaults() -> None:
    params = pyinspect.signature(lc_checkpoint.compress_data).parameters
    assert list(params) == ["δt", "num_bits", "k", "treshold"]
    defaults = [params[name].default for name in ("num_bits", "k", "treshold")]
    assert defaults == [3, 5, True]
    params = pyinspect.signature(lc_checkpoint.calculate_compression_rate).parameters
    assert (params["num_bits"].default, params["num_buckets"].default) == (3, 5)
    params = pyinspect.signature(lc_checkpoint.restore_model).parameters
    assert params["cpt_name"].default == "lc_checkpoint"


def _bad_calls(tmp_path: Path):
    model, optimizer, criterion, _ = _setup()
    good = lc_checkpoint.compress_data(_random_delta(256))
    other = lc_checkpoint.compress_data(_random_delta(128))
    path = tmp_path / "c.lct"
    lc = lc_checkpoint
    opt, crit = optimizer, criterion
    return [
        (lambda: lc.compress_data("abc"), TypeError, "δt"),
        (lambda: lc.compress_data(np.array(["a", "b"])), TypeError, "δt"),
        (lambda: lc.compress_data(None), TypeError, "δt"),
        (lambda: lc.compress_data([[1.0], [2.0, 3.0]]), TypeError, "δt"),
        (lambda: lc.compress_data(_random_delta(), num_bits="3"), TypeError, "num_bits"),
        (lambda: lc.compress_data(_random_delta(), num_bits=0), ValueError, "num_bits"),
        (lambda: lc.compress_data(_random_delta(), k=2.5), TypeError, "k "),
        (lambda: lc.compress_data(_random_delta(), treshold="yes"), TypeError, "treshold"),
        (lambda: lc.decode_data(42), TypeError, "encoded"),
        (lambda: lc.decode_data(b"not a container"), lctriton.FormatError, "encoded"),
        (lambda: lc.decode_data(good, object()), TypeError, "encoder"),
        (lambda: lc.decode_data(good.compressed, other.encoder), ValueError, "encoder"),
        (lambda: lc.save_checkpoint(123, good, 0, 0), TypeError, "filename"),
        (lambda: lc.save_checkpoint(path, "data", 0, 0), TypeError, "compressed_data"),
        (lambda: lc.save_checkpoint(path, good, 1.0, 0), TypeError, "epoch"),
        (lambda: lc.save_checkpoint(path, good, 0, -1), ValueError, "iteration"),
        (lambda: lc.save_checkpoint(path, good, 0, 0, "codec"), TypeError, "encoder"),
        (lambda: lc.load_checkpoint(None), TypeError, "filename"),
        (lambda: lc.initialize("model", opt, crit, tmp_path, 5, 3), TypeError, "model"),
        (lambda: lc.initialize(model, opt, crit, 5, 5, 3), TypeError, "checkpoint_dir"),
        (lambda: lc.initialize(model, opt, crit, tmp_path, 5, "32"), TypeError, "num_bits"),
        (lambda: lc.calculate_compression_rate("weights"), TypeError, "prev_state_dict"),
        (lambda: lc.calculate_compression_rate({}, num_buckets=0), ValueError, "num_buckets"),
        (lambda: lc.restore_model("m", 0, 0, 1, "x"), TypeError, "init_model"),
        (lambda: lc.restore_model(model, "0", 0, 1, "x"), TypeError, "last_epoch"),
        (lambda: lc.restore_model(model, 0, -1, 1, "x"), ValueError, "last_iter"),
        (lambda: lc.restore_model_async(model, 0, 0, 1, "x", n_cores=0), ValueError, "n_cores"),
    ]


def test_errors_name_the_argument(tmp_path: Path) -> None:
    for call, error, name in _bad_calls(tmp_path):
        with pytest.raises(error) as info:
            call()
        assert name in str(info.value), (name, str(info.value))
    assert not (tmp_path / "c.lct").exists()
