"""The activation quantizer: Triton kernels against their reference twins, byte for byte, and
the reference against the format it documents.

Sizes stay small on CPU (each program costs milliseconds in the interpreter): 0, 1, a prime,
a group +- 1, a few programs, a non-contiguous view, special values. The ``gpu`` test repeats
the comparison at large sizes on CUDA.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lctriton.kernels import groupquant, reference

from lctriton import backend
from lctriton.testing import assert_bit_exact, special_values

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _data(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) * 8
    return x.to(dtype)


def _both(x, bits, group, seed, stochastic):
    want = reference.quantize_groups(x, bits, group, seed, stochastic)
    got = groupquant.quantize_groups(x, bits, group, seed, stochastic)
    for name, g, w in zip(("codes", "low", "step"), got, want, strict=True):
        assert_bit_exact(g, w, name)
    n = x.numel()
    assert_bit_exact(groupquant.dequantize_groups(*want, bits, group, n, x.dtype),
                     reference.dequantize_groups(*want, bits, group, n, x.dtype), "restored")
    return want


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [0, 1, 127, 129, 4099, 3 * 4096 + 17])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernels_match_reference(dtype, n, bits):
    x = _data(n, dtype, seed=n)
    for stochastic in (False, True):
        _both(x, bits, 128, seed=12345, stochastic=stochastic)


@pytest.mark.parametrize("group", [8, 64, 4096])
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1])
def test_kernels_match_reference_across_groups_and_seeds(group, seed):
    _both(_data(5003, torch.float32, seed=group), 4, group, seed, True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_match_reference(dtype):
    special = special_values(dtype)
    x = _data(600, dtype)
    x[::37] = special.repeat(2)[: x[::37].numel()]
    x[200:264] = 2.5  # an all-equal group
    x[300:332] = -0.0
    x[320:352] = 1.0
    x[330], x[340] = 0.0, -0.0  # both zeros tie for the minimum of group 10
    x[400] = torch.finfo(dtype).max
    x[401] = -torch.finfo(dtype).max  # the span overflows
    for bits in (2, 8):
        for stochastic in (False, True):
            _, low, _ = _both(x, bits, 32, 7, stochastic)
            assert_bit_exact(low[10:11], torch.zeros(1), "zero minimum")


@pytest.mark.parametrize("stochastic", [False, True])
def test_reference_slabs_do_not_change_the_bytes(monkeypatch, stochastic):
    x = _data(5000, torch.bfloat16)
    x[1234] = float("nan")  # one slab takes the general path, the others the finite one
    want = reference.quantize_groups(x, 4, 64, 21, stochastic)
    monkeypatch.setattr(reference, "_AQ_SLAB", 256)  # 4 groups a slab, the last one partial
    got = reference.quantize_groups(x, 4, 64, 21, stochastic)
    for g, w in zip(got, want, strict=True):
        assert_bit_exact(g, w)
    assert_bit_exact(reference.dequantize_groups(*got, 4, 64, 5000, torch.bfloat16),
                     groupquant.dequantize_groups(*want, 4, 64, 5000, torch.bfloat16))


def test_non_contiguous_input_is_read_in_logical_order():
    x = _data(64 * 70, torch.float32).view(64, 70)[:, 3:60].t()
    codes, low, step = _both(x, 4, 64, 3, True)
    flat = reference.quantize_groups(x.contiguous(), 4, 64, 3, True)
    assert torch.equal(codes, flat[0]) and torch.equal(low, flat[1])


def test_format_of_one_group_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 1.5, 2.9, 3.0])
    codes, low, step = reference.quantize_groups(x, 2, 8, 0, False)
    assert low.tolist() == [0.0] and step.tolist() == [1.0]
    # codes 0 1 2 3 | 1 2 3 3 (0.5 + 0.5 rounds up), four to a byte, first in the low bits
    assert codes.tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6, 1 | 2 << 2 | 3 << 4 | 3 << 6]
    assert reference.dequantize_groups(codes, low, step, 2, 8, 8, torch.float32).tolist() == [
        0.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 3.0]


def test_rounding_noise_is_the_documented_hash_across_the_32_bit_boundary():
    def mix(v):
        v ^= v >> 16
        v = (v * 0x21F0AAAD) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x735A2D97) & 0xFFFFFFFF
        return v ^ (v >> 15)

    start, seed = 2**32 - 3, 99
    got = reference.rounding_noise(start, 6, seed).tolist()
    want = [(mix((i & 0xFFFFFFFF) ^ mix((i >> 32) ^ seed)) >> 8) / 2**24 for i in range(start, start + 6)]
    assert got == want
    assert all(0.0 <= u < 1.0 for u in got)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nearest_rounding_error_is_half_a_step(bits):
    x = _data(128 * 80, torch.float32)
    codes, low, step = reference.quantize_groups(x, bits, 128, 0, False)
    y = reference.dequantize_groups(codes, low, step, bits, 128, x.numel(), torch.float32)
    err = (y - x).abs().view(-1, 128)
    bound = step[:, None] * 0.5 + low.abs()[:, None] * 2**-22 + step[:, None] * 2**-20
    assert bool((err <= bound).all())


def test_stochastic_rounding_is_unbiased():
    x = torch.linspace(-1, 1, 256).repeat(400)  # the same group 400 times, at other indices
    codes, low, step = reference.quantize_groups(x, 2, 256, 5, True)
    y = reference.dequantize_groups(codes, low, step, 2, 256, x.numel(), torch.float32).view(400, 256)
    bias = (y.mean(0) - x[:256]).abs().max().item()
    assert bias < 0.06  # step 2/3, sd of one draw <= 1/3: the mean of 400 is within ~0.017 sd
    nearest = reference.dequantize_groups(*reference.quantize_groups(x[:256], 2, 256, 5, False), 2, 256, 256,
                                          torch.float32)
    assert (nearest - x[:256]).abs().max().item() > 0.3  # the deterministic error it averages out


def test_nonfinite_group_restores_as_nan_and_others_are_untouched():
    x = torch.ones(24)
    x[3] = float("inf")
    x[16:] = torch.tensor([0.0, 255.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # step 1: exact
    codes, low, step = reference.quantize_groups(x, 8, 8, 0, True)
    y = reference.dequantize_groups(codes, low, step, 8, 8, 24, torch.bfloat16)
    assert torch.isnan(y[:8]).all() and torch.equal(y[8:16], torch.ones(8, dtype=torch.bfloat16))
    assert torch.equal(y[16:], x[16:].to(torch.bfloat16))
    assert_bit_exact(y[:1], torch.tensor([0x7FC0], dtype=torch.int16).view(torch.bfloat16))


def test_sizes_of_the_packed_form():
    assert reference.aq_sizes(0, 4, 128) == (0, 0)
    assert reference.aq_sizes(129, 4, 128) == (2, 128)
    assert reference.aq_sizes(1000, 2, 8) == (125, 250)


@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300),
       st.sampled_from([2, 4, 8]), st.sampled_from([8, 16, 128]), st.booleans())
def test_reference_restores_within_the_group_range(values, bits, group, stochastic):
    x = torch.tensor(values, dtype=torch.float32)
    codes, low, step = reference.quantize_groups(x, bits, group, 11, stochastic)
    y = reference.dequantize_groups(codes, low, step, bits, group, x.numel(), torch.float32)
    pad = (-x.numel()) % group
    xs = torch.nn.functional.pad(x, (0, pad), value=float("nan")).view(-1, group)
    lo = torch.where(xs.isnan(), float("inf"), xs).amin(1)
    hi = torch.where(xs.isnan(), float("-inf"), xs).amax(1)
    assert torch.equal(low, lo)
    ys = torch.nn.functional.pad(y, (0, pad)).view(-1, group)
    slack = (hi - lo).abs()[:, None] * 1e-5 + 1e-30
    valid = ~xs.isnan()
    assert bool(((ys >= lo[:, None] - slack) | ~valid).all()) and bool(((ys <= hi[:, None] + slack) | ~valid).all())


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(4), 3, 128, 0, True), ValueError, "bits must be one of"),
        ((torch.ones(4), 4, 96, 0, True), ValueError, "group_size must be a power of two"),
        ((torch.ones(4), 4, 4, 0, True), ValueError, "group_size must be a power of two"),
        ((torch.ones(4), 4, 128, -1, True), ValueError, "seed must be in"),
        ((torch.ones(4), 4.0, 128, 0, True), TypeError, "bits must be an int"),
        ((torch.ones(4, dtype=torch.int32), 4, 128, 0, True), TypeError, "x must be float32"),
        (("x", 4, 128, 0, True), TypeError, "x must be a tensor"),
    ],
)
@pytest.mark.parametrize("module", [reference, groupquant])
def test_quantize_rejects_bad_arguments(module, args, error, match):
    with pytest.raises(error, match=match):
        module.quantize_groups(*args)


@pytest.mark.parametrize("module", [reference, groupquant])
def test_dequantize_rejects_mismatched_parts(module):
    codes, low, step = reference.quantize_groups(torch.ones(300), 4, 128, 0, True)
    with pytest.raises(ValueError, match="need 192 code bytes and 3 group entries"):
        module.dequantize_groups(codes[:-1], low, step, 4, 128, 300, torch.float32)
    with pytest.raises(ValueError, match="need 256 code bytes"):
        module.dequantize_groups(codes, low, step, 4, 128, 500, torch.float32)
    with pytest.raises(TypeError, match="low must be torch.float32"):
        module.dequantize_groups(codes, low.double(), step, 4, 128, 300, torch.float32)
    with pytest.raises(TypeError, match="dtype must be"):
        module.dequantize_groups(codes, low, step, 4, 128, 300, torch.int64)


def test_backend_dispatches_both_ways(monkeypatch):
    x = _data(1000, torch.bfloat16)
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")
    want = backend.quantize_groups(x, 4, 128, 1, True)
    monkeypatch.setenv(backend.BACKEND_ENV, "triton")
    got = backend.quantize_groups(x, 4, 128, 1, True)
    for g, w in zip(got, want, strict=True):
        assert_bit_exact(g, w)
    assert_bit_exact(backend.dequantize_groups(*got, 4, 128, 1000, torch.bfloat16),
                     reference.dequantize_groups(*want, 4, 128, 1000, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gpu_large_tensors_match_reference(dtype, bits):
    x = _data(10_000_019, dtype, seed=3)
    for stochastic in (False, True):
        want = reference.quantize_groups(x, bits, 128, 77, stochastic)
        got = groupquant.quantize_groups(x.cuda(), bits, 128, 77, stochastic)
        for g, w in zip(got, want, strict=True):
            assert_bit_exact(g.cpu(), w)
        restored = groupquant.dequantize_groups(*(t.cuda() for t in want), bits, 128, x.numel(), dtype)
        assert_bit_exact(restored.cpu(), reference.dequantize_groups(*want, bits, 128, x.numel(), dtype))


_LOWERING = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lctriton.kernels import groupquant

ptr, kind = sys.argv[1], int(sys.argv[2])
cases = [
    (groupquant._quantize_groups_kernel,
     {"x_ptr": ptr, "codes_ptr": "*u8", "low_ptr": "*fp32", "step_ptr": "*fp32", "n": "i64",
      "groups": "i64", "seed": "i32", "BITS": "constexpr", "GROUP": "constexpr", "GROUPS": "constexpr",
      "STOCHASTIC": "constexpr", "KIND": "constexpr"},
     {"BITS": 4, "GROUP": 128, "GROUPS": 32, "STOCHASTIC": True, "KIND": kind}),
    (groupquant._dequantize_groups_kernel,
     {"codes_ptr": "*u8", "low_ptr": "*fp32", "step_ptr": "*fp32", "out_ptr": ptr, "n": "i64",
      "groups": "i64", "BITS": "constexpr", "GROUP": "constexpr", "GROUPS": "constexpr", "KIND": "constexpr"},
     {"BITS": 2, "GROUP": 4096, "GROUPS": 1, "KIND": kind}),
]
ptx = [triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                      options={"enable_fp_fusion": False}).asm["ptx"] for fn, sig, c in cases]
print(json.dumps(ptx))
"""


@pytest.mark.parametrize("ptr, kind", [("*fp32", 0), ("*bf16", 3)])
def test_kernels_lower_for_a_gpu_without_fused_multiply_add(ptr, kind):
    """Compile both kernels for an sm_90 GPU without one (Triton bundles the toolchain), in a
    process without the interpreter, so that lowering errors show on a CPU-only machine."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _LOWERING, ptr, str(kind)], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and ("No such file" in done.stderr or "not found" in done.stderr):
        pytest.skip(f"this Triton has no CUDA toolchain here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    quantize, dequantize = json.loads(done.stdout)
    # The bytes depend on correctly rounded division and on separate multiplies and adds.
    assert "div.rn.f32" in quantize and "fma" not in quantize and "fma" not in dequantize
