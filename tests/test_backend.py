"""Backend dispatch and the CPU threading knob."""

import pytest
import torch
from lctriton.kernels import reference

import lctriton
from lctriton import backend, pipeline


def test_cpu_tensors_use_the_reference(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    assert backend.choose("cpu") is reference


def test_forcing_the_reference(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")
    assert backend.choose("cuda") is reference


def test_invalid_backend_is_named(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "gpu-please")
    with pytest.raises(ValueError, match="LCTRITON_BACKEND"):
        backend.choose("cpu")


def test_forcing_triton_without_kernels_fails_clearly(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    monkeypatch.setattr(backend, "_triton_module", lambda: None)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        backend.choose("cpu")


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_thread_count_does_not_change_bytes(monkeypatch, threads):
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(3000 * (i + 1), generator=g) for i in range(5)}
    base = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}
    monkeypatch.setenv(pipeline.THREADS_ENV, "1")
    expected = lctriton.compress(state, base=base).to_bytes()
    monkeypatch.setenv(pipeline.THREADS_ENV, threads)
    data = lctriton.compress(state, base=base).to_bytes()
    assert data == expected
    restored = lctriton.decompress(data, base=base)
    assert all(restored[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_invalid_thread_count_is_named(monkeypatch, value):
    monkeypatch.setenv(pipeline.THREADS_ENV, value)
    with pytest.raises(ValueError, match="LCTRITON_THREADS"):
        lctriton.compress({"w": torch.randn(10)})
