"""The fidelity harness (benchmarks/fidelity.py) on a short digits run.

One sweep (reference, a lossless and a lossy setting; 20 steps, a checkpoint every 5, 2
restores) is shared by the tests: the lossless setting must reproduce the reference bit for
bit, the lossy one must restore through delta checkpoints, and the record must carry every
field the plots and reports read.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lctriton import examples

ROOT = Path(__file__).resolve().parents[1]


def _load_fidelity():
    """benchmarks/ is not a package; load benchmarks/fidelity.py by path (once)."""
    if "fidelity" in sys.modules:
        return sys.modules["fidelity"]
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


fidelity = _load_fidelity()

STEPS, EVERY, RESTORES = 20, 5, 2
SETTINGS = [{"lossless": True}, {"bits": 3}]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    # One torch thread: on a busy 2-core machine two threads spin-wait for each other and a
    # step of this small CNN can take ten times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fidelity.sweep(
            examples.digits_cnn,
            SETTINGS,
            steps=STEPS,
            every=EVERY,
            restores=RESTORES,
            eval_points=2,
            workdir=tmp_path_factory.mktemp("fidelity"),
        )
    finally:
        torch.set_num_threads(threads)


def test_lossless_setting_reproduces_the_reference_bit_for_bit(record):
    lossless = record["settings"][0]
    assert lossless["setting"] == {"lossless": True}
    assert lossless["bit_identical"]
    assert lossless["final"]["test_loss"] == record["reference"]["final"]["test_loss"]
    assert lossless["train_loss"] == record["reference"]["train_loss"]
    assert lossless["acc_diff_points"] == 0.0 and lossless["loss_diff_rel_pct"] == 0.0
    assert all(r["error"]["model"]["rel_l2"] == 0.0 for r in lossless["restores"])
    assert fidelity.check_record(record) == []


def test_lossy_setting_restores_through_deltas(record):
    lossy = record["settings"][1]
    assert [r["step"] for r in lossy["restores"]] == record["config"]["restore_steps"]
    assert len(lossy["restores"]) == RESTORES
    assert lossy["restores_from_delta"] >= 1
    from_delta = [r for r in lossy["restores"] if r["kind"] == "delta"]
    assert all(r["chain_deltas"] >= 1 for r in from_delta)
    # A lossy delta really is lossy, and it is smaller than the raw state.
    assert all(r["error"]["model"]["rel_l2"] > 0.0 for r in from_delta)
    assert lossy["ratio"]["delta"]["state"] > 2.0
    assert not lossy["bit_identical"]
    assert math.isfinite(lossy["final"]["test_loss"])


def test_record_has_the_fields(record):
    json.dumps(record, allow_nan=False)  # strict JSON: diverged values are null, not NaN
    assert record["config"]["steps"] == STEPS and record["config"]["every"] == EVERY
    assert record["workload"]["name"] == "digits_cnn"
    reference = record["reference"]
    assert len(reference["train_loss"]) == STEPS
    assert reference["evals"][0]["step"] == 0 and reference["evals"][-1]["step"] == STEPS
    assert set(reference["final"]) == {"step", "test_loss", "test_acc"}
    for setting in record["settings"]:
        assert {
            "setting",
            "label",
            "final",
            "acc_diff_points",
            "loss_diff_rel_pct",
            "ratio",
            "restores",
            "checkpoints",
            "train_loss",
            "evals",
            "timings",
            "bit_identical",
            "diverged",
            "train_loss_tail_diff_rel_pct",
            "final_weights_rel_distance",
        } <= set(setting)
        for scope in ("delta", "all"):
            assert {"count", "state", "weights", "optimizer"} <= set(setting["ratio"][scope])
        assert setting["ratio"]["all"]["count"] == STEPS // EVERY
        assert {"wall_s", "train_s", "save_s", "restore_s", "eval_s"} <= set(setting["timings"])
        for checkpoint in setting["checkpoints"]:
            assert checkpoint["model_raw"] + checkpoint["optimizer_raw"] == checkpoint["tensor_raw"]
            assert checkpoint["tensor_raw"] == checkpoint["raw_nbytes"]
        assert len(setting["train_loss"]) == STEPS


def test_plot_and_cli_plot_mode(record, tmp_path):
    pytest.importorskip("matplotlib")
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(record))
    assert (
        fidelity.main(["--plot", str(saved), str(saved), "--out", str(tmp_path / "both"), "-q"])
        == 0
    )
    png = tmp_path / "both.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_over_seeds(record, tmp_path, capsys):
    """The range over records: a second record whose lossy run lost 3 points and 5% shows as
    the span between the two; a setting present once shows alone."""
    other = json.loads(json.dumps(record))
    other["config"]["seed"] = 7
    lossy = other["settings"][1]
    lossy["acc_diff_points"], lossy["loss_diff_rel_pct"] = -3.0, 5.0
    other["settings"].append({**lossy, "label": "only-here"})
    table = fidelity.summarize([record, other])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "seeds 0, 7" in table
    first = record["settings"][1]
    assert f"{first['acc_diff_points']:+.2f} .. +" not in rows["bits=3"]  # min first
    assert f"-3.00 .. {first['acc_diff_points']:+.2f}" in rows["bits=3"] and "| 2 |" in rows["bits=3"]
    assert f"{first['loss_diff_rel_pct']:+.2f} .. +5.00" in rows["bits=3"]
    assert "| 1 |" in rows["only-here"]
    assert rows["lossless"].count("+0.00") >= 2  # bit-identical both times: no span
    saved = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, rec in zip(saved, (record, other), strict=True):
        path.write_text(json.dumps(rec))
    assert fidelity.main(["--summarize", *map(str, saved)]) == 0
    assert capsys.readouterr().out.strip() == table
    with pytest.raises(ValueError, match="at least one record"):
        fidelity.summarize([])


def test_restore_steps_are_distinct_save_steps_before_the_end():
    assert fidelity.restore_steps(200, 10, 10) == [20, 40, 60, 80, 100, 110, 130, 150, 170, 190]
    assert fidelity.restore_steps(30, 5, 3) == [10, 20, 25]
    assert fidelity.restore_steps(30, 5, 4) == [10, 15, 20, 25]
    assert fidelity.restore_steps(30, 5, 0) == []
    for steps, every, restores in [(1000, 20, 10), (97, 3, 30), (50, 7, 5)]:
        chosen = fidelity.restore_steps(steps, every, restores)
        assert len(set(chosen)) == restores == len(chosen)
        assert all(s % every == 0 and every < s < steps for s in chosen)
    with pytest.raises(ValueError):
        fidelity.restore_steps(30, 5, 5)


def test_settings_parsing_and_labels():
    assert fidelity.parse_settings("baseline") == fidelity.PRESETS["baseline"]
    assert fidelity.parse_settings('{"bits": 2, "key_every": 20}') == [{"bits": 2, "key_every": 20}]
    # Options the harness does not know are passed through untouched.
    assert fidelity.parse_settings('[{"moment_interval": 5}]') == [{"moment_interval": 5}]
    with pytest.raises(ValueError):
        fidelity.parse_settings("no-such-preset")
    assert fidelity.setting_label({"bits": 2, "key_every": 20}) == "bits=2,key_every=20"
    assert fidelity.setting_label({"lossless": True}) == "lossless"


def test_memory_restores_match_the_chain_decoded_from_disk(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = fidelity.sweep(
            examples.digits_cnn,
            [{"bits": 2}],
            steps=15,
            every=5,
            restores=1,
            eval_points=1,
            restore_from="memory",
            workdir=tmp_path,
        )
    finally:
        torch.set_num_threads(threads)
    (lossy,) = record["settings"]
    assert record["config"]["restore_from"] == "memory"
    assert [(r["step"], r["kind"], r["source"]) for r in lossy["restores"]] == [
        (10, "delta", "memory")
    ]
    assert lossy["disk_check"]["step"] == 10 and lossy["disk_check"]["identical"]
    assert fidelity.check_record(record) == []


def test_cosine_workload_decays_over_the_steps_asked_for(monkeypatch):
    built = {}

    class Stop(Exception):
        pass

    def fake_sweep(build, settings, *, steps, **kwargs):
        built["steps"], built["cosine_steps"] = steps, build(0).info["cosine_steps"]
        raise Stop

    monkeypatch.setattr(fidelity, "sweep", fake_sweep)
    for argv, steps in ((["--workload", "digits-cosine", "--steps", "40"], 40), (["--workload", "digits-cosine"], 1000)):
        with pytest.raises(Stop):
            fidelity.main([*argv, "--settings", "[{}]", "-q"])
        assert built == {"steps": steps, "cosine_steps": steps}
    with pytest.raises(Stop):
        fidelity.main(["--workload", "digits", "--steps", "40", "--settings", "[{}]", "-q"])
    assert built == {"steps": 40, "cosine_steps": None}
