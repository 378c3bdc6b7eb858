"""GPU benchmark of the codec kernels (skipped without CUDA).

For a 1B-element float32 tensor and its base (``LCTRITON_GPU_BENCH_NUMEL`` to change it),
times with ``triton.testing.do_bench``:

* the device's copy bandwidth (``dst.copy_(src)`` on the same bytes), the roofline;
* pass 1 alone (reads x and base: 8 bytes per element);
* compress end to end (pass 1, host tables, pass 2, stream packing) and decompress end to
  end (decode, dequantize, add the base), each with the default coder choice and with
  Huffman (``lc/1``) and rANS (``lc/2``) forced;
* the rANS coder's launchers alone (``lctriton.kernels.rans``) on
  ``LCTRITON_GPU_BENCH_RANS_NUMEL`` uint8 symbols (default: as many as elements) drawn from a
  skewed 16-symbol distribution, in chunks of 4096: encode (coder, prefix sum, compaction)
  and decode (with its end check);
* a profile of one warm compress and decompress (default coder and rANS), torch.profiler and
  cProfile tables written to ``results/gpu-codec-<device>-profile.txt``: where the end-to-end
  time goes beyond the kernels;
* the reference codec on the CPU for the same data is in ``bench_codec.py``.

Each result records ms, GB/s of float32 input, and the fraction of the copy bandwidth (for
pass 1, measured against the bytes it must move); the rANS results record ms, GB/s of symbols
(one byte each), symbols per second and the coded bits per symbol.
``python benchmarks/run.py gpu`` runs this file and writes the results JSON with the device
name.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import lctriton
from lctriton import codecs, huffman

pytestmark = pytest.mark.gpu

NUMEL = int(os.environ.get("LCTRITON_GPU_BENCH_NUMEL", str(1 << 30)))
RANS_NUMEL = int(os.environ.get("LCTRITON_GPU_BENCH_RANS_NUMEL", str(NUMEL)))
RANS_CHUNK = 4096


@pytest.fixture(scope="module")
def data():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(NUMEL, device="cuda", generator=g) * 0.05
    x = base + torch.randn(NUMEL, device="cuda", generator=g) * 1e-3
    return x, base


def _do_bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200)


def _copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + written


def _record(benchmark, ms: float, moved_bytes: int, copy_gbps: float) -> None:
    gbps = moved_bytes / (ms * 1e-3) / 1e9
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        numel=NUMEL,
        ms=ms,
        input_GB_per_s=NUMEL * 4 / (ms * 1e-3) / 1e9,
        moved_GB_per_s=gbps,
        copy_GB_per_s=copy_gbps,
        fraction_of_copy=gbps / copy_gbps,
    )


@pytest.mark.benchmark(group="gpu")
def test_gpu_pass1_histogram(benchmark, data):
    from lctriton.kernels.histogram import lc_histogram

    x, base = data
    copy = _copy_bandwidth(NUMEL * 4)
    ms = _do_bench(lambda: lc_histogram(x, base))
    benchmark.pedantic(lambda: (lc_histogram(x, base), torch.cuda.synchronize()), rounds=3, iterations=1)
    _record(benchmark, ms, NUMEL * 8, copy)


#: Coders of the end-to-end runs: the default choice against each coder forced, so the rANS
#: path's cost next to the Huffman path's is read from one run.
CODERS = ["auto", "huffman", "rans"]


@pytest.mark.benchmark(group="gpu")
@pytest.mark.parametrize("coder", CODERS)
def test_gpu_compress_end_to_end(benchmark, data, coder):
    x, base = data
    copy = _copy_bandwidth(NUMEL * 4)

    def run():
        return lctriton.compress({"w": x}, base={"w": base}, coder=coder)

    ms = _do_bench(run)
    c = benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, ms, NUMEL * 4, copy)
    benchmark.extra_info.update(ratio=c.ratio, coder=coder, codec=c.index["tensors"][0]["codec"])


@pytest.mark.benchmark(group="gpu")
@pytest.mark.parametrize("coder", CODERS)
def test_gpu_decompress_end_to_end(benchmark, data, coder):
    x, base = data
    copy = _copy_bandwidth(NUMEL * 4)
    blob = lctriton.compress({"w": x}, base={"w": base}, coder=coder).to_bytes()
    compressed = lctriton.Compressed.from_bytes(blob)

    def run():
        return lctriton.decompress(compressed, base={"w": base})

    ms = _do_bench(run)
    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, ms, NUMEL * 4, copy)
    benchmark.extra_info.update(coder=coder, codec=compressed.index["tensors"][0]["codec"])


@pytest.mark.benchmark(group="gpu")
def test_gpu_encode_kernels_only(benchmark, data):
    """Pass 2 alone, tables prepared: what the kernels cost without host work."""
    from lctriton.kernels import encode, histogram

    x, base = data
    copy = _copy_bandwidth(NUMEL * 4)
    plan = codecs.plan_buckets(histogram.lc_histogram(x, base).cpu().numpy(), 3)
    lengths = torch.from_numpy(huffman.code_lengths(plan.symbol_counts))
    lut = torch.from_numpy(plan.key_to_symbol).cuda()
    reps = torch.from_numpy(plan.representatives.astype(np.float32)).cuda()
    ms = _do_bench(lambda: encode.lc_encode(x, base, lut, reps, lengths, 4096))
    benchmark.pedantic(lambda: encode.lc_encode(x, base, lut, reps, lengths, 4096), rounds=3, iterations=1)
    _record(benchmark, ms, NUMEL * 4, copy)


@pytest.fixture(scope="module")
def rans_data():
    """Symbols with a skewed histogram (geometric over 16 symbols) and their table."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from lctriton import rans

    g = torch.Generator(device="cuda").manual_seed(0)
    p = 0.5 ** torch.arange(1, 17, dtype=torch.float64, device="cuda")
    cdf = (torch.cumsum(p, 0) / p.sum()).to(torch.float32)
    u = torch.rand(RANS_NUMEL, device="cuda", generator=g)
    symbols = torch.searchsorted(cdf, u).clamp_(max=15).to(torch.uint8)
    del u
    counts = torch.bincount(symbols, minlength=16).cpu().numpy()
    return symbols, rans.quantize_frequencies(counts)


def _record_rans(benchmark, ms: float, nwords: int) -> None:
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        numel=RANS_NUMEL,
        chunk_symbols=RANS_CHUNK,
        ms=ms,
        symbol_GB_per_s=RANS_NUMEL / (ms * 1e-3) / 1e9,
        symbols_per_s=RANS_NUMEL / (ms * 1e-3),
        bits_per_symbol=16 * nwords / RANS_NUMEL,
    )


@pytest.mark.benchmark(group="gpu")
def test_gpu_rans_encode(benchmark, rans_data):
    """rANS encode alone: the per-chunk coder, the prefix sum and the compaction."""
    from lctriton.kernels import rans as rans_kernels

    symbols, freqs = rans_data

    def run():
        return rans_kernels.rans_encode(symbols, freqs, RANS_CHUNK)

    ms = _do_bench(run)
    words, _ = benchmark.pedantic(run, rounds=3, iterations=1)  # returns after a host sync
    _record_rans(benchmark, ms, words.numel())


@pytest.mark.benchmark(group="gpu")
def test_gpu_rans_decode(benchmark, rans_data):
    """rANS decode alone (tables sent over each call), with its check of every chunk's end."""
    from lctriton.kernels import rans as rans_kernels

    symbols, freqs = rans_data
    words, chunk_words = rans_kernels.rans_encode(symbols, freqs, RANS_CHUNK)
    item = rans_kernels.RansStream(words, chunk_words.cpu(), RANS_NUMEL, freqs)

    def run():
        return rans_kernels.rans_decode([item], RANS_CHUNK)

    ms = _do_bench(run)
    (out,) = benchmark.pedantic(run, rounds=3, iterations=1)
    assert torch.equal(out, symbols)
    _record_rans(benchmark, ms, words.numel())


def _profile_path() -> str:
    import re

    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", torch.cuda.get_device_name()).strip("-")
    return os.path.join(os.path.dirname(__file__), "results", f"gpu-codec-{tag}-profile.txt")


@pytest.mark.benchmark(group="gpu-profile")
def test_gpu_profile_end_to_end(benchmark, data):
    """Where compress and decompress spend their time: one warm call of each (default coder and
    rANS) under torch.profiler (host ops and CUDA kernels) and cProfile (Python functions,
    where a host wait on the GPU shows as time in the call that synchronizes). Written to
    ``results/gpu-codec-<device>-profile.txt``; the benchmark's own figure is the warm
    compress-and-decompress round trip with the default coder."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    x, base = data
    report = io.StringIO()
    for coder in ("auto", "rans"):
        compressed = lctriton.Compressed.from_bytes(
            lctriton.compress({"w": x}, base={"w": base}, coder=coder).to_bytes())
        calls = {
            "compress": lambda c=coder: lctriton.compress({"w": x}, base={"w": base}, coder=c),
            "decompress": lambda c=compressed: lctriton.decompress(c, base={"w": base}),
        }
        for name, fn in calls.items():
            fn()  # warm: compiled kernels, verified sections
            torch.cuda.synchronize()
            try:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                averages = prof.key_averages()
                report.write(f"==== {name}, coder={coder}: torch.profiler, by self CPU time\n")
                report.write(averages.table(sort_by="self_cpu_time_total", row_limit=20))
                report.write(f"\n==== {name}, coder={coder}: torch.profiler, by device time\n")
                report.write(averages.table(sort_by="self_device_time_total", row_limit=15))
            except Exception as exc:  # the cProfile half below still reports
                report.write(f"==== {name}, coder={coder}: torch.profiler failed: {exc!r}\n")
            stats_out = io.StringIO()
            profiler = cProfile.Profile()
            profiler.enable()
            fn()
            torch.cuda.synchronize()
            profiler.disable()
            pstats.Stats(profiler, stream=stats_out).sort_stats("cumulative").print_stats(30)
            report.write(f"\n==== {name}, coder={coder}: cProfile, cumulative\n{stats_out.getvalue()}\n")
    path = _profile_path()
    with open(path, "w") as f:
        f.write(report.getvalue())

    seconds = []

    def round_trip():
        start = time.perf_counter()
        c = lctriton.compress({"w": x}, base={"w": base})
        lctriton.decompress(c, base={"w": base})
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)

    benchmark.pedantic(round_trip, rounds=2, iterations=1)
    # "ms" puts the row in the GPU table of the results (a host-clock median here, not do_bench).
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), numel=NUMEL, profile=os.path.basename(path),
                                ms=1e3 * sorted(seconds)[len(seconds) // 2])
