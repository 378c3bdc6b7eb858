"""GPU study of pass 1 (the fine-key histogram): the shipped kernel against other layouts.

Run on a CUDA machine: ``python benchmarks/histogram_study.py [numel]`` (default 2**28). Every
variant must give the shipped kernel's counts exactly (``exact=True``); each is timed twice with
``triton.testing.do_bench`` (median) on a float32 pair like ``bench_gpu.py``'s. The floor is
the device's copy time for the same bytes: pass 1 reads 8 bytes per element, a copy of the
tensor reads 4 and writes 4.

Variants:

* ``shipped``: :func:`lctriton.kernels.histogram.lc_histogram`, one relaxed atomic per
  element into one global int32 table;
* ``replicated R``: the same atomics spread over R tables (program id modulo R), summed
  afterwards: fewer collisions on the few hot keys of a training delta;
* ``persistent tl.histogram``: a grid of 4 programs per multiprocessor, each accumulating
  ``tl.histogram`` of its blocks and adding its table once (the layout before the shipped
  one, without its per-block atomics);
* ``int16 keys + bincount``: the keys written out, then ``torch.bincount``.

Measured on an H100 (triton 3.6, 2**28 elements, floor 0.72 ms) with an earlier draft of this
script, which also swept 2, 4 and 8 persistent programs per SM and BLOCK 2048 to 8192:
persistent tl.histogram 107.8-108.6 ms (BLOCK 2048-4096; 321-332 ms at 8192), global
atomics (now shipped) 32.6 ms, keys + bincount 49.1 ms. The layout shipped before (a block
histogram plus 8192 atomics per block) took 593 ms per 2**30 elements in ``bench_gpu.py``.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from lctriton.kernels.histogram import NUM_FINE_KEYS, delta_f32, fine_keys, lc_histogram
from triton.testing import do_bench


@triton.jit
def _persistent(x_ptr, base_ptr, hist_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    start = pid.to(tl.int64) * BLOCK
    step = nprog.to(tl.int64) * BLOCK
    counts = tl.zeros([8192], dtype=tl.int32)
    for it in range(0, tl.cdiv(tl.cdiv(n, BLOCK) - pid, nprog)):
        offs = start + it * step + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0)
        b = tl.load(base_ptr + offs, mask=mask, other=0)
        counts += tl.histogram(fine_keys(delta_f32(x, b, True, 0)), 8192)
    tl.atomic_add(hist_ptr + tl.arange(0, 8192), counts.to(tl.int64))


@triton.jit
def _replicated(x_ptr, base_ptr, hist_ptr, n, REPLICAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    b = tl.load(base_ptr + offs, mask=mask, other=0)
    keys = fine_keys(delta_f32(x, b, True, 0)) + (pid % REPLICAS) * 8192
    tl.atomic_add(hist_ptr + keys, tl.full([BLOCK], 1, tl.int32), mask=mask, sem="relaxed")


@triton.jit
def _keys(x_ptr, base_ptr, keys_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    b = tl.load(base_ptr + offs, mask=mask, other=0)
    tl.store(keys_ptr + offs, fine_keys(delta_f32(x, b, True, 0)).to(tl.int16), mask=mask)


def persistent(x, base, block=2048, per_sm=4, warps=4):
    """Counts with ``per_sm`` persistent programs per multiprocessor, each accumulating the
    ``tl.histogram`` of its blocks and adding its table to the result once."""
    n = x.numel()
    hist = torch.zeros(NUM_FINE_KEYS, dtype=torch.int64, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    _persistent[(min(triton.cdiv(n, block), sms * per_sm),)](x, base, hist, n, BLOCK=block, num_warps=warps)
    hist[0] -= hist.sum() - n  # masked lanes hold d = +0.0, key 0
    return hist


def replicated(x, base, replicas, block=4096):
    """Counts with per-element atomics spread over ``replicas`` tables, summed afterwards."""
    n = x.numel()
    hist = torch.zeros(replicas * NUM_FINE_KEYS, dtype=torch.int32, device=x.device)
    _replicated[(triton.cdiv(n, block),)](x, base, hist, n, REPLICAS=replicas, BLOCK=block, num_warps=8)
    return hist.view(replicas, NUM_FINE_KEYS).sum(0, dtype=torch.int64)


def keys_bincount(x, base, block=4096):
    """Writes the int16 fine keys, then counts them with ``torch.bincount``."""
    n = x.numel()
    keys = torch.empty(n, dtype=torch.int16, device=x.device)
    _keys[(triton.cdiv(n, block),)](x, base, keys, n, BLOCK=block, num_warps=8)
    return torch.bincount(keys, minlength=NUM_FINE_KEYS)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 28
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, device="cuda", generator=g) * 0.05
    x = base + torch.randn(n, device="cuda", generator=g) * 1e-3
    dst = torch.empty_like(x)
    floor_ms = do_bench(lambda: dst.copy_(x), return_mode="median")
    print(f"{torch.cuda.get_device_name()}, n={n}, floor (copy of the same bytes) {floor_ms:.3f} ms", flush=True)
    want = lc_histogram(x, base)
    variants = {"shipped": lambda: lc_histogram(x, base)}
    for replicas in (4, 16, 64):
        variants[f"replicated {replicas}"] = lambda r=replicas: replicated(x, base, r)
    variants["persistent tl.histogram"] = lambda: persistent(x, base)
    variants["int16 keys + bincount"] = lambda: keys_bincount(x, base)
    for name, fn in variants.items():
        try:
            exact = torch.equal(fn(), want)
            ms = [do_bench(fn, return_mode="median") for _ in range(2)]
            print(f"{name:28s} exact={exact!s:5s} {ms[0]:9.3f} ms {ms[1]:9.3f} ms  "
                  f"{n * 8 / ms[0] / 1e6:8.1f} GB/s read", flush=True)
        except Exception as exc:  # a study: report and go on to the next variant
            print(f"{name:28s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    main()
