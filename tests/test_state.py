"""Tests of lctriton.state: RNG capture, resumable data position, and bit-identical resume."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lctriton
from lctriton.state import (
    DataPosition,
    ResumableSampler,
    Stateful,
    TrainingState,
    capture_rng,
    restore_rng,
)


def round_trip(state, **options):
    """What a stored state comes back as: through the container's bytes."""
    return lctriton.decompress(lctriton.compress(state, **options).to_bytes())


def assert_same(a, b, path="state"):
    """Recursive exact equality over tensors, arrays, containers and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def draws():
    """The next few numbers of every global generator, including cached Gaussians."""
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist() + np.random.randint(0, 1 << 30, 3).tolist(),
        torch.rand(5).tolist() + torch.randn(3).tolist(),
    )


# --------------------------------------------------------------------------- RNG


@pytest.mark.parametrize("through_file", [False, True])
def test_rng_restore_reproduces_next_draws(through_file):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a Gaussian cached in python's and numpy's generators: part of their state.
    random.gauss(0, 1)
    np.random.standard_normal()
    state = capture_rng()
    assert set(state) >= {"python", "numpy", "torch"}
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    expected = draws()
    if through_file:
        state = round_trip(state, lossless=False)  # lossy mode must still keep RNG exact
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(state)
    assert draws() == expected


def test_rng_cuda_state_without_cuda_warns(caplog):
    state = capture_rng()
    fake = torch.zeros(16, dtype=torch.uint8)
    state["cuda"] = [fake]
    expected = draws()
    with caplog.at_level(logging.WARNING, logger="lctriton.state"):
        restore_rng(state)
    if not torch.cuda.is_available():
        assert any("CUDA" in r.getMessage() for r in caplog.records)
    assert draws() == expected


def test_rng_bad_state_changes_nothing():
    state = capture_rng()
    state["torch"] = torch.zeros(4, dtype=torch.float32)
    torch.manual_seed(5)
    random.seed(5)
    before = random.getstate()
    with pytest.raises(TypeError, match=r"state\['torch'\]"):
        restore_rng(state)
    assert random.getstate() == before  # python part was valid but not applied
    with pytest.raises(TypeError, match="state"):
        restore_rng([1, 2])


# --------------------------------------------------------------------------- sampler


def test_sampler_is_a_permutation_per_epoch_independent_of_global_rng():
    s = ResumableSampler(50, shuffle=True, seed=7)
    torch.manual_seed(0)
    e0 = list(s)
    torch.manual_seed(1)
    e1 = list(s)  # the exhausted epoch 0 moves on to epoch 1 by itself
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1 and s.epoch == 1 and s.position == 50
    other = ResumableSampler(list(range(50)), shuffle=True, seed=7)
    assert list(other) == e0
    other.set_epoch(1)
    assert list(other) == e1
    assert len(s) == 50


def test_sampler_without_shuffle_is_sequential():
    s = ResumableSampler(10, shuffle=False)
    assert list(s) == list(range(10)) and list(s) == list(range(10))
    assert s.epoch == 1


def test_sampler_set_epoch_semantics():
    s = ResumableSampler(20, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    s.set_epoch(0)  # the current epoch: keeps the position
    assert s.position == 5
    rest = list(iter(s))
    assert head + rest == s.order(0).tolist()
    s.set_epoch(4)  # another epoch: from its start
    assert s.position == 0 and list(s) == s.order(4).tolist()
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


def test_sampler_stale_iterator_raises():
    s = ResumableSampler(10)
    old = iter(s)
    next(old)
    new = iter(s)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)
    assert s.position == 2


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("stop", [0, 13, 37, 40, 41, 100])
def test_sampler_interrupted_equals_uninterrupted(shuffle, stop):
    n, epochs = 37, 3
    reference = ResumableSampler(n, shuffle=shuffle, seed=11)
    expected = [i for _ in range(epochs) for i in reference]

    first = ResumableSampler(n, shuffle=shuffle, seed=11)
    got = []
    while len(got) < stop:
        for i in first:
            got.append(i)
            if len(got) == stop:
                break
    saved = round_trip(first.state_dict())
    resumed = ResumableSampler(n, shuffle=not shuffle, seed=999)  # overridden by the state
    resumed.load_state_dict(saved)
    while len(got) < len(expected):
        got.extend(resumed)
    assert got == expected
    assert resumed.state_dict() == reference.state_dict()


def test_sampler_through_dataloader_resumes_mid_epoch():
    data = TensorDataset(torch.arange(50))

    def loader(sampler):
        return DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())

    a = ResumableSampler(data, seed=5)
    expected = [b[0].tolist() for _ in range(2) for b in loader(a)]
    b = ResumableSampler(data, seed=5)
    got = []
    for batch in loader(b):
        got.append(batch[0].tolist())
        if len(got) == 3:
            break
    assert b.position == 24  # num_workers=0: exactly the indices of the batches received
    c = ResumableSampler(data, seed=0)
    c.load_state_dict(b.state_dict())
    got += [x[0].tolist() for x in loader(c)]
    got += [x[0].tolist() for x in loader(c)]
    assert got == expected


def test_sampler_state_validation():
    s = ResumableSampler(10)
    with pytest.raises(ValueError, match="num_samples"):
        s.load_state_dict(dict(ResumableSampler(11).state_dict()))
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({**s.state_dict(), "position": 11})
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(TypeError, match="data_source"):
        ResumableSampler(object())
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(5, seed=-1)
    s.seek(2, 4)
    assert list(s) == s.order(2).tolist()[4:]


def test_data_position():
    p = DataPosition()
    p.advance()
    p.advance(3)
    assert p.state_dict() == {"epoch": 0, "batches": 4}
    p.next_epoch()
    assert (p.epoch, p.batches) == (1, 0)
    q = DataPosition()
    q.load_state_dict(round_trip({"epoch": 3, "batches": 2}))
    assert q == DataPosition(3, 2)
    assert isinstance(q, Stateful) and isinstance(ResumableSampler(3), Stateful)
    with pytest.raises(ValueError, match="n_batches"):
        p.advance(-1)


# --------------------------------------------------------------------------- bit-identical resume

N_SAMPLES, BATCH, N_STEPS = 100, 16, 20  # 7 batches per epoch, the last one partial


def make_run(init_seed: int):
    """Fresh model, optimizer, scheduler, scaler, sampler and loader."""
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gen = torch.Generator().manual_seed(1234)  # the data does not depend on init_seed
    x = torch.randn(N_SAMPLES, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(N_SAMPLES, 1, generator=gen)
    dataset = TensorDataset(x, y)
    sampler = ResumableSampler(dataset, shuffle=True, seed=42)
    # A loader generator of its own: creating an iterator then draws its base seed from
    # it, not from the global RNG, so a resumed run's extra iterator shifts nothing.
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    ts = TrainingState(
        model, optimizer, scheduler, scaler, data={"sampler": sampler}, extra={"note": "run"}
    )
    return ts, loader


def train(ts: TrainingState, loader: DataLoader, until: int, losses: list[float]) -> None:
    """Train to step ``until``, from wherever ``ts`` stands (possibly mid-epoch)."""
    model, opt, sched, scaler = ts.model, ts.optimizer, ts.scheduler, ts.scaler
    model.train()
    sampler = ts.data["sampler"]
    while ts.step < until:
        for x, y in loader:  # a new iterator: resumes the sampler where it stopped
            # The epoch is the sampler's: a counter bumped after the loop would miss an epoch
            # whose last batch was also the last step before an interruption.
            ts.epoch = sampler.epoch
            # python's and numpy's generators steer the run too, so their restore matters.
            noise = random.random() * 0.01 + float(np.random.uniform(0, 0.01))
            loss = nn.functional.mse_loss(model(x + noise), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            ts.step += 1
            if ts.step == until:
                return


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("interrupt_at", [10, 7, 14])  # mid-epoch, and at epoch ends
def test_resume_is_bit_identical(interrupt_at):
    seed_all(0)
    ts, loader = make_run(init_seed=0)
    seed_all(0)
    expected_losses: list[float] = []
    train(ts, loader, N_STEPS, expected_losses)
    expected = ts.state_dict()

    seed_all(0)
    ts, loader = make_run(init_seed=0)
    seed_all(0)
    losses: list[float] = []
    train(ts, loader, interrupt_at, losses)
    blob = lctriton.compress(ts.state_dict(), lossless=True).to_bytes()
    del ts, loader

    # A new "process": different init, different global generators.
    seed_all(777)
    fresh, loader = make_run(init_seed=555)
    assert not torch.equal(next(fresh.model.parameters()), next(iter(expected["model"].values())))
    fresh.extra = None
    fresh.load_state_dict(lctriton.decompress(blob))
    assert (fresh.step, fresh.epoch) == (interrupt_at, (interrupt_at - 1) // 7)
    assert fresh.extra == {"note": "run"}
    train(fresh, loader, N_STEPS, losses)

    assert losses == expected_losses
    got = fresh.state_dict()
    assert_same(got, expected)  # model, optimizer, scheduler, scaler, sampler, RNG: all equal
    for a, b in zip(fresh.model.parameters(), expected["model"].values(), strict=True):
        assert torch.equal(a, b)


def test_training_state_parts_survive_storage():
    ts, _ = make_run(0)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD(ts.model.parameters(), lr=0.1, momentum=0.9), max_lr=1.0, total_steps=10
    )

    class Factor:  # a callable object: LambdaLR stores its __dict__
        def __init__(self):
            self.rate = 0.5

        def __call__(self, epoch):
            return self.rate**epoch

    lam_opt = torch.optim.SGD(ts.model.parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(lam_opt, [Factor()])
    lam_opt.step()
    lam.step()
    ts.data = {"sampler": ts.data["sampler"], "position": DataPosition(2, 3)}
    ts.extra = {
        "best": float("inf"),
        "tags": ("a", 1),
        "big": 1 << 80,
        "raw": b"\x00\x01",
        "none": None,
    }
    state = ts.state_dict(step=5, epoch=1)
    state["one_cycle"], state["lambda"] = one_cycle.state_dict(), lam.state_dict()
    back = round_trip(state)
    assert_same(back, state)  # betas come back as a tuple, inf as inf, big ints exactly
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert back["format"] == "lctriton-training-state" and back["version"] == 1
    assert set(back) >= {"model", "optimizer", "scheduler", "scaler", "data", "rng", "extra"}
    lam2 = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD(ts.model.parameters(), lr=0.1), [Factor()]
    )
    lam2.lr_lambdas[0].rate = 0.9
    lam2.load_state_dict(back["lambda"])
    assert lam2.lr_lambdas[0].rate == 0.5


def test_disabled_scaler_round_trip():
    ts = TrainingState(scaler=torch.amp.GradScaler("cpu", enabled=False), rng=False)
    back = round_trip(ts.state_dict())
    assert back["scaler"] == {}
    TrainingState(scaler=torch.amp.GradScaler("cpu", enabled=False), rng=False).load_state_dict(
        back
    )


# --------------------------------------------------------------------------- errors


def test_strict_missing_part_names_it():
    model = nn.Linear(2, 2)
    saved = TrainingState(model=model, rng=False).state_dict()
    with_opt = TrainingState(
        model=nn.Linear(2, 2), optimizer=torch.optim.SGD(model.parameters(), lr=1), rng=False
    )
    with pytest.raises(ValueError, match="'optimizer'"):
        with_opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="'rng'"):
        TrainingState(model=nn.Linear(2, 2)).load_state_dict(saved)
    with pytest.raises(ValueError, match="'model'"):
        TrainingState(rng=False).load_state_dict(saved)  # in the checkpoint, not here
    sampler_only = TrainingState(data={"a": DataPosition()}, rng=False).state_dict()
    with pytest.raises(ValueError, match=r"data\['b'\]"):
        TrainingState(data={"a": DataPosition(), "b": DataPosition()}, rng=False).load_state_dict(
            sampler_only
        )

    # Not strict: the parts on both sides are restored, the rest skipped.
    target = nn.Linear(2, 2)
    loose = TrainingState(model=target, optimizer=torch.optim.SGD(target.parameters(), lr=1))
    loose.load_state_dict({**saved, "step": 3}, strict=False)
    assert loose.step == 3 and torch.equal(target.weight, model.weight)


def test_bad_inputs():
    with pytest.raises(TypeError, match="data"):
        TrainingState(data=object())
    with pytest.raises(TypeError, match="StatefulDataLoader"):
        TrainingState(data=DataLoader(TensorDataset(torch.zeros(3))))
    with pytest.raises(TypeError, match=r"data\['x'\]"):
        TrainingState(data={"x": [1, 2]})
    with pytest.raises(TypeError, match="model"):
        TrainingState(model=nn.Linear)
    with pytest.raises(TypeError, match="extra"):
        TrainingState(extra=[1])
    with pytest.raises(ValueError, match="step"):
        TrainingState(step=-1)
    ts = TrainingState(rng=False)
    with pytest.raises(ValueError, match="format"):
        ts.load_state_dict({"step": 0})
    with pytest.raises(ValueError, match="version"):
        ts.load_state_dict(
            {"format": "lctriton-training-state", "version": 99, "step": 0, "epoch": 0}
        )


def test_part_errors_carry_a_note():
    saved = TrainingState(model=nn.Linear(2, 2), rng=False).state_dict()
    with pytest.raises(RuntimeError) as info:
        TrainingState(model=nn.Linear(3, 2), rng=False).load_state_dict(saved)
    assert any("'model'" in note for note in getattr(info.value, "__notes__", []))
