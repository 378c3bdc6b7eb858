"""The activation-memory harness (benchmarks/activations.py) itself.

The CPU memory reading is checked on steps whose allocations can be counted by hand; one
``--smoke`` run of the command line (every method, both workloads, three steps) is shared by
the checks of its record: the fields the tables and plots read, plain checkpointing leaving
the losses unchanged, and the compressed methods holding fewer activation bytes the fewer
bits they keep.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]


def _load_harness():
    """benchmarks/ is not a package: load benchmarks/activations.py by path (once; the
    benchmark file imports it as ``activations`` too)."""
    if "activations" in sys.modules:
        return sys.modules["activations"]
    path = ROOT / "benchmarks" / "activations.py"
    spec = importlib.util.spec_from_file_location("activations", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["activations"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def test_cpu_memory_counts_a_known_allocation():
    def step():
        kept = torch.empty(12345, dtype=torch.uint8)  # before the forward: not an activation
        with record_function(harness.FORWARD):
            kept = [kept, torch.empty(1000, dtype=torch.uint8)]
            scratch = torch.empty(4000, dtype=torch.uint8)
            del scratch
        more = torch.empty(500, dtype=torch.uint8)  # after it: counts for the peak only
        del more
        return kept

    kept, reading = harness.cpu_step_memory(step)
    assert reading == {
        "activation_bytes": 1000,
        "peak_step_bytes": 5000,
        "before_forward_bytes": 12345,
        "end_bytes": 1000,
    }
    assert kept[1].numel() == 1000


def test_cpu_memory_of_a_small_mlp_by_hand():
    torch.manual_seed(0)
    batch, d_in, hidden = 64, 32, 256
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    x = torch.randn(batch, d_in)

    def step():
        with record_function(harness.FORWARD):
            loss = model(x).sum()
        loss.backward()

    _, reading = harness.cpu_step_memory(step)
    # Kept after the forward: the ReLU's output (saved by the ReLU and by the second linear
    # layer, one tensor) and the loss. The first layer's output is freed once the ReLU ran,
    # the second's once it is summed (sum's backward needs only its shape).
    assert reading["activation_bytes"] == batch * hidden * 4 + 4
    # Backward adds at least the gradients of the weights and of that activation.
    grads = sum(p.numel() for p in model.parameters()) * 4
    assert reading["peak_step_bytes"] >= reading["activation_bytes"] + grads
    # What the forward kept is freed by backward; the weight gradients stay.
    assert reading["end_bytes"] == grads


def test_memory_from_events_needs_one_forward_range():
    with pytest.raises(ValueError, match="expected one"):
        harness.cpu_step_memory(lambda: torch.empty(10))


def test_activation_config_per_method():
    assert harness.activation_config("none") is None
    assert harness.activation_config("checkpoint") is None
    for method, bits in (("aq8", 8), ("aq4", 4), ("aq2", 2), ("checkpoint+aq4", 4)):
        cfg = harness.activation_config(method)
        assert (cfg.bits, cfg.rounding) == (bits, "stochastic")
    with pytest.raises(ValueError, match="unknown method"):
        harness.activation_config("aq3")


def test_workloads_are_seeded():
    for name in ("mlp", "transformer"):
        size = harness.sizes(name, "smoke")
        a, b = harness.build(name, size, seed=3), harness.build(name, size, seed=3)
        pairs = zip(a.model.parameters(), b.model.parameters(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs)
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch(), strict=True))
        assert torch.equal(a.val[0], b.val[0])


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("activations") / "smoke"
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine two spin-wait for each other.
    torch.set_num_threads(1)
    try:
        rc = harness.main(["--smoke", "--steps", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.with_suffix(".json").read_text())


def test_record_fields(record):
    for key in ("command", "machine", "config", "targets", "workloads", "sanity", "wall_s"):
        assert key in record
    for key in ("device", "torch", "triton", "commit", "cpu_count"):
        assert key in record["machine"]
    assert record["sanity"] == {"ok": True, "problems": []}
    assert set(record["workloads"]) == {"mlp", "transformer"}
    for w in record["workloads"].values():
        assert list(w["methods"]) == list(harness.METHODS)
        assert w["steps"] == 3
        for r in w["methods"].values():
            assert len(r["train_loss"]) == 3
            for key in ("activation_bytes", "peak_bytes", "peak_step_bytes", "resident_bytes"):
                assert r["memory"][key] > 0
            for key in (
                "activation_reduction_pct",
                "peak_reduction_pct",
                "step_time_s",
                "step_time_ratio",
                "final_train_loss",
                "final_val_loss",
                "train_loss_rel_diff_pct",
                "val_loss_rel_diff_pct",
            ):
                assert math.isfinite(r[key]), key
        base = w["methods"]["none"]
        assert base["activation_reduction_pct"] == 0 and base["step_time_ratio"] == 1
        assert set(w["targets"]) == {"aq4", "checkpoint+aq4"}
        for t in w["targets"].values():
            assert t["step_time_ok"] is None  # stated for GPUs; this is a CPU run
            assert isinstance(t["activation_ok"], bool) and isinstance(t["loss_ok"], bool)


def test_checkpoint_changes_no_loss(record):
    for w in record["workloads"].values():
        plain = w["methods"]["checkpoint"]
        assert plain["same_losses_as_none"]
        assert plain["final_gradient"]["grad_rel_error"] == 0
        assert w["methods"]["none"]["final_gradient"]["grad_rel_error"] == 0
        none = w["methods"]["none"]
        assert plain["memory"]["activation_bytes"] < none["memory"]["activation_bytes"]


def test_fewer_bits_fewer_activation_bytes(record):
    for w in record["workloads"].values():
        m = w["methods"]
        held = [m[k]["memory"]["activation_bytes"] for k in ("none", "aq8", "aq4", "aq2")]
        assert held == sorted(held, reverse=True) and len(set(held)) == 4
        for k in ("aq8", "aq4", "aq2"):
            mem = m[k]["memory"]
            assert 0 < mem["stored_bytes"] < mem["saved_bytes"]
            assert m[k]["stored_over_saved"] == mem["stored_bytes"] / mem["saved_bytes"]
            # A few steps of a tiny model: the trajectory stays close to plain training.
            assert abs(m[k]["train_loss_rel_diff_pct"]) < 10
        # Fewer bits, a noisier gradient (one draw of stochastic rounding each).
        errors = [m[k]["final_gradient"]["grad_rel_error"] for k in ("aq8", "aq2")]
        assert 0 < errors[0] < errors[1]


def test_table_lists_every_method(record):
    text = harness.table(record)
    for method in harness.METHODS:
        assert f"| {method} |" in text
    assert "target aq4:" in text and "target checkpoint+aq4:" in text
