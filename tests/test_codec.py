"""Round trips of the codec: dtypes, shapes, special values, exact paths and error bounds."""

import collections
import copy
import math

import numpy as np
import pytest
import torch
from lctriton.kernels import reference

import lctriton
from lctriton import codecs
from lctriton.testing import assert_bit_exact, bits, special_values, ulp

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 0, 1, a prime, chunk +- 1, several chunks, and more than one CPU block.
SIZES = [0, 1, 1031, 4095, 4097, 3 * 4096 + 5, reference.BLOCK + 77]


def _pair(n, dtype, seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    step = torch.randn(n, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(n, generator=g) < 0.7
    return (base + step * mask).to(dtype), base.to(dtype)


def _roundtrip(x, base, **options):
    options.setdefault("min_numel", 0)
    c, recon = lctriton.compress({"w": x}, base=None if base is None else {"w": base},
                                 return_reconstruction=True, **options)
    restored = lctriton.decompress(lctriton.Compressed.from_bytes(c.to_bytes()),
                                   base=None if base is None else {"w": base})
    assert_bit_exact(restored["w"], recon["w"], "decoder output vs encoder reconstruction")
    return c, restored["w"]


def _assert_within_bucket_bounds(x, base, restored, record):
    """Each finite element's error is below its bucket's width (kept) or the tensor bound."""
    dtype = x.dtype
    x, base, restored = x.reshape(-1), base.reshape(-1), restored.reshape(-1)
    d = reference._delta_block(reference._np(x.contiguous()), reference._np(base.contiguous()), dtype)
    exponent = torch.from_numpy((d.view(np.uint32) >> 23) & 0xFF).to(torch.float64)
    reps = np.array(record["reps"], dtype=np.uint32).view(np.float32)
    kept_keys = set()
    for r in reps[1:]:
        kept_keys.add(int(np.array([r], np.float32).view(np.uint32)[0] >> 23))
    key = torch.from_numpy((d.view(np.uint32) >> 23).astype(np.int64))
    kept = torch.tensor([int(k) in kept_keys for k in key.tolist()]) if key.numel() < 200_000 else None
    err = (restored.to(torch.float64) - x.to(torch.float64)).abs()
    slack = ulp(restored) + ulp(torch.from_numpy(d))
    bound = torch.full_like(err, record["bound"])
    if kept is not None:
        bound = torch.where(kept, torch.exp2(torch.clamp(exponent, min=1) - 127), bound)
    finite = torch.isfinite(x.to(torch.float64))
    assert bool((err[finite] <= bound[finite] + slack[finite]).all()), float((err - bound - slack)[finite].max())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_lossy_delta_round_trip(dtype, n):
    x, base = _pair(n, dtype, seed=n)
    c, restored = _roundtrip(x, base)
    rec = c.index["tensors"][0]
    assert rec["codec"] == codecs.LC
    if n:
        _assert_within_bucket_bounds(x, base, restored, rec)


@pytest.mark.parametrize("dtype", FLOATS)
def test_lossless_round_trip_is_byte_identical(dtype):
    x, base = _pair(5000, dtype)
    _, restored = _roundtrip(x, base, lossless=True)
    assert_bit_exact(restored, x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_survive(dtype):
    sv = special_values(dtype)
    x = sv.repeat(300)[: 4096 + 3]
    base = torch.roll(x, 7)
    _, restored = _roundtrip(x, base)
    nonfinite = ~torch.isfinite(x)
    assert_bit_exact(restored[nonfinite], x[nonfinite], "non-finite values")
    # Against a zero base too: the lossy key path.
    _, restored = _roundtrip(x, None, lossless_key=False)
    assert_bit_exact(restored[~torch.isfinite(x)], x[~torch.isfinite(x)])


def test_overflowing_reconstruction_is_stored_exactly():
    # float16: 65504 - 60000 = 5504 sits in a bucket whose mean rounds past 65504.
    x = torch.tensor([65504.0] + [6500.0, 7000.0, 8100.0] * 400, dtype=torch.float16)
    base = torch.tensor([60000.0] + [0.0] * 1200, dtype=torch.float16)
    c, restored = _roundtrip(x, base)
    assert torch.isfinite(restored).all()
    assert restored[0] == x[0]
    assert c.index["tensors"][0]["exceptions"] >= 1


@pytest.mark.parametrize("bits_", range(1, 9))
@pytest.mark.parametrize("chunk", [64, 4096, 65536])
def test_every_width_and_chunk_size(bits_, chunk):
    x, base = _pair(20_000, torch.float32, seed=bits_)
    c, restored = _roundtrip(x, base, bits=bits_, chunk_symbols=chunk)
    rec = c.index["tensors"][0]
    assert len(rec["reps"]) <= 1 << bits_
    _assert_within_bucket_bounds(x, base, restored, rec)


def test_more_bits_means_smaller_error():
    x, base = _pair(50_000, torch.float32, seed=3)
    errors = [float((_roundtrip(x, base, bits=b)[1] - x).abs().max()) for b in (1, 2, 3, 5, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_unchanged_tensor_is_a_fill():
    x = torch.randn(10_000)
    c, restored = _roundtrip(x, x.clone())
    rec = c.index["tensors"][0]
    assert rec["fill"] == 0 and rec["words"] == 0
    assert_bit_exact(restored, x)
    assert c.nbytes < 2000


def test_non_contiguous_input():
    x, base = _pair(64 * 130, torch.float32)
    xt, bt = x.view(64, 130).t(), base.view(64, 130).t()
    assert not xt.is_contiguous()
    _, restored = _roundtrip(xt, bt)
    assert restored.shape == (130, 64)
    _assert_within_bucket_bounds(xt.contiguous(), bt.contiguous(), restored, _roundtrip(xt, bt)[0].index["tensors"][0])


def test_closed_loop_error_does_not_accumulate():
    """Each checkpoint is coded against the previous reconstruction, so after many deltas
    the error stays one quantization step, not the sum of all steps."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50_000, generator=g) * 0.05
    state = {"w": w.clone()}
    _, recon = lctriton.compress(state, return_reconstruction=True)
    for _ in range(20):
        w += torch.randn(50_000, generator=g) * 1e-3
        c, recon = lctriton.compress({"w": w}, base=recon, return_reconstruction=True)
        bound = c.index["tensors"][0]["bound"]
        assert float((recon["w"] - w).abs().max()) <= bound * 1.001


def _small_steps(n, seed):
    """A base of typical magnitude 2**-5 and a delta of magnitudes 2**-16 .. 2**-11 of both
    signs, log-uniform: below and above a floor of 2**-8 of the base (2**-13)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, generator=g, dtype=torch.float64) + 1.0) * 2.0**-5
    base *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    magnitude = torch.exp2(-16.0 + 5.0 * torch.rand(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (base + sign * magnitude).float(), base.float()


def test_delta_floor_drops_changes_below_it_and_bounds_the_error():
    x, base = _small_steps(40_000, seed=3)
    floor = 2.0**-13  # the base's median binade is 2**-5
    c_none, r_none = _roundtrip(x, base, delta_floor=None)
    c, restored = _roundtrip(x, base, delta_floor=8)
    rec = c.index["tensors"][0]
    reps = np.array(rec["reps"][1:], dtype=np.uint32).view(np.float32)
    assert (np.abs(reps) >= floor).all(), "a kept bucket lies below the floor"
    d = (x.double() - base.double()).abs()
    below = d < floor
    assert below.float().mean() > 0.5
    # Dropped: restored to the base bit for bit, within the floor of the value; kept: within
    # their buckets, as without a floor.
    assert torch.equal(restored[below].view(torch.int32), base[below].view(torch.int32))
    assert float((restored.double() - x.double())[below].abs().max()) < floor
    _assert_within_bucket_bounds(x, base, restored, rec)
    # Without a floor the smaller binades are kept instead: more bytes, smaller errors there.
    assert np.abs(np.array(c_none.index["tensors"][0]["reps"][1:], np.uint32).view(np.float32)).min() < floor
    assert c.nbytes < 0.7 * c_none.nbytes
    assert float((r_none[below] - x[below]).abs().mean()) < float((restored[below] - x[below]).abs().mean())


def test_delta_floor_keeps_a_slow_drift_within_the_floor_along_a_chain():
    """Closed loop: an element whose change stays below the floor keeps its base until the
    accumulated change reaches the floor; the error never exceeds the floor."""
    _, base = _small_steps(20_000, seed=4)
    drift = torch.full_like(base, 2.0**-16)  # an eighth of the floor per checkpoint
    w, recon, coded = base.clone(), {"w": base.clone()}, 0
    for _ in range(24):
        w += drift
        c, recon = lctriton.compress({"w": w}, base=recon, return_reconstruction=True, delta_floor=8, min_numel=0)
        error = (recon["w"].double() - w.double()).abs()
        assert float(error.max()) <= 2.0**-13
        coded += int((error < 2.0**-16).sum())
    assert coded > 0, "the drift was never coded"


def test_bound_covers_deltas_below_the_floor():
    """Where the floor drops every bucket the record's bound still covers the error, and a
    base mostly non-finite does not raise the floor (infinities are not a magnitude)."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8192, generator=g) * 0.05
    x = base + torch.randn(8192, generator=g) * 1e-6
    c, restored = _roundtrip(x, base, delta_floor=8)
    rec = c.index["tensors"][0]
    assert len(rec["reps"]) == 1  # every bucket is below the floor: a fill of symbol 0
    assert float((restored.double() - x.double()).abs().max()) <= rec["bound"]
    inf_base = base.clone()
    inf_base[:6000] = float("inf")
    assert codecs.median_binade(inf_base) == codecs.median_binade(base[6000:])
    x = inf_base.clone()
    x[6000:] += 1e-3
    c, restored = _roundtrip(x, inf_base, delta_floor=8)
    finite = torch.isfinite(inf_base)
    error = float((restored[finite] - x[finite]).abs().max())
    assert error <= c.index["tensors"][0]["bound"]
    assert error < 1e-3 / 2, "the finite elements' changes were dropped"


def test_delta_floor_needs_a_base_with_a_magnitude():
    x, _ = _small_steps(5000, seed=5)
    assert codecs.delta_floor_exponent(None, 8) == 1
    assert codecs.delta_floor_exponent(x, None) == 1
    assert codecs.delta_floor_exponent(torch.zeros(100), 8) == 1  # nothing to be relative to
    assert codecs.delta_floor_exponent(x, 8) == 127 - 5 - 8
    assert codecs.delta_floor_exponent(torch.full((10,), 2.0**-120), 30) == 1
    # A key checkpoint coded lossily has no base: the floor changes nothing.
    key = [lctriton.compress({"w": x}, lossless_key=False, delta_floor=f, min_numel=0).to_bytes() for f in (None, 8)]
    assert key[0] == key[1]
    # An all-zero base (a zero-initialized adapter's first delta) keeps every bucket.
    zero = torch.zeros_like(x)
    coded = [lctriton.compress({"w": x * 2.0**-20}, base={"w": zero}, delta_floor=f, min_numel=0).to_bytes()
             for f in (None, 0)]
    assert coded[0] == coded[1]


def test_exact_paths_are_byte_identical():
    g = torch.Generator().manual_seed(2)
    state = {
        "ints": torch.randint(-(2**40), 2**40, (5000,), generator=g),
        "int8": torch.randint(-128, 127, (3000,), dtype=torch.int8, generator=g),
        "mask": torch.rand(4000, generator=g) > 0.5,
        "tiny": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(12345),
        "marked.weight": torch.randn(5000, generator=g),
        "complex": torch.randn(2000, dtype=torch.complex64, generator=g),
    }
    base = {k: (v + 1 if v.dtype not in (torch.bool,) else ~v) for k, v in state.items()}
    c = lctriton.compress(state, base=base, exact=["marked.*"])
    restored = lctriton.decompress(c, base=base)
    for k, v in state.items():
        assert_bit_exact(restored[k], v, k)
    assert all(r["codec"] in (codecs.RAW, codecs.BP) for r in c.index["tensors"])
    raw = lctriton.compress(state, base=base, exact=["marked.*"], code_exact=False)
    assert all(r["codec"] == codecs.RAW for r in raw.index["tensors"])


def test_non_tensor_leaves_round_trip():
    state = collections.OrderedDict(
        step=7,
        big=2**80,
        lr=1e-3,
        weird=[float("inf"), float("-inf"), -0.0],
        name="run-1 ✓",
        blob=b"\x00\x01\xff",
        nothing=None,
        flags=(True, False),
        nested={0: {"a": [1, 2, {"b": "c"}]}, (1, "x"): 2.5, None: 1, 1.5: "f", True: "t"},
        shape=torch.Size([2, 3]),
        dtype=torch.bfloat16,
        rng=np.arange(6, dtype=np.uint32),
    )
    restored = lctriton.decompress(lctriton.compress(state).to_bytes())
    assert isinstance(restored, collections.OrderedDict)
    assert list(restored) == list(state)
    for k in state:
        if k == "rng":
            assert isinstance(restored[k], np.ndarray) and (restored[k] == state[k]).all()
        elif k == "weird":
            assert [math.copysign(1, v) for v in restored[k]] == [1, -1, -1]
        else:
            assert restored[k] == state[k] and type(restored[k]) is type(state[k]), k


def test_optimizer_state_round_trips_and_loads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    restored = lctriton.decompress(lctriton.compress(state).to_bytes())
    opt2 = torch.optim.Adam(model.parameters(), lr=1.0)
    opt2.load_state_dict(restored["optimizer"])
    assert opt2.param_groups[0]["lr"] == 1e-3
    for k, v in opt.state_dict()["state"][0].items():
        assert_bit_exact(restored["optimizer"]["state"][0][k], v, k)
    model.load_state_dict(restored["model"])


def test_tied_tensors_are_stored_once_and_restored_shared():
    emb = torch.nn.Embedding(100, 32)
    head = torch.nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    c = lctriton.compress(model.state_dict())
    assert len(c.index["tensors"]) == 1
    restored = lctriton.decompress(c)
    assert restored["emb.weight"] is restored["head.weight"]


def test_lossy_key_checkpoint_against_zeros():
    x = torch.randn(10_000)
    c, restored = _roundtrip(x, None, lossless_key=False)
    assert c.index["tensors"][0]["codec"] == codecs.LC and c.index["tensors"][0]["base"] is None
    assert float((restored - x).abs().max()) <= c.index["tensors"][0]["bound"] * 1.001


def test_base_with_other_shape_gives_a_key_for_that_tensor():
    x = torch.randn(5000)
    c = lctriton.compress({"w": x}, base={"w": torch.randn(4000)})
    record = c.index["tensors"][0]
    assert record["codec"] in (codecs.RAW, codecs.BP) and record["base"] is None


def test_wrong_or_missing_base_is_detected():
    x, base = _pair(5000, torch.float32)
    c = lctriton.compress({"w": x}, base={"w": base})
    with pytest.raises(lctriton.BaseMismatchError, match="pass the state"):
        lctriton.decompress(c)
    with pytest.raises(lctriton.BaseMismatchError, match="coded against base"):
        other = base.clone()
        other[1234] += 1e-6
        lctriton.decompress(c, base={"w": other})
    with pytest.raises(lctriton.BaseMismatchError, match="the base given is"):
        lctriton.decompress(c, base={"w": base.double()})


def test_decompress_to_device_argument():
    x, base = _pair(5000, torch.float32)
    c = lctriton.compress({"w": x, "i": torch.arange(3)}, base={"w": base})
    out = lctriton.decompress(c, base={"w": base}, device="cpu")
    assert out["w"].device.type == "cpu" and out["i"].tolist() == [0, 1, 2]


def test_unsupported_objects_are_named():
    with pytest.raises(TypeError, match=r"object.*'model\.layer'"):
        lctriton.compress({"model": {"layer": object()}})
    with pytest.raises(TypeError, match="dict key of type"):
        lctriton.compress({frozenset(): 1})
    with pytest.raises(TypeError, match="layout"):
        lctriton.compress({"s": torch.eye(3).to_sparse()})


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"bits": 0}, ValueError, "bits"),
        ({"bits": 9}, ValueError, "bits"),
        ({"bits": True}, ValueError, "bits"),
        ({"lossless": 1}, TypeError, "lossless"),
        ({"exact": [1]}, TypeError, "exact"),
        ({"min_numel": -1}, ValueError, "min_numel"),
        ({"chunk_symbols": 100}, ValueError, "chunk_symbols"),
        ({"chunk_symbols": 1 << 17}, ValueError, "chunk_symbols"),
        ({"colour": "red"}, TypeError, "unknown codec option"),
        ({"delta_floor": -1}, ValueError, "delta_floor must be None or an int from 0 to 32, got -1"),
        ({"delta_floor": 33}, ValueError, "delta_floor must be None or an int from 0 to 32, got 33"),
        ({"delta_floor": True}, ValueError, "delta_floor must be None or an int from 0 to 32, got True"),
        ({"delta_floor": 8.0}, ValueError, "delta_floor must be None or an int from 0 to 32, got 8.0"),
    ],
)
def test_invalid_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        lctriton.compress({"w": torch.randn(10)}, **options)


def test_reference_launchers_validate_arguments():
    x = torch.randn(100)
    with pytest.raises(TypeError, match="x must be float32"):
        reference.lc_histogram(torch.arange(3), None)
    with pytest.raises(TypeError, match="x must be a tensor"):
        reference.lc_histogram([1.0], None)
    with pytest.raises(TypeError, match="base must be a tensor"):
        reference.lc_histogram(x, [1.0])
    with pytest.raises(ValueError, match="base must match"):
        reference.lc_histogram(x, torch.randn(99))
    lut = torch.zeros(reference.NUM_FINE_KEYS, dtype=torch.uint8)
    reps, lengths = torch.zeros(2), torch.tensor([1, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="key_to_symbol"):
        reference.lc_encode(x, None, lut[:10], reps, lengths, 64)
    with pytest.raises(ValueError, match="chunk_symbols"):
        reference.lc_encode(x, None, lut, reps, lengths, 96)
    with pytest.raises(ValueError, match="code_lengths"):
        reference.lc_encode(x, None, lut, reps, lengths[:1], 64)


def test_fingerprint_sees_every_single_change_and_swaps():
    x = torch.randn(10_000)
    fp = reference.fingerprint(x)
    assert fp == reference.fingerprint(x.clone())
    for i in (0, 1023, 1024, 9999):
        y = x.clone()
        y.view(torch.int32)[i] ^= 1
        assert reference.fingerprint(y) != fp
    y = x.clone()
    y[[3, 2000]] = y[[2000, 3]]
    assert reference.fingerprint(y) != fp
    assert reference.fingerprint(x.view(100, 100)) == fp  # shape-free: bits and count
    assert reference.fingerprint(x.double()) != reference.fingerprint(x)
    assert bits(x).numel() == 10_000


def test_fingerprint_cache_computes_each_base_once_and_sees_writes(monkeypatch):
    """One encode names a base moment twice (its own record, its parameter's lc/3 context):
    the cache computes it once, and an in-place write to the tensor is a new tensor to it."""
    from lctriton import backend

    x = torch.randn(5000)
    calls = []
    real = backend.fingerprint
    monkeypatch.setattr(backend, "fingerprint", lambda t: calls.append(t.numel()) or real(t))
    cache = codecs.FingerprintCache()
    want = f"{reference.fingerprint(x):016x}"
    assert cache(x) == want
    assert cache(x.detach()) == want and cache(x.view(50, 100).reshape(-1)) == want
    assert calls == [5000]
    assert cache(x[1:]) == f"{reference.fingerprint(x[1:]):016x}"  # another view: another key
    x.add_(1.0)
    assert cache(x) == f"{reference.fingerprint(x):016x}" != want
    assert calls == [5000, 4999, 5000]
    assert codecs.base_fingerprint(x) == cache(x)


@pytest.mark.parametrize(
    "dtype, x, b",
    [(torch.float32, 3e38, -3e38), (torch.float64, 1e300, 0.0)],
)
def test_overflowing_delta_is_stored_exactly(dtype, x, b):
    xs = torch.full((2000,), 1.0, dtype=dtype)
    bs = torch.full((2000,), 0.5, dtype=dtype)
    xs[17], bs[17] = x, b
    c, restored = _roundtrip(xs, bs)
    assert restored[17] == xs[17]
    assert c.index["tensors"][0]["exceptions"] == 1


def test_unchanged_signed_zeros_restore_bit_exactly():
    x = torch.randn(5000)
    x[::7] = -0.0
    c, restored = _roundtrip(x, x.clone())
    assert_bit_exact(restored, x)


def test_subnormal_deltas_are_covered_by_the_bound():
    x = torch.full((4096,), 1e-40)
    c, restored = _roundtrip(x, torch.zeros(4096))
    assert float((restored - x).abs().max()) <= c.index["tensors"][0]["bound"]


def test_unstorable_tuple_keys_are_rejected_when_writing():
    with pytest.raises(TypeError, match="dict key"):
        lctriton.compress({(b"x", 1): 1})
    restored = lctriton.decompress(lctriton.compress({(1, ("a", None)): 2}).to_bytes())
    assert restored == {(1, ("a", None)): 2}


def test_sharing_is_per_kind_and_never_for_empty_tensors():
    arr = np.arange(2000, dtype=np.float32)
    state = {"t": torch.from_numpy(arr), "a": arr, "e1": torch.zeros(0), "e2": torch.zeros(0)}
    restored = lctriton.decompress(lctriton.compress(state).to_bytes())
    assert isinstance(restored["a"], np.ndarray) and isinstance(restored["t"], torch.Tensor)
    assert restored["e1"] is not restored["e2"]


def test_fingerprint_of_complex_tensors():
    z = torch.randn(3000, dtype=torch.complex128)
    assert reference.fingerprint(z) == reference.fingerprint(z.clone())
    assert reference.fingerprint(z) != reference.fingerprint(z * 2)


def test_keys_the_reader_cannot_hold_are_rejected_when_writing():
    with pytest.raises(TypeError, match="dict key"):
        lctriton.compress({torch.Size([2, 3]): 1})


def test_any_python_string_round_trips():
    state = {"\ud800 lone surrogate": "caf\u00e9 \U0001f600 \udfff"}
    assert lctriton.decompress(lctriton.compress(state).to_bytes()) == state


def test_compress_each_matches_compress_state_by_state():
    g = torch.Generator().manual_seed(11)
    states = [{"w": torch.randn(5000, generator=g), "i": torch.arange(3)},
              {"a": torch.randn(40, 70, generator=g).to(torch.bfloat16)},
              {}]
    bases = [{"w": states[0]["w"] + 0.01}, None, None]
    together, recons = lctriton.compress_each(states, bases, return_reconstruction=True, bits=3)
    for state, base, comp, recon in zip(states, bases, together, recons, strict=True):
        alone, alone_recon = lctriton.compress(state, base, return_reconstruction=True, bits=3)
        assert comp.to_bytes() == alone.to_bytes()
        for k in state:
            assert torch.equal(recon[k], alone_recon[k])
    assert len(lctriton.compress_each(states)) == 3
    with pytest.raises(ValueError, match="one entry per state"):
        lctriton.compress_each(states, [None])


# --------------------------------------------------------------------------- rANS, moments, planes


def _sparse_pair(n=200_000, changed=0.02, seed=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    x = base + (torch.rand(n, generator=g) < changed) * torch.randn(n, generator=g) * 1e-2
    return x, base


def test_rans_codes_below_one_bit_per_element():
    x, base = _sparse_pair()
    auto = lctriton.compress({"w": x}, base={"w": base})
    huff = lctriton.compress({"w": x}, base={"w": base}, coder="huffman")
    assert auto.index["tensors"][0]["codec"] == codecs.LC2
    assert huff.index["tensors"][0]["codec"] == codecs.LC
    assert huff.payload_nbytes * 8 / x.numel() >= 1.0  # Huffman's floor
    assert auto.payload_nbytes * 8 / x.numel() < 0.25
    for c in (auto, huff):  # the same symbols: the same restored tensor
        assert_bit_exact(lctriton.decompress(c, base={"w": base})["w"],
                         lctriton.decompress(huff, base={"w": base})["w"])


def test_coder_auto_keeps_huffman_where_rans_saves_little():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100_000, generator=g)
    x = base + torch.randn(100_000, generator=g) * 1e-2  # every element changes: dense symbols
    assert lctriton.compress({"w": x}, base={"w": base}).index["tensors"][0]["codec"] == codecs.LC
    forced = lctriton.compress({"w": x}, base={"w": base}, coder="rans")
    assert forced.index["tensors"][0]["codec"] == codecs.LC2


def test_bad_new_options_are_rejected():
    with pytest.raises(ValueError, match="coder"):
        lctriton.compress({"w": torch.ones(3)}, coder="zip")
    with pytest.raises(ValueError, match="moments"):
        lctriton.compress({"w": torch.ones(3)}, moments="drop")
    with pytest.raises(ValueError, match="moment_precision"):
        lctriton.compress({"w": torch.ones(3)}, moment_precision=9)
    with pytest.raises(ValueError, match="first_moment must be None or one of log, scaled, predict, lossy, exact"):
        lctriton.compress({"w": torch.ones(3)}, first_moment="zero")
    with pytest.raises(TypeError, match="code_exact"):
        lctriton.compress({"w": torch.ones(3)}, code_exact="yes")


def _adam_states(steps_between=3, seed=0):
    """Two Adam states of an embedding model, ``steps_between`` steps apart; most rows are
    never looked up, and some are looked up for the first time after the first state."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(3000, 16), torch.nn.Flatten(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(low, high):
        ids = torch.randint(low, high, (32, 4), generator=g)
        loss = model(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step(0, 200)
    first = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    for _ in range(steps_between):
        step(0, 400)  # rows 200..399 get their first gradients
    second = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    return first, second


def test_moment_decay_reads_betas_and_steps():
    first, second = _adam_states(steps_between=3)
    decay = lctriton.pipeline.moment_decay(second, first)
    assert decay["optimizer.state.0.exp_avg"] == pytest.approx(0.9**3)
    assert decay["optimizer.state.0.exp_avg_sq"] == pytest.approx(0.999**3)
    assert lctriton.pipeline.moment_decay(second, None) == {}


def test_log_moments_keep_second_moment_wherever_first_is_nonzero():
    """The hazard of coding moments like weights: a second moment that restores to zero
    under a nonzero first moment makes Adam's next update m / (sqrt(0) + eps) explode."""
    first, second = _adam_states()
    key, base = lctriton.compress(first, return_reconstruction=True)
    name = "optimizer.state.0"

    def moments(**options):
        c = lctriton.compress(second, base=base, **options)
        state = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
        return c, state["exp_avg"], state["exp_avg_sq"]

    c, m, v = moments(moments="log", moment_precision=2)
    codec_of = {r["name"]: r["codec"] for r in c.index["tensors"]}
    assert codec_of[f"{name}.exp_avg"] == codec_of[f"{name}.exp_avg_sq"] == codecs.LQ
    assert not bool(((v == 0) & (m != 0)).any())
    true_v = second["optimizer"]["state"][0]["exp_avg_sq"]
    true_m = second["optimizer"]["state"][0]["exp_avg"]
    nz = true_v > 0
    rel = ((v - true_v).abs() / true_v)[nz]
    assert float(rel.max()) <= 0.5  # half-octave bins
    update = m / (v.sqrt() + 1e-8)
    true_update = true_m / (true_v.sqrt() + 1e-8)
    assert float(update.abs().max()) <= 2 * float(true_update.abs().max())
    # Coding them like weights loses small second moments under nonzero first moments.
    _, m_lossy, v_lossy = moments(moments="lossy")
    assert bool(((v_lossy == 0) & (m_lossy != 0)).any())


@pytest.mark.parametrize("precision", [0, 1, 2])
def test_log_quantization_error_is_relative(precision):
    """The bound holds while the bins in use fit the 253 bin symbols (finer bins over a wide
    range are merged into their neighbours)."""
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    c = lctriton.compress(second, base=base, moment_precision=precision)
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]["exp_avg_sq"]
    true = second["optimizer"]["state"][0]["exp_avg_sq"]
    nz = true > 0
    rel = float(((restored - true).abs() / true)[nz].max())
    # A value keeps its bin's mean, or the prediction where that falls in its bin: either
    # way within one bin width, 2**-precision of the bin's lower end.
    assert rel <= 2.0 ** -precision * 1.0001


def _record_scale(c, name: str) -> np.float32:
    rec = next(r for r in c.index["tensors"] if r["name"] == name)
    return np.uint32(rec["scale"]).view(np.float32)


def test_predicted_moments_cost_only_their_records():
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    c = lctriton.compress(second, base=base, moments="predict")
    for rec in c.index["tensors"]:
        if rec["name"].startswith("optimizer.state.0.exp_avg"):  # the embedding's moments
            assert rec["codec"] == codecs.LQ and rec["fill"] == 0 and rec["words"] == 0
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
    for moment in ("exp_avg", "exp_avg_sq"):
        name = f"optimizer.state.0.{moment}"
        scale = _record_scale(c, name)
        want = codecs.fit_prediction_scale(second["optimizer"]["state"][0][moment], base["optimizer"]["state"][0][moment], 1.0)
        assert scale == np.float32(want)
        assert_bit_exact(restored[moment], base["optimizer"]["state"][0][moment] * scale)


def test_fitted_prediction_beats_the_decay():
    """Rows looked up for the first time grow the second moment far past its decayed base, and
    the first moment keeps part of its direction: both fitted factors restore closer."""
    first, second = _adam_states(steps_between=10)
    _, base = lctriton.compress(first, return_reconstruction=True)
    c = lctriton.compress(second, base=base, moments="predict")
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
    true, old = second["optimizer"]["state"][0], base["optimizer"]["state"][0]
    m_err = (restored["exp_avg"] - true["exp_avg"]).norm()
    assert m_err < (old["exp_avg"] * 0.9**10 - true["exp_avg"]).norm()
    both = (true["exp_avg_sq"] > 0) & (old["exp_avg_sq"] > 0)
    log_err = (restored["exp_avg_sq"][both] / true["exp_avg_sq"][both]).log().abs().mean()
    assert log_err < (old["exp_avg_sq"][both] * 0.999**10 / true["exp_avg_sq"][both]).log().abs().mean()


def test_fit_prediction_scale():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(200_000, generator=g)
    x = b * 0.25 + torch.randn(200_000, generator=g) * 0.01
    assert codecs.fit_prediction_scale(x, b, 1.0) == pytest.approx(0.25, rel=1e-3)  # least squares
    assert codecs.fit_prediction_scale(-x, b, 0.5) == 0.5  # never a negative factor: the fallback
    v = b.abs()
    w = v * torch.where(torch.rand(200_000, generator=g) < 0.7, 3.0, 0.5)
    assert codecs.fit_prediction_scale(w, v, 1.0) == 3.0  # the median ratio
    w[::7] = float("nan")
    assert codecs.fit_prediction_scale(w, v, 1.0) == 3.0  # non-finite elements are skipped
    assert codecs.fit_prediction_scale(w, torch.zeros_like(v), 0.5) == 0.5  # nothing to fit
    assert codecs.fit_prediction_scale(x, torch.zeros_like(b), 0.5) == 0.5
    # Exact sums over a strided sample: any layout of the same values gives the same bits.
    assert codecs.fit_prediction_scale(x.reshape(400, 500).t().contiguous().t(), b.reshape(400, 500), 1.0) == (
        codecs.fit_prediction_scale(x, b, 1.0)
    )


def test_log_scale_follows_a_growing_second_moment():
    g = torch.Generator().manual_seed(5)
    v = torch.rand(100_000, generator=g) ** 4 + 1e-12
    grown = v * 1.4 * (1 + 0.05 * torch.randn(100_000, generator=g)).abs()
    median = np.median(grown.double().numpy()[::2] / v.double().numpy()[::2])  # the strided sample
    assert codecs.choose_log_scale(grown, v, 0.98, 2) == np.float32(median)
    decayed = v * np.float32(0.98)
    decayed[::10] *= 3  # a tenth had a gradient
    assert codecs.choose_log_scale(decayed, v, 0.98, 2) == np.float32(0.98)  # ties and losses keep the decay
    assert codecs.choose_log_scale(grown, torch.zeros_like(v), 0.98, 2) == np.float32(0.98)
    # The fitted scale is what the record holds, and it cuts the stream.
    fitted = codecs.encode_lq(grown, v, 0.98, 2, 4096)
    assert np.uint32(fitted.record["scale"]).view(np.float32) == codecs.choose_log_scale(grown, v, 0.98, 2)
    plain = codecs.encode_lq(grown, v * 0, 0.98, 2, 4096)  # nothing to predict from
    assert fitted.nbytes < plain.nbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("moments", ["log", "predict"])
def test_moments_in_any_float_dtype(dtype, moments):
    def moments_as_dtype(state):
        opt = state["optimizer"]
        moments = {pid: {k: v.to(dtype) if k.startswith("exp_avg") else v for k, v in st.items()}
                   for pid, st in opt["state"].items()}
        return {"optimizer": {**opt, "state": moments}}

    first, second = map(moments_as_dtype, _adam_states(steps_between=4))
    _, base = lctriton.compress(first, return_reconstruction=True)
    c, recon = lctriton.compress(second, base=base, moments=moments, return_reconstruction=True)
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
    for k in ("exp_avg", "exp_avg_sq"):
        assert restored[k].dtype == dtype
        assert_bit_exact(restored[k], recon["optimizer"]["state"][0][k])


@pytest.mark.parametrize("mode", ["predict", "exact", "lossy"])
def test_first_moment_mode_applies_to_first_moments_only(mode):
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    c = lctriton.compress(second, base=base, first_moment=mode)
    codec = {r["name"]: r for r in c.index["tensors"]}
    m, v = codec["optimizer.state.0.exp_avg"], codec["optimizer.state.0.exp_avg_sq"]
    assert v["codec"] == codecs.LQ and v["words"] > 0  # the second moment as moments="log" codes it
    want = {"predict": codecs.LQ, "exact": codecs.BP, "lossy": codecs.LC2}[mode]
    assert m["codec"] in ((codecs.LC, codecs.LC2) if mode == "lossy" else (want,))
    if mode == "predict":
        assert m["words"] == 0 and m["fill"] == 0
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
    if mode == "exact":
        assert_bit_exact(restored["exp_avg"], second["optimizer"]["state"][0]["exp_avg"])
    same = lctriton.compress(second, base=base)
    assert_bit_exact(restored["exp_avg_sq"], lctriton.decompress(same, base=base)["optimizer"]["state"][0]["exp_avg_sq"])


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8,
              torch.bool, torch.complex64, torch.int32]
)
@pytest.mark.parametrize("with_base", [False, True])
def test_byte_planes_are_lossless(dtype, with_base):
    g = torch.Generator().manual_seed(4)
    if dtype == torch.bool:
        x = torch.rand(5000, generator=g) < 0.1
        b = torch.rand(5000, generator=g) < 0.1
    elif dtype.is_floating_point or dtype.is_complex:
        x = (torch.randn(5000, generator=g) * 0.02).to(dtype)
        b = (x.to(torch.complex128 if dtype.is_complex else torch.float64)
             + torch.randn(5000, generator=g, dtype=torch.float64) * 1e-4).to(dtype)
    else:
        x = torch.randint(0, 100, (5000,), generator=g).to(dtype)
        b = x.clone()
        b[::10] += 1
    state, base = {"t": x}, ({"t": b} if with_base else None)
    c = lctriton.compress(state, base=base, lossless=True)
    rec = c.index["tensors"][0]
    assert rec["codec"] == codecs.BP and (rec["base"] is not None) == with_base
    assert_bit_exact(lctriton.decompress(c.to_bytes(), base=base)["t"], x)
    assert c.payload_nbytes < x.numel() * x.element_size()


def test_byte_planes_against_a_base_shrink_close_weights():
    x, base = _sparse_pair(changed=0.05)
    alone = lctriton.compress({"w": x}, lossless=True)
    delta = lctriton.compress({"w": x}, base={"w": base}, lossless=True)
    assert delta.nbytes * 3 < alone.nbytes
    with pytest.raises(lctriton.BaseMismatchError):
        lctriton.decompress(delta, base={"w": x})
