"""The delta_floor study (benchmarks/floor_study.py) on a small trajectory: its record holds
every floor's ratio and the restored checkpoints' evaluations beside the original's."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("floor_study", ROOT / "benchmarks" / "floor_study.py")
floor_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor_study)


def test_floor_study_records_ratio_and_restored_quality():
    result = floor_study.study("digits", [None, 4], checkpoints=3, between=1, warmup=2, seed=0)
    assert result["workload"] == "digits_cnn" and len(result["original"]["test_loss"]) == 2
    none, coarse = result["floors"]
    assert none["delta_floor"] is None and coarse["delta_floor"] == 4
    for row in result["floors"]:
        assert len(row["test_loss"]) == len(row["test_acc"]) == 2
    # A coarse floor drops more of each delta: a higher ratio, and the restored model moves
    # away from the saved one.
    assert coarse["ratio"] > none["ratio"]
    assert coarse["test_loss"] != none["test_loss"]


def test_floor_arguments():
    assert floor_study._floor("none") is None and floor_study._floor("None") is None
    assert floor_study._floor("10") == 10
