"""The context study (benchmarks/context_study.py): its entropy arithmetic, its contexts, and
its finding on the digits CNN, so the figure it backs stays reproducible."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("context_study", ROOT / "benchmarks" / "context_study.py")
context_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(context_study)


def test_entropy_arithmetic():
    assert context_study.entropy_bits(np.array([5, 5, 0])) == pytest.approx(10.0)  # one bit each
    assert context_study.entropy_bits(np.array([7])) == 0.0
    assert context_study.entropy_bits(np.array([], dtype=np.int64)) == 0.0
    symbols = np.array([0, 1, 0, 1, 2, 2, 2, 2])
    # Context 0 holds the 0/1 half (one bit each), context 1 only 2s (free).
    contexts = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert context_study.conditional_bits(symbols, contexts, 2) == pytest.approx(4.0)
    assert context_study.entropy_bits(np.bincount(symbols)) == pytest.approx(12.0)


def test_moment_contexts():
    m = np.array([-1.5, 1.5, 0.0, 1e-30, 1e30, 0.375], dtype=np.float32)
    v = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    sign, both = context_study.moment_contexts(m, v)
    assert sign.tolist() == [0, 1, 2, 1, 1, 1]
    octaves = (both - sign * context_study.OCTAVES).tolist()
    # ratio 1.5 -> octave 0 (index 8); 0 and tiny clamp to the lowest, huge to the highest;
    # 0.375 -> octave -2.
    assert octaves == [8, 8, 0, 0, context_study.OCTAVES - 1, 6]
    assert both.max() < 3 * context_study.OCTAVES


def test_base_moments_predict_one_step_deltas_on_digits():
    row = context_study.study("digits", between=1, bits=3, seed=0)
    b = row["bits_per_element"]
    assert row["elements"] > 100_000
    assert b["h_sign_ratio"] <= b["h_sign"] <= b["h0"]
    # Recorded: 0.581 -> 0.209 bits per element (benchmarks/results/context-digits-cpu.json).
    assert b["h_sign_ratio"] < 0.5 * b["h0"]
