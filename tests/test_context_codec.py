"""lc/3 and lq/2: symbols coded per context read from the base.

lc/3 codes a weight delta per context of the base's Adam moments, lq/2 a moment per binade
of its own base. The context stage's torch twins (``kernels/reference.py``, section "lc/3
and lq/2 contexts") against the compiled CPU loops (``kernels/rans_cpu.c``) byte for byte;
the mapping of a model's parameters to its optimizer's numbered moments; and the codecs end
to end: chosen where they pay, bit-exact decodes, and clear errors when the base's moments
are missing or changed.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from lctriton.kernels import rans_cpu, reference

import lctriton
from lctriton import codecs, pipeline
from lctriton.errors import BaseMismatchError, FormatError
from lctriton.testing import assert_bit_exact

needs_compiled = pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler to build the CPU loops")


def _every_context() -> tuple[torch.Tensor, torch.Tensor]:
    """Moments reaching every context that can occur, with zeros, subnormals, inf and NaN."""
    octaves = torch.arange(-10, 10, dtype=torch.float32)
    m = torch.cat([torch.exp2(octaves), -torch.exp2(octaves), torch.tensor([0.0, -0.0, 1e-42, float("nan"), -float("inf")])])
    v = torch.ones_like(m)
    g = torch.Generator().manual_seed(0)
    m = torch.cat([m, torch.randn(50_000, generator=g) * 1e-3])
    v = torch.cat([v, torch.rand(50_000, generator=g) ** 3 * 1e-6])
    v[::97] = 0.0
    v[1::89] = float("inf")
    return m, v


def test_contexts_follow_the_stated_formula():
    # |m| / sqrt(v) = 2 -> octave 1; positive -> 16 + 1 + 8.
    assert reference.moment_contexts(torch.tensor([0.5]), torch.tensor([0.0625])).tolist() == [25]
    assert reference.moment_contexts(torch.tensor([-0.5]), torch.tensor([0.0625])).tolist() == [9]
    assert reference.moment_contexts(torch.tensor([0.0, -0.0]), torch.tensor([1.0, 1.0])).tolist() == [32, 32]
    # Far outside the octaves: clamped to the ends.
    assert reference.moment_contexts(torch.tensor([1e30, 1e-30]), torch.tensor([1.0, 1.0])).tolist() == [31, 16]
    m, v = _every_context()
    ctx = reference.moment_contexts(m, v)
    assert ctx.dtype == torch.uint8 and int(ctx.max()) < reference.NUM_CONTEXTS
    assert len(set(ctx.tolist())) == 2 * reference.CONTEXT_OCTAVES + 1  # zeros share one
    with pytest.raises(ValueError, match="as many elements"):
        reference.moment_contexts(m, v[:-1])
    with pytest.raises(TypeError, match="floating"):
        reference.moment_contexts(m.to(torch.int32), v)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_contexts_match_reference(dtype):
    m, v = _every_context()
    assert torch.equal(rans_cpu.moment_contexts(m.to(dtype), v.to(dtype)), reference.moment_contexts(m.to(dtype), v.to(dtype)))


def _grouping_input(n: int, runs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts from random moments, or in runs of 1 to 40 equal contexts (a parameter whose
    moments are mostly zero: the compiled loops move uniform blocks of eight at once), and
    random symbols."""
    g = torch.Generator().manual_seed(n)
    if runs:
        lengths = torch.randint(1, 41, (n // 10 + 8,), generator=g)  # about 2n elements
        values = torch.randint(0, reference.NUM_CONTEXTS, (lengths.numel(),), dtype=torch.uint8, generator=g)
        ctx = torch.repeat_interleave(values, lengths)[:n].contiguous()
    else:
        ctx = reference.moment_contexts(torch.randn(n, generator=g), torch.rand(n, generator=g))
    return ctx, torch.randint(0, 5, (n,), dtype=torch.uint8, generator=g)


@needs_compiled
@pytest.mark.parametrize("runs", [False, True], ids=["scattered", "runs"])
@pytest.mark.parametrize("n", [0, 1, 7, 97, 4096, 100_003])
def test_compiled_grouping_matches_reference(n, runs):
    ctx, sym = _grouping_input(n, runs)
    assert torch.equal(rans_cpu.context_counts(ctx), reference.context_counts(ctx))
    assert torch.equal(rans_cpu.context_histogram(ctx, sym, 5), reference.context_histogram(ctx, sym, 5))
    grouped = reference.group_by_context(ctx, sym)
    assert torch.equal(rans_cpu.group_by_context(ctx, sym), grouped)
    assert torch.equal(rans_cpu.ungroup_by_context(ctx, grouped), reference.ungroup_by_context(ctx, grouped))
    assert torch.equal(rans_cpu.ungroup_by_context(ctx, grouped), sym)
    # Grouped: contexts in increasing order, each run in index order (a stable sort).
    order = np.argsort(ctx.numpy(), kind="stable")
    assert torch.equal(grouped, sym[torch.from_numpy(order)])
    assert reference.context_counts(ctx).tolist() == np.bincount(ctx.numpy(), minlength=reference.NUM_CONTEXTS).tolist()


@needs_compiled
def test_compiled_context_stage_rejects_out_of_range_input():
    ctx = torch.tensor([0, 48], dtype=torch.uint8)
    sym = torch.tensor([0, 1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="below 48"):
        rans_cpu.context_histogram(ctx, sym, 2)
    with pytest.raises(ValueError, match="below 48"):
        rans_cpu.group_by_context(ctx, sym)
    with pytest.raises(ValueError, match="below 48"):
        rans_cpu.context_counts(ctx)
    with pytest.raises(ValueError, match="below 48"):
        rans_cpu.ungroup_by_context(ctx, sym)
    with pytest.raises(ValueError, match="not below 1"):
        rans_cpu.context_histogram(torch.zeros(2, dtype=torch.uint8), sym, 1)
    with pytest.raises(TypeError, match="uint8"):
        rans_cpu.group_by_context(ctx.long(), sym)
    with pytest.raises(ValueError, match="differ in length"):
        rans_cpu.group_by_context(ctx, sym[:1])


# --------------------------------------------------------------------------- parameter mapping


def _trained(model: torch.nn.Module, steps: int = 3, seed: int = 0) -> torch.optim.Optimizer:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _cnn() -> torch.nn.Module:
    # Batch-norm buffers have the shapes of its parameters: they must be passed over.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 36, 10),
    )


def test_parameter_moments_follow_the_optimizer_order_past_buffers():
    model = _cnn()
    opt = _trained(model)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    found = pipeline.parameter_moments(state)
    names = [n for n, _ in model.named_parameters()]
    assert found == {
        f"model.{n}": (f"optimizer.state.{i}.exp_avg", f"optimizer.state.{i}.exp_avg_sq") for i, n in enumerate(names)
    }
    # A parameter the optimizer has not stepped ends the matching; no model beside it, none.
    fresh = torch.optim.Adam(_cnn().parameters())
    assert pipeline.parameter_moments({"model": model.state_dict(), "optimizer": fresh.state_dict()}) == {}
    assert pipeline.parameter_moments({"optimizer": opt.state_dict()}) == {}
    assert pipeline.parameter_moments({"a": model.state_dict(), "b": model.state_dict(), "optimizer": opt.state_dict()}) == {}


# --------------------------------------------------------------------------- the codec


def _mlp_states(steps_between: int = 1):
    """Two full states of an MLP trained with Adam, ``steps_between`` steps apart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.randn(512, 64)
    target = torch.sin(data @ torch.randn(64, 64) / 8)

    def step(i):
        batch = slice((i * 32) % 512, (i * 32) % 512 + 32)
        loss = (model(data[batch]) - target[batch]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(30):
        step(i)
    first = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    for i in range(steps_between):
        step(30 + i)
    second = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    return first, second


def _weight_bytes(c) -> int:
    return sum(r["stored_nbytes"] for r in lctriton.inspect(c)["tensors"] if r["name"].startswith("model."))


def _codecs_of(c) -> dict[str, str]:
    return {r["name"]: r["codec"] for r in c.index["tensors"]}


@pytest.fixture(scope="module")
def states():
    first, second = _mlp_states()
    _, base = lctriton.compress(first, return_reconstruction=True)
    return second, base


def test_context_coding_is_chosen_where_it_pays_and_decodes_bit_exactly(states):
    second, base = states
    auto, recon = lctriton.compress(second, base=base, return_reconstruction=True)
    used = _codecs_of(auto)
    assert used["model.0.weight"] == used["model.2.weight"] == codecs.LC3
    restored = lctriton.decompress(auto.to_bytes(), base=base)
    for k, v in recon["model"].items():
        assert_bit_exact(restored["model"][k], v, k)
    plain = lctriton.compress(second, base=base, coder="rans")
    assert codecs.LC3 not in _codecs_of(plain).values()
    assert _weight_bytes(auto) < 0.8 * _weight_bytes(plain)
    # The reconstruction is the same whatever the coder: lc/3 changes only the coding.
    _, recon_plain = lctriton.compress(second, base=base, coder="rans", return_reconstruction=True)
    for k, v in recon_plain["model"].items():
        assert_bit_exact(recon["model"][k], v, k)
    assert codecs.LC3 not in _codecs_of(lctriton.compress(second, base=base, coder="huffman")).values()


def test_context_record_names_the_base_moments(states):
    second, base = states
    c = lctriton.compress(second, base=base, coder="context")
    rec = next(r for r in c.index["tensors"] if r["name"] == "model.0.weight")
    assert rec["codec"] == codecs.LC3
    assert [ref["name"] for ref in rec["context"]] == ["optimizer.state.0.exp_avg", "optimizer.state.0.exp_avg_sq"]
    assert rec["context"][0]["base"] == f"{reference.fingerprint(base['optimizer']['state'][0]['exp_avg']):016x}"
    assert len(rec["tables"]) == codecs.NUM_CONTEXTS
    assert sum(t["count"] for t in rec["tables"]) == second["model"]["0.weight"].numel()


@pytest.mark.parametrize("threads", ["1", "2"])
def test_each_base_tensor_is_fingerprinted_once_per_encode_and_decode(states, monkeypatch, threads):
    """A base moment is its own record's base and a context of its parameter's lc/3 record:
    encode and decode each fingerprint it once (decode on the coding threads, with 2)."""
    from lctriton import backend

    monkeypatch.setenv("LCTRITON_THREADS", threads)
    second, base = states
    seen = []
    real = backend.fingerprint
    monkeypatch.setattr(backend, "fingerprint", lambda t: seen.append(t.data_ptr()) or real(t))
    c = lctriton.compress(second, base=base, coder="context")
    named = {r["name"] for r in c.index["tensors"] if r.get("base") is not None}
    named |= {ref["name"] for r in c.index["tensors"] for ref in r.get("context") or ()}
    assert any(r["codec"] == codecs.LC3 for r in c.index["tensors"])
    assert sorted(seen) == sorted(set(seen)) and len(seen) == len(named)
    seen.clear()
    lctriton.decompress(c.to_bytes(), base=base)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == len(named)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("pair, codec", [("states", codecs.LC3), ("binade_states", codecs.LQ2)])
def test_decode_computes_each_records_contexts_once(request, monkeypatch, threads, pair, codec):
    """With 2 threads the contexts and their counts are computed ahead on the coding threads,
    with 1 in the checks; either way once per lc/3 or lq/2 record, and to the same tensors."""
    from lctriton import backend

    monkeypatch.setenv("LCTRITON_THREADS", threads)
    second, base = request.getfixturevalue(pair)
    c = lctriton.compress(second, base=base, coder="context")
    context_records = [r for r in c.index["tensors"] if r["codec"] in codecs.CONTEXT_CODECS]
    assert codec in {r["codec"] for r in context_records}
    calls = []
    for fn in ("moment_contexts", "binade_contexts", "context_counts"):
        real = getattr(backend, fn)

        def counted(*args, _fn=fn, _real=real):
            calls.append((_fn, threading.current_thread() is threading.main_thread()))
            return _real(*args)

        monkeypatch.setattr(backend, fn, counted)
    restored = lctriton.decompress(c.to_bytes(), base=base)
    names = [fn for fn, _ in calls]
    assert names.count("context_counts") == len(context_records)
    assert names.count("moment_contexts") + names.count("binade_contexts") == len(context_records)
    assert all(in_main == (threads == "1") for _, in_main in calls)
    monkeypatch.undo()
    monkeypatch.setenv("LCTRITON_THREADS", "1")  # computed in the checks, for comparison
    again = lctriton.decompress(c.to_bytes(), base=base)
    for k, v in lctriton.pipeline.flatten_tensors(again).items():
        assert_bit_exact(lctriton.pipeline.flatten_tensors(restored)[k], v, k)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_decode_errors_come_in_record_order_with_work_done_ahead(states, monkeypatch, threads):
    """A wrong base on an early record and a changed moment behind a later lc/3 record: the
    early record's error is the one raised, whether the contexts were computed ahead or not."""
    monkeypatch.setenv("LCTRITON_THREADS", threads)
    second, base = states
    c = lctriton.compress(second, base=base, coder="context")
    names = [r["name"] for r in c.index["tensors"]]
    lc3 = [r["name"] for r in c.index["tensors"] if r["codec"] == codecs.LC3]
    first = next(r["name"] for r in c.index["tensors"] if r.get("base") is not None)
    assert names.index(first) < names.index(lc3[-1])
    broken = copy.deepcopy(base)
    flat = pipeline.flatten_tensors(broken)
    flat[first].view(-1)[0] += 1  # the first record's base no longer matches its fingerprint
    rec = next(r for r in c.index["tensors"] if r["name"] == lc3[-1])
    flat[rec["context"][1]["name"]].mul_(4)  # and a later lc/3 record's contexts change
    with pytest.raises(BaseMismatchError, match=repr(first)):
        lctriton.decompress(c.to_bytes(), base=broken)


def test_context_decode_needs_the_same_base_moments(states):
    second, base = states
    data = lctriton.compress(second, base=base).to_bytes()
    weights_only = {"model": base["model"]}
    with pytest.raises(BaseMismatchError, match="optimizer moment 'optimizer.state.0.exp_avg'"):
        lctriton.decompress(data, base={**weights_only, "optimizer": {**base["optimizer"], "state": {}}})
    changed = copy.deepcopy(base)
    changed["optimizer"]["state"][0]["exp_avg_sq"][0, 0] *= 2
    with pytest.raises(BaseMismatchError, match="exp_avg_sq"):
        lctriton.decompress(data, base=changed)


def test_context_tables_that_do_not_fit_the_moments_are_a_format_error(states):
    second, base = states
    c = lctriton.compress(second, base=base)
    rec = next(r for r in c.index["tensors"] if r["codec"] == codecs.LC3)
    used = [t for t in rec["tables"] if t["count"]]
    used[0]["count"] += 1
    used[1]["count"] -= 1  # the same total, another split
    with pytest.raises(FormatError):
        lctriton.decompress(c.to_bytes(), base=base)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda r: r.update(context=[r["context"][0]]), "two"),
        (lambda r: r["context"][0].update(base="xyz"), "two"),
        (lambda r: r.update(tables=r["tables"][:-1]), "48 context tables"),
        (lambda r: r["tables"][0].update(count=-1), "count"),
        (lambda r: next(t for t in r["tables"] if "freqs" in t).update(words=None), "words"),
        (lambda r: next(t for t in r["tables"] if "freqs" in t)["freqs"].append(1), "freqs"),
        (lambda r: next(t for t in r["tables"] if t["count"] == 0).update(fill=0), "only its count"),
        (lambda r: r.update(base=None), "'base' must name one"),
    ],
)
def test_bad_context_records_are_rejected(states, mutate, pattern):
    second, base = states
    c = lctriton.compress(second, base=base)
    rec = next(r for r in c.index["tensors"] if r["codec"] == codecs.LC3)
    mutate(rec)
    with pytest.raises(FormatError, match=pattern):
        lctriton.decompress(c.to_bytes(), base=base)


def test_coder_option_accepts_context():
    with pytest.raises(ValueError, match="coder must be one of auto, huffman, rans, context"):
        lctriton.compress({"w": torch.ones(3)}, coder="ctx")


# --------------------------------------------------------------------------- lq/2


def test_binade_contexts_follow_the_stated_formula():
    base = torch.tensor([1.0, 2.0, 0.5, -4.0, 0.0, -0.0, 1e-40, 2.0**100, 2.0**-100, float("inf"), float("nan")])
    # Exponent field of 1.0 is 127: offset 127 maps it to context 8.
    assert reference.binade_contexts(base, 127).tolist() == [8, 9, 7, 10, 0, 0, 0, 15, 1, 15, 15]
    assert reference.binade_contexts(base, 0).tolist()[:4] == [15, 15, 15, 15]
    with pytest.raises(ValueError, match="offset"):
        reference.binade_contexts(base, 256)
    with pytest.raises(ValueError, match="offset"):
        reference.binade_contexts(base, True)
    with pytest.raises(TypeError, match="floating"):
        reference.binade_contexts(base.to(torch.int32), 127)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [0, 100, 127, 255])
def test_compiled_binade_contexts_match_reference(dtype, offset):
    m, v = _every_context()
    for base in (m.to(dtype), v.to(dtype)):
        assert torch.equal(rans_cpu.binade_contexts(base, offset), reference.binade_contexts(base, offset))
    with pytest.raises(ValueError, match="offset"):
        rans_cpu.binade_contexts(v, -1)


def _moment_codecs(c) -> dict[str, str]:
    return {k: v for k, v in _codecs_of(c).items() if k.endswith(("exp_avg", "exp_avg_sq"))}


@pytest.fixture(scope="module")
def binade_states():
    """Adam-like moments of 200k elements: a second moment over 20 binades that keeps most of
    its base's binade (lq/2 pays), and a first moment whose base is one binade of noise
    (lq/2 cannot pay)."""
    g = torch.Generator().manual_seed(5)
    n = 200_000
    base_v = torch.exp2(-torch.randint(10, 30, (n,), generator=g).float()) * (1 + torch.rand(n, generator=g))
    v = base_v * torch.exp2(torch.randint(-1, 2, (n,), generator=g).float() * (torch.rand(n, generator=g) < 0.3))
    base_m = torch.rand(n, generator=g) + 1.0
    m = torch.randn(n, generator=g)
    state = {"opt": {"state": {0: {"exp_avg_sq": v, "exp_avg": m}}}}
    base = {"opt": {"state": {0: {"exp_avg_sq": base_v, "exp_avg": base_m}}}}
    return state, base


def test_binade_coding_is_chosen_where_it_pays(binade_states):
    state, base = binade_states
    used = _moment_codecs(lctriton.compress(state, base=base, coder="context", moments="log"))
    assert used == {"opt.state.0.exp_avg_sq": codecs.LQ2, "opt.state.0.exp_avg": codecs.LQ}
    # The default coder decides the same way; Huffman and plain rANS keep lq/1.
    assert _moment_codecs(lctriton.compress(state, base=base, moments="log")) == used
    for coder in ("huffman", "rans"):
        assert set(_moment_codecs(lctriton.compress(state, base=base, moments="log", coder=coder)).values()) == {codecs.LQ}
    # By default the first moment is scaled (its second moment is beside it), and with
    # coder="context" grouped by the base's moments (sq/2); the second moment is still lq/2
    # where that pays.
    used = _moment_codecs(lctriton.compress(state, base=base, coder="context"))
    assert used == {"opt.state.0.exp_avg_sq": codecs.LQ2, "opt.state.0.exp_avg": codecs.SQ2}


def test_binade_coding_changes_no_value_and_decodes_bit_exactly(binade_states):
    second, base = binade_states
    ctx, recon = lctriton.compress(second, base=base, coder="context", return_reconstruction=True)
    used = _moment_codecs(ctx)
    assert codecs.LQ2 in used.values()
    plain, recon_plain = lctriton.compress(second, base=base, coder="rans", return_reconstruction=True)
    flat, flat_plain = pipeline.flatten_tensors(recon), pipeline.flatten_tensors(recon_plain)
    for name in used:
        assert_bit_exact(flat[name], flat_plain[name], name)  # lq/2 changes only the coding
    restored = pipeline.flatten_tensors(lctriton.decompress(ctx.to_bytes(), base=base))
    for name in used:
        assert_bit_exact(restored[name], flat[name], name)

    def lq2_bytes(c):
        return sum(r["stored_nbytes"] for r in lctriton.inspect(c)["tensors"] if used.get(r["name"]) == codecs.LQ2)

    assert lq2_bytes(ctx) < (1 - codecs.CONTEXT_MIN_SAVING) * lq2_bytes(plain)


def test_binade_contexts_that_do_not_fit_the_base_are_a_format_error(binade_states):
    second, base = binade_states
    c = lctriton.compress(second, base=base, coder="context")
    rec = next(r for r in c.index["tensors"] if r["codec"] == codecs.LQ2)
    rec["offset"] += 1  # the same base, other contexts: the tables no longer count them
    with pytest.raises(FormatError, match="context tables do not count"):
        lctriton.decompress(c.to_bytes(), base=base)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda r: r.update(offset=256), "offset"),
        (lambda r: r.update(offset=None), "offset"),
        (lambda r: r.update(tables=r["tables"][:-1]), "16 context tables"),
        (lambda r: r.update(scale=0), "scale"),
        (lambda r: r.update(precision=9), "precision"),
        (lambda r: next(t for t in r["tables"] if "freqs" in t)["freqs"].append(1), "freqs"),
        (lambda r: r.update(base=None), "'base' must name one"),
    ],
)
def test_bad_binade_records_are_rejected(binade_states, mutate, pattern):
    second, base = binade_states
    c = lctriton.compress(second, base=base, coder="context")
    rec = next(r for r in c.index["tensors"] if r["codec"] == codecs.LQ2)
    mutate(rec)
    with pytest.raises(FormatError, match=pattern):
        lctriton.decompress(c.to_bytes(), base=base)


@pytest.mark.gpu
def test_gpu_context_stage_matches_cpu():
    m, v = _every_context()
    g = torch.Generator().manual_seed(1)
    m = torch.cat([m, torch.randn(3_000_000, generator=g) * 1e-3])
    v = torch.cat([v, torch.rand(3_000_000, generator=g) * 1e-6])
    ctx = reference.moment_contexts(m, v)
    assert torch.equal(reference.moment_contexts(m.cuda(), v.cuda()).cpu(), ctx)
    sym = torch.randint(0, 7, (ctx.numel(),), dtype=torch.uint8, generator=g)
    grouped = reference.group_by_context(ctx, sym)
    assert torch.equal(reference.group_by_context(ctx.cuda(), sym.cuda()).cpu(), grouped)
    assert torch.equal(reference.ungroup_by_context(ctx.cuda(), grouped.cuda()).cpu(), sym)
    assert torch.equal(reference.context_histogram(ctx.cuda(), sym.cuda(), 7).cpu(), reference.context_histogram(ctx, sym, 7))
    assert torch.equal(reference.context_counts(ctx.cuda()).cpu(), reference.context_counts(ctx))
    for offset in (0, 110, 255):
        assert torch.equal(reference.binade_contexts(v.cuda(), offset).cpu(), reference.binade_contexts(v, offset))
