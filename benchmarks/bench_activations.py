"""Step time of compressed saved activations and checkpointed segments, against plain training.

One training step (batch, forward and loss, backward, AdamW step) of the two workloads of
``benchmarks/activations.py`` (the deep MLP on ``y = 2x + 3`` and the pre-norm transformer on
a Markov chain), for each method: ``none`` (the baseline, in the same group), ``checkpoint``,
``aq8``, ``aq4``, ``aq2`` and ``checkpoint+aq4``. One group per workload. ``extra_info``
carries one step's activation bytes (allocated at the end of the forward minus before it),
the peak over the step and the reduction of both against ``none`` (CUDA counters on a GPU,
the CPU allocator's events through the profiler otherwise), and the bytes the ``compressed``
region saved and stored.

Sizes: the ``cuda`` preset on a GPU, the ``cpu`` preset on a CPU, and the tiny ``smoke``
preset when timing is off (``--benchmark-disable``, as ``make test`` runs it), so that each
test takes a fraction of a second there. The convergence and final-loss side of the study is
``python3 benchmarks/activations.py``; ``python benchmarks/run.py cpu`` runs this file.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import activations as act  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Untimed steps before the memory reading: AdamW creates its state in the first step.
WARMUP = 2


def _preset(benchmark) -> str:
    return "smoke" if benchmark.disabled else DEVICE


def _ready(workload: str, method: str, preset: str):
    """A fresh workload after the warm-up steps, with the method's config."""
    cfg = act.activation_config(method)
    work = act.build(workload, act.sizes(workload, preset), seed=0, device=DEVICE)
    for _ in range(WARMUP):
        act.train_step(work, method, cfg)
    return work, cfg


@pytest.fixture(scope="module")
def baseline_memory():
    """``none``'s memory per (workload, preset), measured once, whatever the test order."""
    cache: dict[tuple[str, str], act.MemoryReport] = {}

    def get(workload: str, preset: str) -> act.MemoryReport:
        if (workload, preset) not in cache:
            work, cfg = _ready(workload, act.BASELINE, preset)
            cache[(workload, preset)] = act.measure_step(work, act.BASELINE, cfg)[1]
        return cache[(workload, preset)]

    return get


def _step(benchmark, baseline_memory, workload: str, method: str) -> None:
    preset = _preset(benchmark)
    work, cfg = _ready(workload, method, preset)
    _, memory = act.measure_step(work, method, cfg)
    base = baseline_memory(workload, preset)
    benchmark.extra_info.update(
        {
            "workload": f"{workload} ({preset} sizes, {work.info['parameters']:,} parameters)",
            "method": method,
            "device": DEVICE,
            "memory_source": memory.source,
            "activation_bytes": memory.activation_bytes,
            "activation_reduction_pct": 100.0
            * (base.activation_bytes - memory.activation_bytes)
            / base.activation_bytes,
            "peak_bytes": memory.peak_bytes,
            "peak_step_bytes": memory.peak_step_bytes,
            "peak_reduction_pct": 100.0 * (base.peak_bytes - memory.peak_bytes) / base.peak_bytes,
            "resident_bytes": memory.resident_bytes,
            "saved_bytes": memory.saved_bytes,
            "stored_bytes": memory.stored_bytes,
        }
    )

    def step() -> float:
        loss, _ = act.train_step(work, method, cfg)  # float(loss): the step has finished
        if work.device.type == "cuda":
            torch.cuda.synchronize(work.device)
        return loss

    loss = benchmark(step)
    assert loss == loss, f"{workload} {method}: the loss is NaN"


@pytest.mark.benchmark(group="activations-mlp")
@pytest.mark.parametrize("method", act.METHODS)
def test_step_mlp(benchmark, baseline_memory, method):
    _step(benchmark, baseline_memory, "mlp", method)


@pytest.mark.benchmark(group="activations-transformer")
@pytest.mark.parametrize("method", act.METHODS)
def test_step_transformer(benchmark, baseline_memory, method):
    _step(benchmark, baseline_memory, "transformer", method)
