"""The rANS coder: the reference's round trips, and its Triton twin byte for byte.

The reference (``kernels/reference.py``, section "rANS") is checked on its own at real
chunk sizes, and so is its compiled CPU twin (``kernels/rans_cpu.py``); the Triton launchers (``kernels/rans.py``) run in the CPU interpreter without
a GPU (tests/conftest.py sets TRITON_INTERPRET=1), where every step of a chunk costs
milliseconds, so they are compared at chunks of 64 and 256 symbols. The ``gpu`` tests
repeat the comparison at large sizes on CUDA.
"""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lctriton.kernels import rans as tri
from lctriton.kernels import rans_cpu, reference, triton_codec

from lctriton import backend, rans

TABLES = ["skewed", "flat16", "flat256", "random256", "peak4095"]
#: Invalid tables: a wrong sum, too many entries, a single symbol, a negative entry, empty.
BAD_TABLES = [
    np.full(16, 255),
    np.full(257, 16),
    np.array([4096]),
    np.array([4097, -1]),
    np.zeros(0, np.int64),
]


def _freqs(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A frequency table of the given kind (int64, sums to 4096, at least two symbols)."""
    if kind == "skewed":  # geometric: a few symbols take most of the mass
        return rans.quantize_frequencies((2.0 ** -np.arange(12) * 1e6).astype(np.int64))
    if kind == "flat16":
        return np.full(16, 256, dtype=np.int64)
    if kind == "flat256":
        return np.full(256, 16, dtype=np.int64)
    if kind == "random256":
        counts = (rng.dirichlet(np.full(256, 0.5)) * 1e7).astype(np.int64) + 1
        return rans.quantize_frequencies(counts)
    if kind == "peak4095":  # one symbol at 4095, the last of 256 at 1: the extremes of f and c
        f = np.zeros(256, dtype=np.int64)
        f[3], f[255] = 4095, 1
        return f
    raise AssertionError(kind)


def _symbols(f: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` symbols drawn from the table's own distribution, each rare symbol at least once."""
    sym = rng.choice(f.size, size=n, p=f / f.sum()).astype(np.uint8)
    rare = np.flatnonzero(f == f[f > 0].min())
    sym[: min(n, rare.size)] = rare[: min(n, rare.size)]  # code the costliest symbols too
    return torch.from_numpy(sym)


def _sizes(chunk: int) -> list[int]:
    # 4 and 9 chunks: the compiled coder codes and decodes four whole chunks side by side.
    return [0, 1, 97, chunk - 1, chunk, chunk + 1, 3 * chunk + 17, 4 * chunk, 9 * chunk + 5]


def _roundtrip(sym: torch.Tensor, f: np.ndarray, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    words, counts = reference.rans_encode(sym, torch.from_numpy(f), chunk)
    assert words.dtype == torch.int16 and counts.dtype == torch.int64
    assert counts.numel() == -(-sym.numel() // chunk)
    assert int(counts.sum()) == words.numel() and (counts >= 2).all()
    (got,) = reference.rans_decode([reference.RansStream(words, counts, sym.numel(), f)], chunk)
    assert torch.equal(got, sym.reshape(-1))
    return words, counts


def _ideal_bound(sym: torch.Tensor, f: np.ndarray, chunk: int) -> float:
    """Ideal payload plus the state flushed per chunk (32 bits) and 16 bits of slack."""
    counts = np.bincount(sym.numpy().reshape(-1), minlength=f.size)
    return rans.coded_bits(counts, f) + 32 * -(-sym.numel() // chunk) + 16


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("chunk", [64, 4096])
@pytest.mark.parametrize("kind", TABLES)
def test_reference_round_trips(chunk, kind):
    rng = np.random.default_rng(chunk + len(kind))
    f = _freqs(kind, rng)
    for n in _sizes(chunk):
        sym = _symbols(f, n, rng)
        words, _ = _roundtrip(sym, f, chunk)
        assert words.numel() * 16 <= _ideal_bound(sym, f, chunk), (n, words.numel())


def test_reference_reads_any_shape_and_numpy_tables():
    rng = np.random.default_rng(1)
    f = _freqs("random256", rng)
    sym = _symbols(f, 6 * 50, rng)
    flat = reference.rans_encode(sym, torch.from_numpy(f), 64)
    shaped = reference.rans_encode(sym.reshape(6, 50).t(), f, 64)  # a non-contiguous view
    want = reference.rans_encode(sym.reshape(6, 50).t().contiguous().reshape(-1), f, 64)
    assert torch.equal(shaped[0], want[0]) and torch.equal(shaped[1], want[1])
    assert not torch.equal(flat[0], shaped[0])


def test_reference_decodes_many_streams_at_once():
    rng = np.random.default_rng(2)
    items, symbols = [], []
    cases = [("skewed", 200), ("flat256", 0), ("random256", 64), ("peak4095", 1), ("flat16", 129)]
    for kind, n in cases:
        f = _freqs(kind, rng)
        sym = _symbols(f, n, rng)
        items.append(reference.RansStream(*reference.rans_encode(sym, f, 64), n, f))
        symbols.append(sym)
    for got, want in zip(reference.rans_decode(items, 64), symbols, strict=True):
        assert torch.equal(got, want)


@st.composite
def _coded(draw):
    """A random table (2 to 256 symbols, some unused) and symbols drawn from it."""
    nsym = draw(st.integers(min_value=2, max_value=256))
    counts = draw(st.lists(st.integers(0, 10**6), min_size=nsym, max_size=nsym))
    counts = np.array(counts, dtype=np.int64)
    if np.count_nonzero(counts) < 2:
        counts[:2] += 1
    f = rans.quantize_frequencies(counts)
    used = np.flatnonzero(f)
    n = draw(st.integers(min_value=0, max_value=700))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):  # from the table's distribution
        sym = rng.choice(f.size, size=n, p=f / f.sum())
    else:  # uniform over the used symbols: a table that fits the data badly
        sym = rng.choice(used, size=n)
    chunk = draw(st.sampled_from([64, 128, 256]))
    return torch.from_numpy(sym.astype(np.uint8)), f, chunk


@given(_coded())
def test_reference_round_trip_property(case):
    sym, f, chunk = case
    words, _ = _roundtrip(sym, f, chunk)
    assert words.numel() * 16 <= _ideal_bound(sym, f, chunk)


def _stream(sym, f, chunk, encode=reference.rans_encode):
    words, counts = encode(sym, torch.from_numpy(f), chunk)
    return reference.RansStream(words.clone(), counts.clone(), sym.numel(), f)


def _corruptions(item: reference.RansStream):
    """(name, stream) pairs: each a corrupt variant of ``item`` (at least two chunks).

    Tensors stay on the item's device, so the GPU tests can corrupt GPU streams too.
    """
    w, c = item.words, item.chunk_words

    def variant(words=w, counts=c, numel=item.numel, freqs=item.freqs):
        return reference.RansStream(words.clone(), counts.clone(), numel, freqs)

    mid = w.clone()
    mid[w.numel() // 2] ^= 0x5A5A
    state = w.clone()
    state[int(c[0]) + 1] ^= 0x0100  # the high half of chunk 1's state
    shorter = c.clone()
    shorter[-1] -= 1  # the last chunk lost its last word: its decoding reads past the stream
    longer = c.clone()
    longer[-1] += 1
    swapped = c.clone()
    swapped[0], swapped[1] = int(c[1]) + 1, int(c[0]) - 1  # same total, wrong split
    one_word = c.clone()
    one_word[-2], one_word[-1] = 1, int(c[-2]) + int(c[-1]) - 1
    bad_freqs = item.freqs.copy()
    used = np.flatnonzero(bad_freqs)
    bad_freqs[used[0]] += 1
    bad_freqs[used[-1]] -= 1
    return [
        ("a flipped body word", variant(words=mid)),
        ("a flipped state word", variant(words=state)),
        ("a truncated stream", variant(words=w[:-1], counts=shorter)),
        ("a truncated stream, table kept", variant(words=w[:-1])),
        ("a word appended", variant(words=torch.cat([w, w[:1]]), counts=longer)),
        ("a wrong chunk split", variant(counts=swapped)),
        ("a chunk table too short", variant(counts=c[:-1])),
        ("a chunk of one word", variant(counts=one_word)),
        ("one symbol fewer", variant(numel=item.numel - 1)),
        ("a different table", variant(freqs=bad_freqs)),
        ("all words zero", variant(words=torch.zeros_like(w))),
        ("all words ones", variant(words=torch.full_like(w, -1))),
    ]


def _corrupt_item():
    rng = np.random.default_rng(5)
    f = _freqs("random256", rng)
    # Five whole chunks and a short one: the compiled decoder takes the first four side by side.
    return _stream(_symbols(f, 64 * 5 + 10, rng), f, 64)


def _flip_word(item: reference.RansStream, where: int, flip: int) -> bool:
    """XOR one word of the stream with ``flip`` (1..0xFFFF); False when it has no words."""
    if item.words.numel() == 0:
        return False
    item.words[where % item.words.numel()] ^= flip - (1 << 16 if flip >= 1 << 15 else 0)
    return True


@pytest.mark.parametrize("case", range(12))
def test_reference_rejects_corrupt_streams(case):
    name, item = _corruptions(_corrupt_item())[case]
    with pytest.raises(ValueError):
        reference.rans_decode([item], 64)


@settings(max_examples=40)
@given(_coded(), st.integers(0, 2**31 - 1), st.integers(1, 0xFFFF))
def test_reference_survives_any_flipped_word(case, where, flip):
    """A flipped word is reported or decodes to some symbols: never a crash."""
    sym, f, chunk = case
    item = _stream(sym, f, chunk)
    if not _flip_word(item, where, flip):
        return
    try:
        (got,) = reference.rans_decode([item], chunk)
    except ValueError:
        return
    assert got.numel() == sym.numel()


def test_reference_validates_arguments():
    f = np.full(16, 256, dtype=np.int64)
    sym = torch.arange(16, dtype=torch.uint8)
    for bad in BAD_TABLES:
        with pytest.raises(ValueError):
            reference.rans_encode(sym, bad, 64)
    with pytest.raises(ValueError, match="frequency 0"):
        reference.rans_encode(torch.tensor([16], dtype=torch.uint8), f, 64)
    zero = f.copy()
    zero[3], zero[4] = 0, 512
    with pytest.raises(ValueError, match="frequency 0"):
        reference.rans_encode(sym, zero, 64)
    with pytest.raises(ValueError, match="chunk_symbols"):
        reference.rans_encode(sym, f, 100)


# --------------------------------------------------------------------------- frequency tables


@given(st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=256))
def test_quantize_frequencies_properties(counts):
    f = rans.quantize_frequencies(counts)
    c = np.array(counts, dtype=np.int64)
    assert f.dtype == np.int64 and f.shape == c.shape
    assert (f[c == 0] == 0).all()
    if not c.any():
        assert not f.any()
        return
    assert int(f.sum()) == rans.PROB_SCALE
    assert (f[c > 0] >= 1).all()
    if np.count_nonzero(c) == 1:
        only = np.flatnonzero(c)[0]
        assert f[only] == rans.PROB_SCALE and rans.fill_symbol(f) == only
    # Close to proportional: no used symbol is off by more than the number of used symbols.
    ideal = c / c.sum() * rans.PROB_SCALE
    assert (np.abs(f - ideal)[c > 0] <= np.count_nonzero(c) + 1).all()


def test_tables_follow_from_frequencies():
    f = np.array([0, 3, 4093, 0], dtype=np.int64)
    assert rans.cumulative(f).tolist() == [0, 0, 3, 4096]
    slots = rans.slot_table(f)
    assert slots.dtype == np.uint8 and slots.size == rans.PROB_SCALE
    assert slots[:3].tolist() == [1, 1, 1] and (slots[3:] == 2).all()
    assert rans.PROB_BITS == reference.RANS_PROB_BITS and rans.STATE_LOW == reference.RANS_LOW


# --------------------------------------------------------------------------- compiled CPU twin


def _assert_compiled_equal(sym: torch.Tensor, f: np.ndarray, chunk: int) -> None:
    """Encode byte for byte, decode symbol for symbol, and each decodes the other's stream."""
    got = rans_cpu.rans_encode(sym, torch.from_numpy(f), chunk)
    want = reference.rans_encode(sym, torch.from_numpy(f), chunk)
    assert got[0].dtype == torch.int16 and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1]), "chunk words"
    assert torch.equal(got[0], want[0]), "stream words"
    item = reference.RansStream(want[0], want[1], sym.numel(), f)
    (decoded,) = rans_cpu.rans_decode([item], chunk)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, sym.reshape(-1))


def test_compiled_coder_builds_where_a_compiler_is():
    if rans_cpu._compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert rans_cpu.available()


needs_compiled = pytest.mark.skipif(not rans_cpu.available(), reason="no C compiler to build the CPU coder")


@needs_compiled
@pytest.mark.parametrize("chunk", [64, 4096])
@pytest.mark.parametrize("kind", TABLES)
def test_compiled_matches_reference(chunk, kind):
    rng = np.random.default_rng(chunk * 3 + len(kind))
    f = _freqs(kind, rng)
    for n in _sizes(chunk):
        _assert_compiled_equal(_symbols(f, n, rng), f, chunk)


@needs_compiled
def test_compiled_matches_reference_large():
    rng = np.random.default_rng(12)
    f = _freqs("skewed", rng)
    _assert_compiled_equal(_symbols(f, 1_000_003, rng), f, 4096)
    _assert_compiled_equal(_symbols(f, 65536 * 3 + 5, rng), f, 65536)


@needs_compiled
@given(_coded())
def test_compiled_matches_reference_property(case):
    _assert_compiled_equal(*case)


@needs_compiled
def test_compiled_reads_any_shape_and_decodes_many_streams():
    rng = np.random.default_rng(2)
    f = _freqs("random256", rng)
    _assert_compiled_equal(_symbols(f, 6 * 50, rng).reshape(6, 50).t(), f, 64)  # non-contiguous
    items, symbols = [], []
    for kind, n in [("skewed", 200), ("flat256", 0), ("random256", 64), ("peak4095", 1), ("flat16", 129)]:
        f = _freqs(kind, rng)
        sym = _symbols(f, n, rng)
        items.append(_stream(sym, f, 64))
        symbols.append(sym)
    for got, want in zip(rans_cpu.rans_decode(items, 64), symbols, strict=True):
        assert torch.equal(got, want)
    empty = [_stream(torch.zeros(0, dtype=torch.uint8), f, 64)]
    assert [t.numel() for t in rans_cpu.rans_decode(empty, 64)] == [0]


@needs_compiled
@settings(max_examples=60)
@given(_coded(), st.integers(0, 2**31 - 1), st.integers(1, 0xFFFF))
def test_compiled_decoder_agrees_on_any_flipped_word(case, where, flip):
    sym, f, chunk = case
    item = _stream(sym, f, chunk)
    if not _flip_word(item, where, flip):
        return
    try:
        (want,) = reference.rans_decode([item], chunk)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            rans_cpu.rans_decode([item], chunk)
        return
    assert torch.equal(rans_cpu.rans_decode([item], chunk)[0], want)


@needs_compiled
def test_compiled_validates_like_the_reference():
    f = np.full(16, 256, dtype=np.int64)
    sym = torch.arange(16, dtype=torch.uint8)
    zero = f.copy()
    zero[3], zero[4] = 0, 512
    cases = [(sym, bad, 64) for bad in BAD_TABLES]
    cases += [(torch.tensor([16], dtype=torch.uint8), f, 64), (sym, zero, 64), (sym, f, 100), (sym.long(), f, 64)]
    in_group = torch.arange(64 * 5) % 15
    in_group = (in_group + (in_group >= 3).long()).to(torch.uint8)  # every symbol but 3
    in_group[64 + 7] = 3  # frequency 0 under `zero`, in the second of four whole chunks
    cases.append((in_group, zero, 64))
    for args in cases:
        with pytest.raises((ValueError, TypeError)) as want:
            reference.rans_encode(*args)
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            rans_cpu.rans_encode(*args)


@needs_compiled
def test_backend_codes_cpu_streams_compiled_unless_reference_is_forced(monkeypatch):
    rng = np.random.default_rng(8)
    f = _freqs("skewed", rng)
    sym = _symbols(f, 5000, rng)
    calls = []
    for name in ("rans_encode", "rans_encode_streams", "rans_decode"):
        for module in (rans_cpu, reference):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _r=real, _m=module.__name__: calls.append(_m) or _r(*a))

    def code_and_decode():
        words, counts = backend.rans_encode(sym, torch.from_numpy(f), 4096)
        backend.rans_encode_streams(sym, [(0, 100), (100, 4900)], np.stack([f, f]), 4096)
        backend.rans_decode([reference.RansStream(words, counts, sym.numel(), f)], 4096, torch.device("cpu"))

    code_and_decode()
    assert calls == ["lctriton.kernels.rans_cpu"] * 3
    calls.clear()
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")
    code_and_decode()
    # The reference codes its two streams by two more rans_encode calls.
    assert calls == ["lctriton.kernels.reference"] * 5


@needs_compiled
@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 3 * 1024 + 17, 1 << 20])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool, torch.complex128]
)
def test_compiled_fingerprint_matches_reference(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 1e4).to(dtype) if dtype != torch.bool else torch.rand(n, generator=g) > 0.5
    assert rans_cpu.fingerprint(x) == reference.fingerprint(x)
    if n > 1:  # a strided view is read as its contiguous copy
        assert rans_cpu.fingerprint(x[::2]) == reference.fingerprint(x[::2].clone())


@needs_compiled
def test_backend_runs_fingerprints_lc_and_lq_compiled_on_cpu_unless_reference_is_forced(monkeypatch):
    from lctriton import codecs

    x = torch.rand(5000)
    plan = codecs.plan_log_buckets(reference.lc_histogram(x, None).numpy(), 2)
    lut, reps = torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives)
    names = ("fingerprint", "lc_histogram", "lq_symbols", "lq_reconstruct", "lc_symbols", "lc_reconstruct")
    calls = []
    for module in (rans_cpu, reference):
        for name in names:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _r=real, _m=module.__name__: calls.append(_m) or _r(*a))

    def run():
        sym, recon, _ = backend.lq_symbols(x, x * 0.5, 0.9, lut, reps)
        lc_sym, lc_recon, _ = backend.lc_symbols(x, x * 0.5, lut, reps)
        return (backend.fingerprint(x), backend.lc_histogram(x, x * 0.5), sym, recon,
                backend.lq_reconstruct(sym, reps, x * 0.5, 0.9, torch.float32),
                lc_sym, lc_recon, backend.lc_reconstruct(lc_sym, reps, x * 0.5, torch.float32))

    compiled = run()
    assert calls == ["lctriton.kernels.rans_cpu"] * len(names)
    calls.clear()
    monkeypatch.setenv(backend.BACKEND_ENV, "reference")
    for got, want in zip(run(), compiled, strict=True):
        assert got == want if isinstance(got, int) else torch.equal(got, want)
    assert calls == ["lctriton.kernels.reference"] * len(names)


def test_compiled_coder_builds_into_its_cache_and_falls_back_without_a_compiler(monkeypatch, tmp_path, caplog):
    if rans_cpu._compiler() is None:
        pytest.skip("no C compiler on this machine")
    rans_cpu._library.cache_clear()
    try:
        monkeypatch.setenv(rans_cpu.CACHE_ENV, str(tmp_path / "fresh"))
        assert rans_cpu.available()
        built = list((tmp_path / "fresh").iterdir())
        assert len(built) == 1 and built[0].name.startswith("rans_cpu-") and built[0].suffix == ".so"
        rans_cpu._library.cache_clear()
        monkeypatch.setenv(rans_cpu.CACHE_ENV, str(tmp_path / "broken"))
        monkeypatch.setenv("CC", "false")  # a compiler that always fails
        with caplog.at_level("WARNING", logger=rans_cpu.__name__):
            assert not rans_cpu.available()
        assert "could not build the compiled rANS coder" in caplog.text
        assert list((tmp_path / "broken").iterdir()) == []  # no half-written library left
        with pytest.raises(RuntimeError, match="unavailable"):
            rans_cpu.rans_encode(torch.zeros(4, dtype=torch.uint8), np.array([2048, 2048]), 64)
        rng = np.random.default_rng(9)
        f = _freqs("skewed", rng)
        sym = _symbols(f, 300, rng)
        words, counts = backend.rans_encode(sym, torch.from_numpy(f), 64)  # the numpy coder
        assert torch.equal(words, reference.rans_encode(sym, f, 64)[0])
    finally:
        rans_cpu._library.cache_clear()


def _streams_case(rng: np.random.Generator, sizes: list[int]):
    """A symbol tensor and spans over it, one per size, each with a table of its own (rows
    padded to 256 entries) and symbols no span covers between them."""
    parts, spans, tables, start = [], [], [], 0
    for j, n in enumerate(sizes):
        f = _freqs(TABLES[j % len(TABLES)], rng)
        parts += [torch.full((3,), 255, dtype=torch.uint8), _symbols(f, n, rng)]
        spans.append((start + 3, n))
        start += 3 + n
        tables.append(np.pad(f, (0, 256 - f.size)))
    return torch.cat(parts), spans, np.stack(tables)


def test_reference_codes_each_span_as_one_stream():
    rng = np.random.default_rng(20)
    sym, spans, tables = _streams_case(rng, _sizes(64))
    coded = reference.rans_encode_streams(sym, spans, tables, 64)
    items = [reference.RansStream(w, c, n, f) for (w, c), (_, n), f in zip(coded, spans, tables, strict=True)]
    for got, (a, n) in zip(reference.rans_decode(items, 64), spans, strict=True):
        assert torch.equal(got, sym[a : a + n])
    assert reference.rans_encode_streams(sym, [], np.zeros((0, 256), np.int64), 64) == []


@needs_compiled
@pytest.mark.parametrize("chunk", [64, 4096])
def test_compiled_streams_match_reference(chunk):
    rng = np.random.default_rng(chunk + 21)
    sym, spans, tables = _streams_case(rng, _sizes(chunk) * 2)
    got = rans_cpu.rans_encode_streams(sym, spans, torch.from_numpy(tables), chunk)
    want = reference.rans_encode_streams(sym, spans, tables, chunk)
    assert len(got) == len(want) == len(spans)
    for (w, c), (rw, rc) in zip(got, want, strict=True):
        assert w.dtype == torch.int16 and c.dtype == torch.int64
        assert torch.equal(c, rc) and torch.equal(w, rw)


def _bad_streams_args():
    """(symbols, spans, freqs) cases every coder of many streams must refuse alike."""
    f = np.full((2, 16), 256, dtype=np.int64)
    sym = torch.arange(16, dtype=torch.uint8).repeat(8)
    zero = f.copy()
    zero[1, 3], zero[1, 4] = 0, 512
    bad_row = f.copy()
    bad_row[1, 0] += 1
    return [
        (sym, [(0, 64), (100, 64)], f),  # past the end
        (sym, [(-1, 4), (0, 4)], f),  # a negative start
        (sym, [(0, 4), (4, -1)], f),  # a negative count
        (sym, [(0, 4), (4, 4, 4)], f),  # not pairs
        (sym, [(0, 64)], f),  # two tables for one span
        (sym, [(0, 64), (64, 64)], f[0]),  # one table, not one per span
        (sym, [(0, 64), (64, 64)], bad_row),  # a row not summing to 4096
        (sym, [(0, 64), (64, 64)], f.astype(np.float32)),  # not integers
        (sym, [(0, 64), (64, 64)], zero),  # symbol 3 has frequency 0 in the second stream
        (sym.long(), [(0, 64), (64, 64)], f),  # not uint8
    ]


@pytest.mark.parametrize("twin", ["triton", "compiled"])
@pytest.mark.parametrize("case", range(10))
def test_twins_refuse_bad_streams_like_the_reference(twin, case):
    if twin == "compiled" and not rans_cpu.available():
        pytest.skip("no C compiler to build the CPU coder")
    coder = tri if twin == "triton" else rans_cpu
    args = _bad_streams_args()[case]
    with pytest.raises((ValueError, TypeError)) as want:
        reference.rans_encode_streams(*args, 64)
    with pytest.raises(want.type, match=re.escape(str(want.value))):
        coder.rans_encode_streams(*args, 64)


# --------------------------------------------------------------------------- Triton twins


def _assert_encode_equal(sym, f, chunk):
    got = tri.rans_encode(sym, torch.from_numpy(f), chunk)
    want = reference.rans_encode(sym, torch.from_numpy(f), chunk)
    assert got[0].dtype == torch.int16 and got[1].dtype == torch.int64
    assert torch.equal(got[1].cpu(), want[1]), "chunk words"
    assert torch.equal(got[0].cpu(), want[0]), "stream words"
    return got, want


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize("n", [0, 1, 97, 63, 64, 65, 3 * 64 + 17])
def test_kernels_match_reference(kind, n):
    """Encode byte for byte, decode symbol for symbol, and each decodes the other's stream."""
    rng = np.random.default_rng(n * 7 + len(kind))
    f = _freqs(kind, rng)
    sym = _symbols(f, n, rng)
    (words, counts), (rwords, rcounts) = _assert_encode_equal(sym, f, 64)
    from_kernel = reference.RansStream(words, counts, n, f)
    from_reference = reference.RansStream(rwords, rcounts, n, f)
    assert torch.equal(reference.rans_decode([from_kernel], 64)[0], sym)
    (got,) = tri.rans_decode([from_reference], 64)
    assert got.dtype == torch.uint8 and got.device == rwords.device
    assert torch.equal(got, sym)


@pytest.mark.parametrize("kind", ["skewed", "random256", "peak4095"])
def test_kernels_match_reference_chunk_256(kind):
    rng = np.random.default_rng(256)
    f = _freqs(kind, rng)
    for n in [255, 256 * 2 + 1]:
        sym = _symbols(f, n, rng)
        (words, counts), _ = _assert_encode_equal(sym, f, 256)
        (got,) = tri.rans_decode([reference.RansStream(words, counts, n, f)], 256)
        assert torch.equal(got, sym)


def test_kernels_read_any_shape():
    rng = np.random.default_rng(3)
    f = _freqs("flat256", rng)
    sym = _symbols(f, 6 * 50, rng).reshape(6, 50).t()  # a non-contiguous view
    _assert_encode_equal(sym, f, 64)


@settings(max_examples=10)
@given(_coded())
def test_kernels_match_reference_property(case):
    sym, f, chunk = case
    (words, counts), _ = _assert_encode_equal(sym[:300], f, 64)
    item = reference.RansStream(words, counts, min(sym.numel(), 300), f)
    assert torch.equal(tri.rans_decode([item], 64)[0], sym[:300])


def test_kernel_decodes_many_streams():
    rng = np.random.default_rng(4)
    items, symbols = [], []
    for kind, n in [("skewed", 130), ("flat256", 0), ("peak4095", 1), ("random256", 64)]:
        f = _freqs(kind, rng)
        sym = _symbols(f, n, rng)
        items.append(_stream(sym, f, 64))
        symbols.append(sym)
    got = tri.rans_decode(items, 64)
    want = reference.rans_decode(items, 64)
    assert len(got) == len(symbols)
    for g, w, s in zip(got, want, symbols, strict=True):
        assert torch.equal(g, w) and torch.equal(g, s)
    assert all(g.device == torch.device("cpu") for g in tri.rans_decode(items, 64, device="cpu"))


def _assert_streams_equal(sym: torch.Tensor, spans, tables: np.ndarray, chunk: int) -> None:
    got = tri.rans_encode_streams(sym, spans, tables, chunk)
    want = reference.rans_encode_streams(sym.cpu(), spans, tables, chunk)
    assert len(got) == len(want) == len(spans)
    for (w, c), (rw, rc) in zip(got, want, strict=True):
        assert w.device == sym.device and w.dtype == torch.int16 and c.dtype == torch.int64
        assert torch.equal(c.cpu(), rc) and torch.equal(w.cpu(), rw)


def test_kernel_codes_many_streams_in_one_launch():
    rng = np.random.default_rng(22)
    _assert_streams_equal(*_streams_case(rng, [0, 1, 97, 64, 65, 3 * 64 + 17]), 64)
    assert tri.rans_encode_streams(torch.zeros(5, dtype=torch.uint8), [], np.zeros((0, 4), np.int64), 64) == []


@pytest.mark.parametrize("twin", ["triton", "compiled"])
@pytest.mark.parametrize("case", range(12))
def test_twins_reject_corrupt_streams(case, twin):
    """Every corruption the reference reports, the Triton and compiled decoders report alike."""
    if twin == "compiled" and not rans_cpu.available():
        pytest.skip("no C compiler to build the CPU coder")
    decode = tri.rans_decode if twin == "triton" else rans_cpu.rans_decode
    name, item = _corruptions(_corrupt_item())[case]
    with pytest.raises(ValueError) as want:
        reference.rans_decode([item], 64)
    with pytest.raises(ValueError) as got:
        decode([item], 64)
    assert str(got.value) == str(want.value), name


@settings(max_examples=12)
@given(_coded(), st.integers(0, 2**31 - 1), st.integers(1, 0xFFFF))
def test_kernel_decoder_agrees_on_any_flipped_word(case, where, flip):
    """Both decoders report the same flipped streams, and decode the others alike."""
    sym, f, _ = case
    item = _stream(sym[:200], f, 64)
    if not _flip_word(item, where, flip):
        return
    try:
        (want,) = reference.rans_decode([item], 64)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            tri.rans_decode([item], 64)
        return
    assert torch.equal(tri.rans_decode([item], 64)[0], want)


def test_kernel_encoder_validates_like_the_reference():
    f = np.full(16, 256, dtype=np.int64)
    sym = torch.arange(16, dtype=torch.uint8)
    for bad in BAD_TABLES:
        with pytest.raises(ValueError) as want:
            reference.rans_encode(sym, bad, 64)
        with pytest.raises(ValueError) as got:
            tri.rans_encode(sym, bad, 64)
        assert str(got.value) == str(want.value)
    zero = f.copy()
    zero[3], zero[4] = 0, 512
    for symbols, table in [(torch.tensor([16], dtype=torch.uint8), f), (sym, zero)]:
        with pytest.raises(ValueError, match="a symbol to code has frequency 0"):
            tri.rans_encode(symbols, table, 64)
    with pytest.raises(ValueError, match="chunk_symbols"):
        tri.rans_encode(sym, f, 100)
    with pytest.raises(TypeError, match="symbols must be a tensor"):
        tri.rans_encode(sym.numpy(), f, 64)
    with pytest.raises(TypeError, match="symbols must be uint8"):
        tri.rans_encode(sym.to(torch.int64), f, 64)
    with pytest.raises(TypeError, match="freqs must hold integers"):
        tri.rans_encode(sym, torch.from_numpy(f).double(), 64)
    with pytest.raises(TypeError, match="freqs must hold integers"):
        tri.rans_encode(sym, f.astype(np.float32), 64)


def test_kernel_decoder_validates_like_the_reference():
    rng = np.random.default_rng(6)
    f = _freqs("skewed", rng)
    item = _stream(_symbols(f, 100, rng), f, 64)
    with pytest.raises(ValueError, match="chunk_symbols"):
        tri.rans_decode([item], 96)
    single = reference.RansStream(item.words, item.chunk_words, 100, np.array([4096]))
    with pytest.raises(ValueError, match="single symbol"):
        tri.rans_decode([item, single], 64)
    wrong = reference.RansStream(item.words.to(torch.int32), item.chunk_words, 100, f)
    with pytest.raises(TypeError, match="int16"):
        tri.rans_decode([wrong], 64)


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    rng = np.random.default_rng(7)
    f = _freqs("skewed", rng)
    sym = _symbols(f, 100, rng)
    item = _stream(sym, f, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="symbols is on cpu"):
        tri.rans_encode(sym, f, 64)
    with pytest.raises(ValueError, match="decode device is on cpu"):
        tri.rans_decode([item], 64)


def test_triton_codec_exports_the_coder():
    assert triton_codec.rans_encode is tri.rans_encode
    assert triton_codec.rans_encode_streams is tri.rans_encode_streams
    assert triton_codec.rans_decode is tri.rans_decode
    assert triton_codec.RansStream is reference.RansStream
    assert {"rans_encode", "rans_encode_streams", "rans_decode", "RansStream"} <= set(triton_codec.__all__)


# --------------------------------------------------------------------------- GPU, large


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["skewed", "random256", "peak4095"])
def test_gpu_large_streams_match_reference(kind):
    rng = np.random.default_rng(11)
    f = _freqs(kind, rng)
    sym = _symbols(f, 10_000_019, rng)
    words, counts = tri.rans_encode(sym.cuda(), f, 4096)
    assert words.is_cuda and counts.is_cuda
    rwords, rcounts = reference.rans_encode(sym, f, 4096)
    assert torch.equal(counts.cpu(), rcounts) and torch.equal(words.cpu(), rwords)
    (got,) = tri.rans_decode([reference.RansStream(rwords.cuda(), rcounts, sym.numel(), f)], 4096)
    assert got.is_cuda and torch.equal(got.cpu(), sym)
    (back,) = reference.rans_decode([reference.RansStream(words, counts, sym.numel(), f)], 4096)
    assert torch.equal(back, sym)


@pytest.mark.gpu
def test_gpu_many_streams_match_reference():
    rng = np.random.default_rng(23)
    sym, spans, tables = _streams_case(rng, _sizes(4096) * 3)
    _assert_streams_equal(sym.cuda(), spans, tables, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [64, 65536])
def test_gpu_chunk_extremes_and_corruption(chunk):
    rng = np.random.default_rng(chunk)
    f = _freqs("random256", rng)
    sym = _symbols(f, 3 * chunk + 12_345, rng)
    _assert_encode_equal(sym.cuda(), f, chunk)
    item = _stream(sym.cuda(), f, chunk, encode=tri.rans_encode)
    assert torch.equal(tri.rans_decode([item], chunk)[0].cpu(), sym)
    for _name, bad in _corruptions(item):
        with pytest.raises(ValueError):
            tri.rans_decode([bad], chunk)
