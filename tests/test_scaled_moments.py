"""sq/1: Adam first moments coded in units of the step they cause (``first_moment="scaled"``).

The reference functions are the codec on every device (float32 ``*``, ``/``, ``sqrt`` and
``round`` are correctly rounded everywhere); these tests pin their arithmetic, the bound the
codec promises on the restored Adam step, the fallbacks, and the reader's checks of the record.
"""

import copy
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lctriton.kernels import rans_cpu, reference

import lctriton
from lctriton import codecs
from lctriton.errors import FormatError
from lctriton.testing import assert_bit_exact


def with_index(data: bytes, index: dict) -> bytes:
    """``data`` with its JSON index replaced (sections kept, the index deflated as format 2
    stores it, checksums and footer valid)."""
    index_offset = struct.unpack("<Q", data[-32:-24])[0]
    blob = json.dumps(index, separators=(",", ":")).encode()
    if struct.unpack_from("<H", data, 8)[0] >= 2:
        blob = zlib.compress(blob)
    body = struct.pack("<QQI", index_offset, len(blob), zlib.crc32(blob))
    return data[:index_offset] + blob + body + struct.pack("<I8s", zlib.crc32(body), b"LCTEND\r\n")


def _adam_states(steps_between=4, seed=0, momentum_sgd=False):
    """Two optimizer states of a small embedding model, ``steps_between`` steps apart. Most
    embedding rows are never looked up (both moments stay exactly zero) and rows 200..399
    get their first gradients between the two states."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(3000, 16), torch.nn.Flatten(), torch.nn.Linear(64, 4))
    if momentum_sgd:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.randn(32, 4, generator=g)

    def step(low, high):
        ids = torch.randint(low, high, (32, 4), generator=g)
        loss = (model(ids) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(6):
        step(0, 200)
    first = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    for _ in range(steps_between):
        step(0, 400)
    second = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    return first, second


def _records(c):
    return {r["name"]: r for r in c.index["tensors"]}


# --------------------------------------------------------------------------- the arithmetic


#: The compiled CPU pass (where a C compiler is present) and the reference: the same bytes.
SQ_TWINS = [reference] + ([rans_cpu] if rans_cpu.available() else [])


def _spec_case():
    """Values that reach every branch of the specification: predictions, 0/0, d/0, inf, NaN,
    a level past the reach, ties, a negative zero prediction and an overflowing one."""
    x = torch.tensor([0.5, -0.25, 3.0, 0.0, 1e-3, 2.0, float("inf"), 1.0, 5.0, 0.75, -1e-9, 3e38, 0.25, 0.75],
                     dtype=torch.float32)
    b = torch.tensor([0.25, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, float("nan"), 0.0, 1.0, -0.0, 0.0, 0.0, 0.0],
                     dtype=torch.float32)
    n = torch.tensor([1.0, 0.25, 4.0, 0.0, 0.0, 1e-12, 1.0, 1.0, 1.0, 0.0, 1.0, 3e38, 1.0, 1.0],
                     dtype=torch.float32)
    return x, b, n


@pytest.mark.parametrize("twin", SQ_TWINS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_symbols_follow_the_specification(twin):
    """Levels, exceptions and reconstruction as reference.py's sq/1 section states them,
    element by element against numpy float32 arithmetic, for the reference and its twin."""
    f32 = np.float32
    x, b, n = _spec_case()
    scale, precision = 0.5, 1
    symbols, reach, recon, exceptional = twin.sq_symbols(x, b, scale, n, precision)
    levels, bad = [], []
    for xi, bi, ni in zip(x.numpy(), b.numpy(), n.numpy(), strict=True):
        with np.errstate(all="ignore"):
            p = f32(bi) * f32(scale)
            s = np.sqrt(f32(ni))
            d = f32(xi) - p
            q = f32(0.0) if d == 0 else np.rint(f32(d / s) * f32(2.0**precision))
            wrong = not np.isfinite(q) or abs(q) > reference.SQ_REACH
            q = f32(0.0) if wrong else q
            wrong = wrong or not np.isfinite(p + f32(q * f32(2.0**-precision)) * s)
        levels.append(0 if wrong else int(q))
        bad.append(wrong)
    assert exceptional.tolist() == bad
    assert reach == max(abs(k) for k in levels)
    assert (symbols.to(torch.int64) - reach).tolist() == levels
    # 0/0 (never stepped) is level 0, not an exception; d/0, inf, NaN, a level of 2e6 and an
    # overflowing reconstruction are exceptions; 5.0 at two levels per unit is level 10.
    assert levels[3] == 0 and not bad[3]
    assert all(bad[i] for i in (4, 5, 6, 7, 9, 11)) and levels[8] == 10
    for i in range(len(x)):
        if bad[i]:
            assert recon[i].numpy().tobytes() == x[i].numpy().tobytes(), i  # the exact value
            continue
        p = f32(b[i].item()) * f32(scale)
        want = p + f32(f32(levels[i]) * f32(2.0**-precision)) * np.sqrt(f32(n[i].item()))
        assert recon[i].numpy().tobytes() == f32(want).tobytes(), i
    assert recon[10].numpy().tobytes() == f32(0.0).tobytes()  # -0.0 prediction, level 0: +0.0
    # The decoder's side gives the same bits wherever the element is not an exception.
    decoded = twin.sq_reconstruct(symbols, reach, precision, b, scale, n)
    ok = ~exceptional
    assert decoded[ok].numpy().tobytes() == recon[ok].numpy().tobytes()
    reps = reference.sq_representatives(reach, precision)
    assert reps.dtype == np.float32 and reps.tolist() == [(j - reach) / 2 for j in range(2 * reach + 1)]


@pytest.mark.parametrize("precision", [0, 2, 4])
def test_compiled_pass_matches_the_reference_on_a_million_moments(precision):
    if not rans_cpu.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(precision)
    n = 1_000_000
    v = torch.exp(torch.randn(n, generator=g) * 3 - 18)
    v[torch.rand(n, generator=g) < 0.1] = 0
    m = torch.randn(n, generator=g) * v.sqrt() * 2
    m[v == 0] = 0
    m[torch.rand(n, generator=g) < 0.001] = torch.randn(1000, generator=g)[:1].item()  # out of reach
    base = m * 0.5 + torch.randn(n, generator=g) * 1e-6
    base[::97] = -0.0
    ours = rans_cpu.sq_symbols(m, base, 0.3, v, precision)
    want = reference.sq_symbols(m, base, 0.3, v, precision)
    assert ours[1] == want[1]
    for a, b in ((ours[0], want[0]), (ours[2], want[2]), (ours[3], want[3])):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    back = rans_cpu.sq_reconstruct(want[0], want[1], precision, base, 0.3, v)
    assert back.numpy().tobytes() == reference.sq_reconstruct(want[0], want[1], precision, base, 0.3, v).numpy().tobytes()


_F32_BITS = st.integers(0, 2**32 - 1)


@pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler")
@given(st.lists(st.tuples(_F32_BITS, _F32_BITS, _F32_BITS), min_size=1, max_size=64),
       st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.integers(0, 4))
def test_compiled_pass_matches_the_reference_on_any_bits(triples, scale, precision):
    """Any float32 bit patterns (NaN payloads, infinities, subnormals, negative second
    moments): the compiled pass gives the reference's symbols, reach, exceptions and
    reconstruction bytes, and its decoder the reference's."""
    words = torch.tensor(triples, dtype=torch.int64).to(torch.int32)  # two's complement bits
    x, b, n = (words[:, j].contiguous().view(torch.float32) for j in range(3))
    ours = rans_cpu.sq_symbols(x, b, scale, n, precision)
    want = reference.sq_symbols(x, b, scale, n, precision)
    assert ours[1] == want[1]
    for a, c in ((ours[0], want[0]), (ours[2], want[2]), (ours[3], want[3])):
        assert a.numpy().tobytes() == c.numpy().tobytes()
    decoded = rans_cpu.sq_reconstruct(want[0], want[1], precision, b, scale, n)
    expected = reference.sq_reconstruct(want[0], want[1], precision, b, scale, n)
    ok = ~want[3]
    assert decoded[ok].numpy().tobytes() == expected[ok].numpy().tobytes()


def test_ties_round_to_even_and_reach_is_inclusive():
    n = torch.ones(6, dtype=torch.float32)
    x = torch.tensor([0.25, 0.75, -0.25, 63.5, 63.75, -63.5], dtype=torch.float32)
    for twin in SQ_TWINS:
        symbols, reach, _, bad = twin.sq_symbols(x, torch.zeros(6), 1.0, n, 1)
        levels = (symbols.to(torch.int64) - reach).tolist()
        assert levels[:3] == [0, 2, 0]  # 0.5 -> 0, 1.5 -> 2, -0.5 -> 0
        assert levels[3] == 127 and not bad[3] and levels[5] == -127  # |k| = SQ_REACH is kept
        assert bad[4] and levels[4] == 0  # 127.5 rounds to 128: an exception


def test_reference_rejects_other_dtypes_and_sizes():
    x = torch.zeros(8)
    for twin in SQ_TWINS:
        with pytest.raises(TypeError, match="float32 tensors: norm is torch.float16"):
            twin.sq_symbols(x, x, 1.0, x.half(), 1)
        with pytest.raises(ValueError, match="base and norm of 8 elements, got 8 and 7"):
            twin.sq_symbols(x, x, 1.0, torch.zeros(7), 1)


# --------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("precision", [0, 1, 3])
def test_restored_step_is_within_half_a_level(precision):
    """The promise of sq/1: ``|m' - m| <= 2**-(P+1) * sqrt(v')`` for every element, with ``v'``
    the second moment the same file restores, and elements never stepped stay exactly 0."""
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    c, recon = lctriton.compress(second, base=base, first_moment="scaled", scaled_precision=precision,
                                 return_reconstruction=True)
    rec = _records(c)["optimizer.state.0.exp_avg"]
    assert rec["codec"] == codecs.SQ and rec["norm"] == "optimizer.state.0.exp_avg_sq"
    assert rec["precision"] == precision and rec["bound"] == 2.0 ** -(precision + 1)
    assert rec["exceptions"] == 0 and rec["reach"] <= 8 << precision  # Adam keeps |m| / sqrt(v) small
    assert _records(c)["optimizer.state.0.exp_avg_sq"]["codec"] == codecs.LQ
    restored = lctriton.decompress(c, base=base)["optimizer"]["state"][0]
    assert_bit_exact(restored["exp_avg"], recon["optimizer"]["state"][0]["exp_avg"])
    m, m_restored, v_restored = second["optimizer"]["state"][0]["exp_avg"], restored["exp_avg"], restored["exp_avg_sq"]
    error = (m_restored - m).abs()
    bound = 2.0 ** -(precision + 1) * v_restored.sqrt()
    assert bool((error <= bound * (1 + 2**-20) + 1e-30).all())
    never = second["optimizer"]["state"][0]["exp_avg_sq"] == 0
    assert never.sum() > 1000 and bool((m_restored[never] == 0).all())


def test_scaled_precision_trades_bytes_for_error():
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    sizes = []
    for precision in (0, 1, 2, 3):
        c = lctriton.compress(second, base=base, first_moment="scaled", scaled_precision=precision)
        sizes.append(next(r["stored_nbytes"] for r in lctriton.inspect(c)["tensors"]
                          if r["name"] == "optimizer.state.0.exp_avg"))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_scaled_moments_survive_a_chain_and_the_manager(tmp_path):
    """Deltas of deltas: each sq/1 record reads the second moment of its own file and the
    first moment of its base; a fresh manager decodes the chain to what the saving manager
    coded, and every first moment of the head is within half a level of the live one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 64), torch.randn(256, 4)
    with lctriton.CheckpointManager(tmp_path, first_moment="scaled", moment_precision=0) as manager:
        for step in range(1, 16):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step % 3 == 0:
                manager.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    with lctriton.CheckpointManager(tmp_path) as fresh:
        restored = fresh.restore()
    assert restored.step == 15
    files = sorted(tmp_path.rglob("*.lct"))
    assert len(files) == 5
    last = {r["name"]: r["codec"] for r in lctriton.inspect(str(files[-1]))["tensors"]}
    assert last["optimizer.state.0.exp_avg"] == codecs.SQ  # the 64x64 weight's first moment
    live = opt.state_dict()["state"]
    for pid, moments in restored.state["optimizer"]["state"].items():
        bound = 2.0**-2 * moments["exp_avg_sq"].sqrt() * (1 + 2**-20) + 1e-30
        assert bool(((moments["exp_avg"] - live[pid]["exp_avg"]).abs() <= bound).all()), pid


@pytest.mark.parametrize(
    "case", ["sgd_momentum", "float16_moments", "key_without_base", "exact_pattern"]
)
def test_scaled_falls_back_where_it_cannot_apply(case):
    """No second moment beside the first (SGD), another dtype, no base: the first moment is
    coded as ``moments`` says (``lq/1``); an exact pattern keeps it exact."""
    first, second = _adam_states(momentum_sgd=case == "sgd_momentum")
    options = {"first_moment": "scaled"}
    if case == "float16_moments":
        for state in (first, second):
            for moments in state["optimizer"]["state"].values():
                for k in ("exp_avg", "exp_avg_sq"):
                    moments[k] = moments[k].half()
    name = "optimizer.state.0." + ("momentum_buffer" if case == "sgd_momentum" else "exp_avg")
    if case == "key_without_base":
        c = lctriton.compress(second, lossless_key=False, **options)
        assert _records(c)[name]["codec"] == codecs.LQ
        return
    if case == "exact_pattern":
        options["exact"] = ["*.exp_avg"]
    _, base = lctriton.compress(first, return_reconstruction=True)
    c, recon = lctriton.compress(second, base=base, return_reconstruction=True, **options)
    assert _records(c)[name]["codec"] == (codecs.BP if case == "exact_pattern" else codecs.LQ)
    restored = lctriton.pipeline.flatten_tensors(lctriton.decompress(c, base=base))
    assert_bit_exact(restored[name], lctriton.pipeline.flatten_tensors(recon)[name])


@pytest.mark.parametrize("moments", ["scaled", "log"])
def test_empty_moments_round_trip(moments):
    """With min_numel=0 even empty moments are coded: an empty stream is a fill of symbol 0."""
    def state(step):
        empty = torch.zeros(0)
        return {"optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": empty.clone(),
                                            "exp_avg_sq": empty.clone()}},
                              "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]}}

    c = lctriton.compress(state(2), base=state(1), min_numel=0, moments=moments)
    want = codecs.SQ if moments == "scaled" else codecs.LQ
    assert _records(c)["optimizer.state.0.exp_avg"]["codec"] == want
    restored = lctriton.decompress(c.to_bytes(), base=state(1))["optimizer"]["state"][0]
    assert restored["exp_avg"].shape == (0,) and restored["exp_avg_sq"].shape == (0,)


def test_a_failing_job_raises_from_compress():
    """An error in any job (here the progress callback) reaches the caller."""
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)

    def progress(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        lctriton.compress(second, base=base, progress=progress)


_EXIT_WHILE_SAVING = """
import sys, tempfile, time, torch, lctriton
n = 1 << 20
def state(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g) * 1e-6
    return {"model": {"w": torch.randn(n, generator=g), "w2": torch.randn(n, generator=g)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(n, generator=g) * v.sqrt(),
                                        "exp_avg_sq": v}},
                          "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}]}}
manager = lctriton.CheckpointManager(tempfile.mkdtemp())
manager.save(1, state(1)).durable.result()
manager.save(2, state(2))
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.parametrize("delay", [0.0, 0.03])
def test_the_process_exits_while_a_save_codes_first_moments(delay):
    """A script that ends without closing its manager, while a delta with sq/1 first moments
    is being coded in the background, exits (the save fails or completes; nothing hangs)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _EXIT_WHILE_SAVING, str(delay)], env=env, timeout=120,
                          capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_options_are_checked():
    with pytest.raises(ValueError, match="scaled_precision must be an int from 0 to 4, got 5"):
        lctriton.compress({"w": torch.ones(3)}, scaled_precision=5)
    with pytest.raises(ValueError, match="scaled_precision must be an int from 0 to 4, got True"):
        lctriton.compress({"w": torch.ones(3)}, scaled_precision=True)


# --------------------------------------------------------------------------- the reader


@pytest.fixture(scope="module")
def scaled_file():
    first, second = _adam_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    # min_numel 16: the linear layer's first moment is coded too, so the file has two sq/1
    # records (coder "rans": never grouped into sq/2).
    data = lctriton.compress(second, base=base, first_moment="scaled", min_numel=16, coder="rans").to_bytes()
    return data, base


def _edit(data, change, codec=codecs.SQ):
    """``data`` with its first ``codec`` record changed by ``change(record, index)``."""
    index = lctriton.Compressed.from_bytes(data).index
    index = json.loads(json.dumps(index))
    rec = next(r for r in index["tensors"] if r["codec"] == codec)
    change(rec, index)
    return with_index(data, index)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, i: r.pop("norm"), r"'norm' must name another tensor"),
        (lambda r, i: r.update(norm=r["name"]), r"'norm' must name another tensor"),
        (lambda r, i: r.update(norm="optimizer.state.9.exp_avg_sq"), r"which the file lacks"),
        (lambda r, i: r.update(norm="optimizer.state.0.step"), r"is not a float32 tensor of \d+ elements"),
        (lambda r, i: r.update(reach=128), r"'reach'"),
        (lambda r, i: r.update(reach=r["reach"] + 1), r"'freqs' must list"),
        (lambda r, i: r.update(dtype="float16"), r"cannot hold dtype float16"),
        (lambda r, i: r.update(scale=0), r"'scale' must be a positive finite float32"),
        (lambda r, i: r.update(base=None), r"'base' must name one"),
        (lambda r, i: r.update(precision=5), r"'precision'"),
    ],
    ids=["no-norm", "norm-is-itself", "norm-missing", "norm-wrong-kind", "reach-too-far", "reach-vs-freqs",
         "dtype", "scale", "no-base", "precision"],
)
def test_bad_records_are_format_errors(scaled_file, change, message):
    data, base = scaled_file
    with pytest.raises(FormatError, match=message):
        lctriton.decompress(_edit(data, change), base=base)


def test_a_norm_that_is_itself_scaled_is_refused(scaled_file):
    """Every norm must decode before the records that read it: an sq/1 record cannot be one."""
    data, base = scaled_file

    def point_at_other_first_moment(rec, index):
        others = [r for r in index["tensors"] if r["codec"] == codecs.SQ and r is not rec]
        other = others[0]
        other["shape"], rec["norm"] = rec["shape"], other["name"]  # same size, so only the codec is wrong

    with pytest.raises(FormatError, match="coded before it"):
        lctriton.decompress(_edit(data, point_at_other_first_moment), base=base)


def test_wrong_base_is_still_detected(scaled_file):
    data, base = scaled_file
    other = copy.deepcopy(base)
    other["optimizer"]["state"][0]["exp_avg"][0] += 1
    with pytest.raises(lctriton.BaseMismatchError):
        lctriton.decompress(data, base=other)


# --------------------------------------------------------------------------- sq/2: contexts


def test_sq2_codes_sq1_levels_grouped_by_the_base_moments():
    """sq/2 changes only the coding: the same levels as sq/1, so the same reconstruction bit
    for bit, decoded from the file; the record names the base's two moments."""
    first, second = _adam_states(steps_between=6)
    _, base = lctriton.compress(first, return_reconstruction=True)
    grouped, recon = lctriton.compress(second, base=base, coder="context", min_numel=16, return_reconstruction=True)
    single, recon_single = lctriton.compress(second, base=base, coder="rans", min_numel=16, return_reconstruction=True)
    flat, flat_single = lctriton.pipeline.flatten_tensors(recon), lctriton.pipeline.flatten_tensors(recon_single)
    restored = lctriton.pipeline.flatten_tensors(lctriton.decompress(grouped.to_bytes(), base=base))
    scaled = {n: r for n, r in _records(grouped).items() if r["codec"] == codecs.SQ2}
    assert set(scaled) == {"optimizer.state.0.exp_avg", "optimizer.state.1.exp_avg"}
    base_flat = lctriton.pipeline.flatten_tensors(base)
    for name, rec in scaled.items():
        assert _records(single)[name]["codec"] == codecs.SQ
        assert_bit_exact(flat[name], flat_single[name], name)
        assert_bit_exact(restored[name], flat[name], name)
        assert [ref["name"] for ref in rec["context"]] == [name, name + "_sq"]
        assert [ref["base"] for ref in rec["context"]] == [
            codecs.base_fingerprint(base_flat[name]), codecs.base_fingerprint(base_flat[name + "_sq"])]
        assert len(rec["tables"]) == codecs.NUM_CONTEXTS and rec["reach"] >= 1


def _persistent_state(predictable: bool | None):
    """An Adam state and its base 20 steps before: a 64x64 parameter whose first moment keeps
    its sign and size relative to ``sqrt(v)`` (``predictable``: what sq/2's contexts model,
    as while gradients keep their direction), takes levels unrelated to its base (False), or
    is exactly the base decayed by Adam's beta1 over the 20 steps (None: every level 0)."""
    i = torch.arange(4096)
    v_base = torch.pow(2.0, -((i * 7) % 20 + 10).to(torch.float32))
    unit = v_base.sqrt()
    ratio = torch.pow(2.0, ((i * 5) % 6 - 4).to(torch.float32)) * torch.where(i % 3 == 0, -1.0, 1.0)
    m_base = ratio * unit
    v = v_base * 1.01
    noise = ((((i * 2654435761) % 4093) / 4093.0 - 0.5) * 6).to(torch.float32)
    m = (ratio * 0.8 if predictable else noise) * v.sqrt()
    if predictable is None:
        m = m_base * float(np.float32(0.9**20))

    def state(step, m, v):
        return {"model": {"w": torch.zeros(64, 64)}, "optimizer": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": m.reshape(64, 64), "exp_avg_sq": v.reshape(64, 64)}},
            "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}]}}

    return state(40.0, m, v), state(20.0, m_base, v_base)


@pytest.mark.parametrize("predictable", [True, False, None], ids=["predictable", "unrelated", "all-zero"])
def test_auto_groups_first_moments_where_it_pays(predictable):
    """sq/2 where contexts save 5%; sq/1 for levels unrelated to the base, and for a fill
    (every level 0), where there is nothing to save."""
    state, base = _persistent_state(predictable)
    auto = lctriton.compress(state, base=base)
    codec = _records(auto)["optimizer.state.0.exp_avg"]["codec"]
    assert codec == (codecs.SQ2 if predictable else codecs.SQ)
    if predictable is None:
        assert _records(auto)["optimizer.state.0.exp_avg"]["fill"] == _records(auto)["optimizer.state.0.exp_avg"]["reach"]
    single = lctriton.compress(state, base=base, coder="rans")
    grouped = lctriton.compress(state, base=base, coder="context")
    assert _records(grouped)["optimizer.state.0.exp_avg"]["codec"] == codecs.SQ2

    def first_moment_bytes(c):
        return next(t["stored_nbytes"] for t in lctriton.inspect(c)["tensors"] if t["name"].endswith("exp_avg"))

    if predictable:
        assert first_moment_bytes(grouped) < 0.5 * first_moment_bytes(single)
    for c in (auto, single, grouped):
        restored = lctriton.pipeline.flatten_tensors(lctriton.decompress(c.to_bytes(), base=base))
        assert_bit_exact(restored["optimizer.state.0.exp_avg"],
                         lctriton.pipeline.flatten_tensors(lctriton.compress(state, base=base, return_reconstruction=True)[1])["optimizer.state.0.exp_avg"])


@pytest.fixture(scope="module")
def scaled_context_file():
    first, second = _adam_states(steps_between=6)
    _, base = lctriton.compress(first, return_reconstruction=True)
    data = lctriton.compress(second, base=base, coder="context", min_numel=16).to_bytes()
    return data, base


def _first_coded_table(rec):
    return next(t for t in rec["tables"] if "freqs" in t)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, i: r.pop("norm"), r"'norm' must name another tensor"),
        (lambda r, i: r.update(norm="optimizer.state.9.exp_avg_sq"), r"which the file lacks"),
        (lambda r, i: r["context"].pop(), r"'context' must list two"),
        (lambda r, i: r["context"][1].update(base="xyz"), r"'context' must list two"),
        (lambda r, i: r["tables"].pop(), r"'tables' must list 48 context tables"),
        (lambda r, i: r.update(reach=r["reach"] + 1), r"context table \d+: 'freqs' must list"),
        (lambda r, i: _first_coded_table(r).update(count=_first_coded_table(r)["count"] + 1),
         r"context tables count \d+ elements"),
        (lambda r, i: r["tables"].__setitem__(
            next(c for c, t in enumerate(r["tables"]) if t["count"]), {"count": next(t["count"] for t in r["tables"] if t["count"]), "fill": 2 * r["reach"] + 1}),
         r"'fill' must be a symbol below"),
        (lambda r, i: r.update(precision=5), r"'precision'"),
        (lambda r, i: r.update(base=None), r"'base' must name one"),
    ],
    ids=["no-norm", "norm-missing", "one-context", "context-fingerprint", "tables", "reach-vs-freqs",
         "counts", "fill", "precision", "no-base"],
)
def test_bad_sq2_records_are_format_errors(scaled_context_file, change, message):
    data, base = scaled_context_file
    with pytest.raises(FormatError, match=message):
        lctriton.decompress(_edit(data, change, codecs.SQ2), base=base)


def test_sq2_contexts_are_checked_against_the_base(scaled_context_file):
    """A base whose second moment differs is refused by name (the contexts come from it),
    and so are context tables that do not count the base's contexts."""
    data, base = scaled_context_file
    other = copy.deepcopy(base)
    other["optimizer"]["state"][0]["exp_avg_sq"][3] *= 4
    with pytest.raises(lctriton.BaseMismatchError, match=r"exp_avg_sq"):
        lctriton.decompress(data, base=other)

    def move_one_element(rec, index):
        """One element from one coded context to another, with every section size kept
        (neither count crosses a chunk boundary), so only the base's contexts disagree."""
        chunk = rec["chunk"]
        coded = [t for t in rec["tables"] if "freqs" in t]
        source = next(t for t in coded if t["count"] % chunk != 1)
        target = next(t for t in coded if t is not source and t["count"] % chunk != 0)
        source["count"] -= 1
        target["count"] += 1

    with pytest.raises(FormatError, match=r"its context tables do not count the base's contexts"):
        lctriton.decompress(_edit(data, move_one_element, codecs.SQ2), base=base)


def test_a_norm_that_is_sq2_is_refused():
    """Two first moments of the same size, both sq/2: one may not be the other's norm (every
    norm must decode before the records that read it)."""
    state, base = _persistent_state(True)
    for s in (state, base):
        moments = s["optimizer"]["state"]
        moments[1] = {k: v.flip(0).clone() for k, v in moments[0].items()}
        s["optimizer"]["param_groups"][0]["params"] = [0, 1]
        s["model"]["v"] = torch.zeros(64, 64)
    data = lctriton.compress(state, base=base, coder="context").to_bytes()
    assert sum(r["codec"] == codecs.SQ2 for r in _records(lctriton.Compressed.from_bytes(data)).values()) == 2

    def point_at_other_first_moment(rec, index):
        rec["norm"] = next(r for r in index["tensors"] if r["codec"] == codecs.SQ2 and r is not rec)["name"]

    with pytest.raises(FormatError, match=r"is not a float32 tensor of 4096 elements coded before it"):
        lctriton.decompress(_edit(data, point_at_other_first_moment, codecs.SQ2), base=base)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("coder", ["auto", "context"])
def test_gpu_scaled_moments_match_cpu_bytes(coder):
    """sq/1 (and with coder="context", sq/2) on CUDA writes the CPU's bytes and decodes them
    to the CPU's values."""
    first, second = _adam_states(steps_between=6)
    _, base = lctriton.compress(first, return_reconstruction=True)
    cpu_bytes = lctriton.compress(second, base=base, first_moment="scaled", coder=coder, min_numel=16).to_bytes()

    def cuda(state):
        return {"model": {k: v.cuda() for k, v in state["model"].items()},
                "optimizer": {**state["optimizer"], "state": {
                    p: {k: v.cuda() for k, v in s.items()} for p, s in state["optimizer"]["state"].items()}}}

    gbase = cuda(base)
    assert lctriton.compress(cuda(second), base=gbase, first_moment="scaled", coder=coder, min_numel=16).to_bytes() == cpu_bytes
    from_gpu = lctriton.pipeline.flatten_tensors(lctriton.decompress(cpu_bytes, base=gbase))
    from_cpu = lctriton.pipeline.flatten_tensors(lctriton.decompress(cpu_bytes, base=base))
    for k, v in from_cpu.items():
        assert_bit_exact(from_gpu[k].cpu(), v, k)
