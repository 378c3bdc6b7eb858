"""Every Triton launcher against its reference twin, byte for byte.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small sizes: 0, 1, a prime, a chunk +- 1, several chunks, a
non-contiguous view, special values. The ``gpu`` tests repeat them at large sizes on CUDA.
"""

import re

import numpy as np
import pytest
import torch
from lctriton.kernels import decode, encode, histogram, reference, triton_codec

import lctriton
from lctriton import backend, codecs, huffman
from lctriton.testing import assert_bit_exact, special_values

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 1031, 4095, 4097, 3 * 4096 + 5]


def _pair(n, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    x = base + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3 * (torch.rand(n, generator=g) < 0.7)
    return x.to(dtype).to(device), base.to(dtype).to(device)


def _tables(x, base, bits=3):
    plan = codecs.plan_buckets(reference.lc_histogram(x.cpu(), None if base is None else base.cpu()).numpy(), bits)
    lengths = huffman.code_lengths(plan.symbol_counts)
    return (torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives),
            torch.from_numpy(lengths), plan)


def _special(dtype, n=4096 + 3):
    sv = special_values(dtype)
    x = sv.repeat(n // sv.numel() + 1)[:n]
    return x, torch.roll(x, 5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_base", [True, False])
def test_histogram_matches_reference(dtype, n, with_base):
    x, base = _pair(n, dtype, seed=n)
    b = base if with_base else None
    assert torch.equal(histogram.lc_histogram(x, b), reference.lc_histogram(x, b))


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n, dtype", [(12_345, torch.float32), (5000, torch.float32), (10_000, torch.float16)])
def test_histogram_counts_large_tensors_in_segments(monkeypatch, with_base, n, dtype):
    # Tensors of more than 2**30 elements are counted one int32 table per segment; a small
    # segment takes that path: a shorter last segment, exactly one segment, exactly two.
    monkeypatch.setattr(histogram, "_SEGMENT", 5000)
    x, base = _pair(n, dtype, seed=3)
    b = base if with_base else None
    assert torch.equal(histogram.lc_histogram(x, b), reference.lc_histogram(x, b))


@pytest.mark.gpu
def test_gpu_histogram_segments_match_reference(monkeypatch):
    monkeypatch.setattr(histogram, "_SEGMENT", 1 << 20)
    x, base = _pair(3 * (1 << 20) + 12_345, torch.float32, seed=4)
    assert torch.equal(histogram.lc_histogram(x.cuda(), base.cuda()).cpu(), reference.lc_histogram(x, base))


_HISTOGRAM_LOWERING = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lctriton.kernels import histogram

ptr, kind = sys.argv[1], int(sys.argv[2])
sig = {"x_ptr": ptr, "base_ptr": ptr, "hist_ptr": "*i32", "n": "i32", "HAS_BASE": "constexpr",
       "KIND": "constexpr", "BLOCK": "constexpr"}
src = ASTSource(fn=histogram._lc_histogram_kernel, signature=sig,
                constexprs={"HAS_BASE": True, "KIND": kind, "BLOCK": histogram._BLOCK})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"])
"""


@pytest.mark.parametrize("ptr, kind", [("*fp32", 0), ("*fp64", 1), ("*bf16", 3)])
def test_histogram_lowers_for_a_gpu_to_relaxed_reductions(ptr, kind):
    """Compile pass 1 for an sm_90 GPU without one, in a process without the interpreter: it
    must lower, and count with fire-and-forget reductions (``red``), not atomics that return."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HISTOGRAM_LOWERING, ptr, str(kind)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and ("No such file" in done.stderr or "not found" in done.stderr):
        pytest.skip(f"this Triton has no CUDA toolchain here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"red\.global\.gpu\.relaxed\.add\.u32", done.stdout)
    assert "atom." not in done.stdout


@pytest.mark.parametrize("dtype", FLOATS)
def test_histogram_special_values_and_views(dtype):
    x, base = _special(dtype)
    assert torch.equal(histogram.lc_histogram(x, base), reference.lc_histogram(x, base))
    xv, bv = x[: 64 * 60].view(64, 60).t(), base[: 64 * 60].view(64, 60).t()
    assert torch.equal(histogram.lc_histogram(xv, bv), reference.lc_histogram(xv, bv))


def _assert_encode_equal(x, base, bits=3, chunk=4096):
    lut, reps, lengths, _ = _tables(x, base, bits)
    got = encode.lc_encode(x, base, lut, reps, lengths, chunk)
    want = reference.lc_encode(x, base, lut, reps, lengths, chunk)
    assert torch.equal(got[0].cpu(), want[0]), "stream words"
    assert torch.equal(got[1].cpu(), want[1]), "chunk bits"
    assert_bit_exact(got[2].cpu(), want[2], "reconstruction")
    assert got[3] == want[3], "non-finite flag"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_encode_matches_reference(dtype, n):
    x, base = _pair(n, dtype, seed=n)
    _assert_encode_equal(x, base)


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
@pytest.mark.parametrize("chunk", [64, 128, 4096])
def test_encode_widths_and_chunks(bits, chunk):
    x, base = _pair(3000, torch.float32, seed=bits)
    _assert_encode_equal(x, base, bits, chunk)


@pytest.mark.parametrize("dtype", FLOATS)
def test_encode_special_values_no_base_and_views(dtype):
    x, base = _special(dtype)
    _assert_encode_equal(x, base)
    _assert_encode_equal(x, None)
    xv, bv = x[: 64 * 60].view(64, 60).t(), base[: 64 * 60].view(64, 60).t()
    _assert_encode_equal(xv, bv)


def test_encode_fill_has_no_stream():
    x = torch.randn(5000)
    _assert_encode_equal(x, x.clone())
    lut, reps, lengths, _ = _tables(x, x)
    assert not lengths.any() and encode.lc_encode(x, x, lut, reps, lengths, 4096)[0].numel() == 0


def _streams(x, base, bits=3, chunk=64):
    lut, reps, lengths, plan = _tables(x, base, bits)
    stream, chunk_bits, _, _ = reference.lc_encode(x, base, lut, reps, lengths, chunk)
    used = np.flatnonzero(plan.symbol_counts)
    fill = None if lengths.any() else (int(used[0]) if used.size else 0)
    return reference.LcStream(stream, chunk_bits, x.numel(), lengths.numpy(), fill, reps,
                              None if base is None else base.reshape(-1), x.dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 97, 64 * 3 + 1, 1031])
@pytest.mark.parametrize("with_base", [True, False])
def test_decode_matches_reference(dtype, n, with_base):
    x, base = _pair(n, dtype, seed=n)
    item = _streams(x, base if with_base else None)
    (got,) = decode.lc_decode([item], 64)
    (want,) = reference.lc_decode([item], 64)
    assert_bit_exact(got, want)


@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_special_values_and_fill(dtype):
    x, base = _special(dtype, n=700)
    item = _streams(x, base)
    assert_bit_exact(decode.lc_decode([item], 64)[0], reference.lc_decode([item], 64)[0])
    fill = _streams(x, x.clone())
    assert fill.fill_symbol is not None
    assert_bit_exact(decode.lc_decode([fill], 64)[0], reference.lc_decode([fill], 64)[0])


def test_decode_large_chunk():
    x, base = _pair(4096 + 7, torch.float32)
    item = _streams(x, base, chunk=4096)
    assert_bit_exact(decode.lc_decode([item], 4096)[0], reference.lc_decode([item], 4096)[0])


def test_decode_detects_a_corrupt_stream():
    x, base = _pair(1000, torch.float32)
    item = _streams(x, base)
    item.stream = torch.full_like(item.stream, -1)  # all ones: every code parses to another length
    with pytest.raises(ValueError, match="recorded bit length"):
        decode.lc_decode([item], 64)
    with pytest.raises(ValueError, match="recorded bit length"):
        reference.lc_decode([item], 64)


def test_launchers_validate_arguments():
    x = torch.randn(100)
    lut = torch.zeros(reference.NUM_FINE_KEYS, dtype=torch.uint8)
    reps, lengths = torch.zeros(2), torch.tensor([1, 1], dtype=torch.uint8)
    for launcher in (histogram.lc_histogram,):
        with pytest.raises(TypeError, match="x must be a tensor"):
            launcher([1.0], None)
        with pytest.raises(TypeError, match="x must be float32"):
            launcher(torch.arange(3), None)
        with pytest.raises(TypeError, match="base must be a tensor"):
            launcher(x, [1.0])
        with pytest.raises(ValueError, match="base must match"):
            launcher(x, torch.randn(99))
    with pytest.raises(TypeError, match="x must be a tensor"):
        encode.lc_encode([1.0], None, lut, reps, lengths, 64)
    with pytest.raises(TypeError, match="x must be float32"):
        encode.lc_encode(torch.arange(3), None, lut, reps, lengths, 64)
    with pytest.raises(TypeError, match="base must be a tensor"):
        encode.lc_encode(x, [1.0], lut, reps, lengths, 64)
    with pytest.raises(ValueError, match="base must match"):
        encode.lc_encode(x, x.double(), lut, reps, lengths, 64)
    with pytest.raises(ValueError, match="chunk_symbols"):
        encode.lc_encode(x, None, lut, reps, lengths, 100)
    with pytest.raises(ValueError, match="key_to_symbol"):
        encode.lc_encode(x, None, lut[:5], reps, lengths, 64)
    with pytest.raises(ValueError, match="code_lengths"):
        encode.lc_encode(x, None, lut, reps, lengths[:1], 64)
    item = _streams(*_pair(200, torch.float32))
    with pytest.raises(ValueError, match="chunk_symbols"):
        decode.lc_decode([item], 96)
    bad = reference.LcStream(item.stream, item.chunk_bits, 200, item.code_lengths, None, item.representatives,
                             torch.zeros(199), torch.float32)
    with pytest.raises(ValueError, match="base has 199 elements"):
        decode.lc_decode([bad], 64)
    wrong = reference.LcStream(item.stream, item.chunk_bits, 200, item.code_lengths, None, item.representatives,
                               None, torch.int32)
    with pytest.raises(TypeError, match="item dtype"):
        decode.lc_decode([wrong], 64)


def test_launchers_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    item = _streams(*_pair(200, torch.float32))
    lut, reps, lengths, _ = _tables(*_pair(200, torch.float32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x is on cpu.*CUDA tensor or TRITON_INTERPRET=1"):
        histogram.lc_histogram(torch.randn(10), None)
    with pytest.raises(ValueError, match="x is on cpu"):
        encode.lc_encode(torch.randn(10), None, lut, reps, lengths, 64)
    with pytest.raises(ValueError, match="decode device is on cpu"):
        decode.lc_decode([item], 64)


def _every_codec_state(n, device="cpu"):
    """A state and base that use every codec, coded with each of :data:`EVERY_CODEC_CODERS`:
    lc/1 (dense delta), lc/2 (a sparse delta), lc/3 (an Adam-like delta, against the sign
    and size of the base's first moment), lq/1 and lq/2 (Adam moments; lq/2 for the second
    moment, whose bins follow its base's binades, with ``coder="context"``), bp/1 (integers)
    and raw/1 (a tiny tensor)."""
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(n, generator=g)
    sparse = torch.randn(n, generator=g)
    v = torch.rand(n, generator=g) * 1e-6
    m = torch.randn(n, generator=g) * 1e-3
    w = torch.randn(n, generator=g)
    m_w = torch.randn(n, generator=g) * 1e-3
    v_w = torch.full((n,), 1e-6)
    step = torch.where(m_w > 0, -1e-3, 1e-3) * (m_w.abs() / 1e-3).clamp(0.25, 4)  # Adam: -lr * m / sqrt(v)
    groups = [{"params": [0, 1], "betas": (0.9, 0.999), "lr": 1e-3}]
    state = {
        "model": {"a": dense, "w": w + step, "b": torch.randn(40, 50, generator=g).to(torch.bfloat16), "emb": sparse,
                  "i": torch.arange(5), "ids": torch.randint(0, 1000, (n,), generator=g)},
        "opt": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": m, "exp_avg_sq": v},
                          1: {"step": torch.tensor(12.0), "exp_avg": m_w * 0.9, "exp_avg_sq": v_w}},
                "param_groups": groups},
    }
    base = {
        "model": {"a": dense + 0.01 * torch.randn(n, generator=g), "w": w,
                  "b": (state["model"]["b"].float() + 0.01 * torch.randn(40, 50, generator=g)).to(torch.bfloat16),
                  "emb": sparse + (torch.rand(n, generator=g) < 0.02) * torch.randn(n, generator=g) * 1e-2,
                  "i": torch.arange(5), "ids": state["model"]["ids"].clone()},
        "opt": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": m * 1.2, "exp_avg_sq": v * 1.001},
                          1: {"step": torch.tensor(10.0), "exp_avg": m_w, "exp_avg_sq": v_w}},
                "param_groups": groups},
    }
    base["model"]["ids"][::7] += 1
    return _to(state, device), _to(base, device)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


#: The coders :func:`_every_codec_state` is coded with: together they use every codec.
EVERY_CODEC_CODERS = ("auto", "context", "huffman")


def test_backend_files_are_identical_both_ways(monkeypatch):
    """A file written by the kernels decodes with the reference and the reverse."""
    state, base = _every_codec_state(3000)
    used = set()
    for coder in EVERY_CODEC_CODERS:
        monkeypatch.setenv(backend.BACKEND_ENV, "reference")
        ref_bytes = lctriton.compress(state, base=base, chunk_symbols=64, coder=coder).to_bytes()
        used |= {r["codec"] for r in lctriton.inspect(ref_bytes)["tensors"]}
        monkeypatch.setenv(backend.BACKEND_ENV, "triton")
        assert backend.choose("cpu") is triton_codec
        tri_bytes = lctriton.compress(state, base=base, chunk_symbols=64, coder=coder).to_bytes()
        assert tri_bytes == ref_bytes, coder
        from_triton = lctriton.decompress(ref_bytes, base=base)
        monkeypatch.setenv(backend.BACKEND_ENV, "reference")
        from_reference = lctriton.decompress(tri_bytes, base=base)
        flat_t, flat_r = lctriton.pipeline.flatten_tensors(from_triton), lctriton.pipeline.flatten_tensors(from_reference)
        for k in flat_r:
            assert_bit_exact(flat_t[k], flat_r[k], f"{coder}: {k}")
    assert used == set(codecs.ALL_CODECS)


#: Pointer types of a kernel signature, by the dtype of the tensor passed.
_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16",
                  torch.bfloat16: "*bf16", torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16",
                  torch.uint16: "*u16", torch.int32: "*i32", torch.uint32: "*u32", torch.int64: "*i64",
                  torch.uint64: "*u64", torch.bool: "*i1"}

_LOWER_LAUNCHES = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs = {}, {}
    for param in fn.params:
        value = launch["args"][param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, dict):
            signature[param.name] = value["pointer"]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
    try:
        ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32), options=launch["options"]).asm["ptx"]
    except Exception as exc:
        print(f"{launch['module']}.{launch['kernel']} {constexprs}: {exc}", file=sys.stderr)
        raise
    atomics = sorted(set(re.findall(r"(?:atom|red)\.global\.[\w.]+", ptx)))
    print(json.dumps([f"{launch['module']}.{launch['kernel']}", atomics]))
"""


def test_every_codec_kernel_launch_lowers_for_a_gpu(monkeypatch):
    """Every distinct launch the codec makes (kernel, argument types, constexprs) while coding
    and decoding files of every codec and dtype, compiled for an sm_90 GPU without one, in a
    process without the interpreter: what would break on a GPU with this Triton shows here."""
    import json
    import os
    import subprocess
    import sys

    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args, strict=False))
        values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        record = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "args": {k: {"pointer": _POINTER_TYPES[v.dtype]} if isinstance(v, torch.Tensor) else v
                     for k, v in values.items()},
            "options": {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")},
        }
        # Runtime integers only matter by width: one entry per width, not per value. The
        # kernels name their constexprs in capitals; those keep their values in the key.
        key = json.dumps({**record, "args": {k: (v if isinstance(v, (dict, bool, float)) or k.isupper()
                                                 else -2**31 <= v < 2**31) for k, v in record["args"].items()}},
                         sort_keys=True, default=str)
        launches.setdefault(key, record)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    state, base = _every_codec_state(3000)
    for dtype in (torch.float64, torch.float16):
        x, b = _pair(5000, dtype, seed=1)
        state["model"][f"x_{dtype}"], base["model"][f"x_{dtype}"] = x, b
    # A delta of one value everywhere: a fill, decoded without a stream.
    state["model"]["fill"], base["model"]["fill"] = torch.full((5000,), 0.5), torch.full((5000,), 0.25)
    for coder in EVERY_CODEC_CODERS:
        blob = lctriton.compress(state, base=base, chunk_symbols=64, coder=coder).to_bytes()
        lctriton.decompress(blob, base=base)
    kernels = {(r["module"], r["kernel"]) for r in launches.values()}
    assert len(kernels) == 11, sorted(kernels)  # histogram, encode (2), decode (3), lq (2), rans (3)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _LOWER_LAUNCHES], input=json.dumps(list(launches.values())),
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and ("No such file" in done.stderr or "not found" in done.stderr):
        pytest.skip(f"this Triton has no CUDA toolchain here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(compiled) == len(launches)
    # Global atomics only accumulate (counts, stream bits) that nothing reads before the
    # kernel ends: they must be relaxed reductions, without acquire-release fences.
    for name, atomics in compiled:
        assert all(a.startswith("red.global.gpu.relaxed.") for a in atomics), (name, atomics)
    assert any(atomics for _, atomics in compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_large_tensors_match_reference(dtype):
    x, base = _pair(10_000_019, dtype, seed=7)
    xc, bc = x.cuda(), base.cuda()
    assert torch.equal(histogram.lc_histogram(xc, bc).cpu(), reference.lc_histogram(x, base))
    lut, reps, lengths, plan = _tables(x, base)
    got = encode.lc_encode(xc, bc, lut, reps, lengths, 4096)
    want = reference.lc_encode(x, base, lut, reps, lengths, 4096)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert_bit_exact(got[2].cpu(), want[2])
    item = reference.LcStream(want[0], want[1], x.numel(), lengths.numpy(), None, reps, bc, dtype)
    assert_bit_exact(decode.lc_decode([item], 4096)[0].cpu(), want[2])


@pytest.mark.gpu
@pytest.mark.parametrize("coder", EVERY_CODEC_CODERS)
def test_gpu_files_of_every_codec_match_cpu(coder):
    state, base = _every_codec_state(3_000_000)
    cpu_bytes = lctriton.compress(state, base=base, coder=coder).to_bytes()
    gstate, gbase = _every_codec_state(3_000_000, "cuda")
    gpu_bytes = lctriton.compress(gstate, base=gbase, coder=coder).to_bytes()
    assert gpu_bytes == cpu_bytes
    from_gpu = lctriton.pipeline.flatten_tensors(lctriton.decompress(cpu_bytes, base=gbase))
    from_cpu = lctriton.pipeline.flatten_tensors(lctriton.decompress(cpu_bytes, base=base))
    for k, v in from_cpu.items():
        assert_bit_exact(from_gpu[k].cpu(), v, k)


@pytest.mark.gpu
def test_gpu_files_load_on_cpu_and_back():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4_000_000, generator=g)}
    base = {"w": state["w"] + torch.randn(4_000_000, generator=g) * 1e-3}
    cpu_bytes = lctriton.compress(state, base=base).to_bytes()
    gpu_state = {k: v.cuda() for k, v in state.items()}
    gpu_base = {k: v.cuda() for k, v in base.items()}
    gpu_bytes = lctriton.compress(gpu_state, base=gpu_base).to_bytes()
    assert gpu_bytes == cpu_bytes
    assert_bit_exact(lctriton.decompress(gpu_bytes, base=gpu_base)["w"].cpu(),
                     lctriton.decompress(cpu_bytes, base=base)["w"])


# --------------------------------------------------------------------------- rANS-coded codecs

from lctriton.kernels import logquant, rans_cpu  # noqa: E402

#: lq/1's twins of the reference: the Triton kernels and, where it builds, the compiled CPU pass.
LQ_TWINS = [logquant] + ([rans_cpu] if rans_cpu.available() else [])


def _moment_pair(n, dtype, seed=0):
    """A second-moment-like pair: positive values over many octaves, a decayed base, zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 4 - 20)
    base[torch.rand(n, generator=g) < 0.2] = 0
    touched = torch.rand(n, generator=g) < 0.4
    x = base * 0.999 + touched * torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 4 - 20)
    return x.to(dtype), base.to(dtype)


def _assert_same(got, want, what):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(g, torch.Tensor):
            assert_bit_exact(g.cpu(), w.cpu(), what)
        else:
            assert g == w, what


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 1031, 3 * 1024 + 5])
@pytest.mark.parametrize("with_base", [True, False])
def test_lq_symbols_and_reconstruct_match_reference(dtype, n, with_base):
    x, base = _moment_pair(n, dtype, seed=n)
    b = base if with_base else None
    plan = codecs.plan_log_buckets(reference.lc_histogram(x, None).numpy(), 1)
    lut, reps = torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives)
    want = reference.lq_symbols(x, b, 0.999, lut, reps)
    for twin in LQ_TWINS:
        _assert_same(twin.lq_symbols(x, b, 0.999, lut, reps), want, f"{twin.__name__}.lq_symbols")
        _assert_same(
            [twin.lq_reconstruct(want[0], reps, b, 0.999, dtype)],
            [reference.lq_reconstruct(want[0], reps, b, 0.999, dtype)],
            f"{twin.__name__}.lq_reconstruct",
        )
    # The decoder restores exactly what the encoder reconstructed.
    assert_bit_exact(reference.lq_reconstruct(want[0], reps, b, 0.999, dtype), want[1], "lq round trip")


@pytest.mark.parametrize("dtype", FLOATS)
def test_lq_special_values(dtype):
    x, base = _special(dtype)
    plan = codecs.plan_log_buckets(reference.lc_histogram(x, None).numpy(), 2)
    lut, reps = torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives)
    for scale in (1.0, 0.9, 0.5):
        want = reference.lq_symbols(x, base, scale, lut, reps)
        for twin in LQ_TWINS:
            _assert_same(twin.lq_symbols(x, base, scale, lut, reps), want, f"{twin.__name__} lq special")
            _assert_same(
                [twin.lq_reconstruct(want[0], reps, base, scale, dtype)],
                [reference.lq_reconstruct(want[0], reps, base, scale, dtype)],
                f"{twin.__name__} lq special reconstruct",
            )


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_base", [True, False])
def test_lc_symbols_and_reconstruct_match_reference(dtype, with_base):
    x, base = _pair(3 * 1024 + 7, dtype, seed=3)
    b = base if with_base else None
    lut, reps, _, _ = _tables(x, b)
    want = reference.lc_symbols(x, b, lut, reps)
    _assert_same(encode.lc_symbols(x, b, lut, reps), want, "lc_symbols")
    got = decode.lc_reconstruct(want[0], reps, b, dtype)
    assert_bit_exact(got, reference.lc_reconstruct(want[0], reps, b, dtype), "lc_reconstruct")
    assert_bit_exact(got, want[1], "lc_symbols reconstruction")
    for twin in LQ_TWINS[1:]:  # the compiled CPU pass
        _assert_same(twin.lc_symbols(x, b, lut, reps), want, f"{twin.__name__}.lc_symbols")
        assert_bit_exact(twin.lc_reconstruct(want[0], reps, b, dtype), want[1], f"{twin.__name__}.lc_reconstruct")


@pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler to build the CPU loops")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_base", [True, False])
def test_compiled_lc_pass_matches_reference_on_special_values(dtype, with_base):
    """Infinities, NaNs (a NaN base makes symbol 0 copy the base), signed zeros,
    subnormals, past the reference's block size; and a representative table shorter than
    the symbols (a clipped take)."""
    x, base = _special(dtype, n=300_007)
    b = base if with_base else None
    lut, reps, _, _ = _tables(x, b)
    for table in (reps, reps[:2]):
        want = reference.lc_symbols(x, b, lut, table)
        _assert_same(rans_cpu.lc_symbols(x, b, lut, table), want, "lc_symbols")
        assert_bit_exact(rans_cpu.lc_reconstruct(want[0], table, b, dtype),
                         reference.lc_reconstruct(want[0], table, b, dtype), "lc_reconstruct")


@pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler to build the CPU loops")
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_base", [True, False])
def test_compiled_histogram_matches_reference_on_special_values(dtype, with_base):
    """Pass 1 compiled for float32 (other dtypes go to the reference): infinities, NaNs,
    signed zeros, subnormals and deltas that underflow, past the reference's block size, and
    the reference's errors."""
    x, base = _special(dtype, n=300_007)
    b = base if with_base else None
    got = rans_cpu.lc_histogram(x, b)
    assert got.dtype == torch.int64 and torch.equal(got, reference.lc_histogram(x, b))
    assert torch.equal(rans_cpu.lc_histogram(x[::3], None), reference.lc_histogram(x[::3], None))  # a view
    for bad in [(x, base[1:]), (x.long(), None), (x, base.double() if dtype != torch.float64 else base.float())]:
        with pytest.raises((TypeError, ValueError)) as want:
            reference.lc_histogram(*bad)
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            rans_cpu.lc_histogram(*bad)


def test_lq_rejects_a_table_with_symbol_zero():
    x, base = _moment_pair(100, torch.float32)
    lut = torch.zeros(reference.NUM_FINE_KEYS, dtype=torch.uint8)
    with pytest.raises(ValueError, match="symbol of 1 or more"):
        reference.lq_symbols(x, base, 1.0, lut, torch.zeros(2))
    for twin in LQ_TWINS:
        with pytest.raises(ValueError, match="symbol of 1 or more"):
            twin.lq_symbols(x, base, 1.0, lut, torch.zeros(2))


@pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler to build the CPU loops")
@pytest.mark.parametrize("precision", [0, 2, 4])
def test_compiled_lq_matches_reference_on_a_million_moments(precision):
    """Past the reference's block size, with a tiny scale (predictions underflow to
    subnormals and zero) and one that overflows, and with a representative table shorter
    than the symbols (a clipped take)."""
    x, base = _moment_pair(1_000_003, torch.float32, seed=precision)
    x[::1000] = -x[::1000]
    plan = codecs.plan_log_buckets(reference.lc_histogram(x, None).numpy(), precision)
    lut, reps = torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives)
    for scale, table in ((0.999, reps), (1e-30, reps), (3e38, reps), (0.5, reps[:3])):
        want = reference.lq_symbols(x, base, scale, lut, table)
        _assert_same(rans_cpu.lq_symbols(x, base, scale, lut, table), want, f"lq_symbols at {scale}")
        _assert_same(
            [rans_cpu.lq_reconstruct(want[0], table, base, scale, torch.float32)],
            [reference.lq_reconstruct(want[0], table, base, scale, torch.float32)],
            f"lq_reconstruct at {scale}",
        )
