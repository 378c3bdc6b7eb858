"""Canonical length-limited Huffman codes: properties, and round trips through the packer."""

import heapq

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lctriton.kernels import reference

from lctriton import huffman

histograms = st.lists(st.integers(min_value=0, max_value=10**9), min_size=2, max_size=256).filter(
    lambda c: sum(1 for v in c if v) >= 2
)


def _unlimited_cost(counts):
    heap = [c for c in counts if c]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@given(histograms, st.integers(min_value=8, max_value=16))
def test_lengths_form_complete_prefix_code_within_limit(counts, limit):
    lengths = huffman.code_lengths(np.array(counts), limit)
    used = np.array(counts) > 0
    assert (lengths[used] >= 1).all() and (lengths[~used] == 0).all()
    assert lengths.max() <= limit
    huffman.validate_lengths(lengths, limit)  # complete: Kraft sum exactly 1


@given(histograms)
def test_lengths_are_optimal_when_limit_does_not_bind(counts):
    lengths = huffman.code_lengths(np.array(counts), 40)
    assert int(np.dot(lengths.astype(np.int64), np.array(counts))) == _unlimited_cost(counts)


@given(histograms)
def test_canonical_codes_are_prefix_free(counts):
    lengths = huffman.code_lengths(np.array(counts))
    codes = huffman.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)]
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            assert i == j or not b.startswith(a)


@given(
    st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=3000),
    st.sampled_from([64, 128, 4096]),
)
def test_pack_then_decode_round_trips(symbols, chunk):
    sym = np.array(symbols, dtype=np.uint8)
    counts = np.bincount(sym, minlength=8)
    lengths = huffman.code_lengths(counts)
    if not lengths.any():
        return  # a fill has no stream
    packer = reference._Packer(lengths, chunk)
    packer.add(sym)
    words, chunk_bits = packer.finish()
    assert int(chunk_bits.sum()) == int(np.dot(lengths[sym].astype(np.int64), np.ones(sym.size, np.int64)))
    item = reference.LcStream(
        torch.from_numpy(words.view(np.int64)), torch.from_numpy(chunk_bits), sym.size, lengths, None,
        torch.zeros(8), None, torch.float32,
    )
    (decoded,) = reference._decode_symbols([item], chunk)
    np.testing.assert_array_equal(decoded, sym)


def test_single_used_symbol_has_no_code():
    assert not huffman.code_lengths(np.array([0, 5, 0])).any()
    with pytest.raises(ValueError, match="single used symbol"):
        huffman.validate_lengths(np.array([0, 1, 0]))


@pytest.mark.parametrize(
    "lengths, message",
    [([1, 2, 2, 2], "complete"), ([1, 2, 0, 0], "complete"), ([13, 1, 0, 0], "exceeds")],
)
def test_invalid_lengths_are_rejected(lengths, message):
    with pytest.raises(ValueError, match=message):
        huffman.validate_lengths(np.array(lengths))


def test_code_lengths_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        huffman.code_lengths(np.array([1, -1]))
    with pytest.raises(ValueError, match="do not fit"):
        huffman.code_lengths(np.ones(300, dtype=np.int64), 8)
    with pytest.raises(ValueError, match="one-dimensional"):
        huffman.code_lengths(np.ones((2, 2), dtype=np.int64))
