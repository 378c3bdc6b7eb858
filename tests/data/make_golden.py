"""Write the golden container ``golden_v1.lct`` and its expected decode ``golden_v1.json``.

    python3 tests/data/make_golden.py          # golden_v1 (lc/1, raw/1)
    python3 tests/data/make_golden.py --rans     # golden_rans_v1 (lc/2, lq/1, bp/1)
    python3 tests/data/make_golden.py --context  # golden_context_v2 (lc/3, lq/2)
    python3 tests/data/make_golden.py --scaled   # golden_scaled_v1 (sq/1)
    python3 tests/data/make_golden.py --scaled-context  # golden_scaled_context_v1 (sq/2, lq/2)
    python3 tests/data/make_golden.py --v2       # golden_v2 (golden_v1's state, container 2.0)

The state is built from integer formulas only (no RNG), so it is the same on every machine.
``tests/test_format.py`` rebuilds it with :func:`golden_state` and checks that compressing
it with :data:`OPTIONS` reproduces ``golden_v1.lct`` byte for byte, and that decoding the
stored file restores the values pinned in ``golden_v1.json`` bit for bit.

CHANGING THE BYTES OF golden_v1.lct MEANS BUMPING THE FORMAT VERSION: a reader of format 1.x
must keep reading every file that was ever written as 1.x. Regenerate only when the change
is intended, and then write the next version's file alongside (keeping v1 and its test).

The codec golden files (``golden_rans_v1`` and the others) are container 1.0 files: they pin
their codecs' bytes, which are the same in both container versions, and the writer still
reproduces them with ``format_version=1``. ``golden_v2.lct`` is the container 2.0 file of
golden_v1's state: the same header but for the major, the same sections, and the same index
text deflated. zlib builds may deflate the same text to other bytes, so
``golden_v2.json`` records the zlib version that wrote it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import sys
import zlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN_LCT = HERE / "golden_v1.lct"
GOLDEN_JSON = HERE / "golden_v1.json"
#: The rANS-coded codecs (lc/2, lq/1, bp/1), pinned in their own file.
GOLDEN_RANS_LCT = HERE / "golden_rans_v1.lct"
#: lc/3 and lq/2. (golden_context_v1, written before lq/2 existed, holds lc/3 and lq/1; the
#: same options now code its second moment with lq/2. It stays as a file to read.)
GOLDEN_CONTEXT_LCT = HERE / "golden_context_v2.lct"
GOLDEN_CONTEXT_JSON = HERE / "golden_context_v2.json"
GOLDEN_RANS_JSON = HERE / "golden_rans_v1.json"
#: sq/1 (Adam first moments in units of sqrt(v)) and the lq/1 second moment it reads.
GOLDEN_SCALED_LCT = HERE / "golden_scaled_v1.lct"
GOLDEN_SCALED_JSON = HERE / "golden_scaled_v1.json"
#: sq/2 (sq/1's levels grouped by the base's moments), with lq/2 for the second moment.
GOLDEN_SCALED_CONTEXT_LCT = HERE / "golden_scaled_context_v1.lct"
GOLDEN_SCALED_CONTEXT_JSON = HERE / "golden_scaled_context_v1.json"
#: Container 2.0 (deflated index) of golden_v1's state.
GOLDEN_V2_LCT = HERE / "golden_v2.lct"
GOLDEN_V2_JSON = HERE / "golden_v2.json"

#: Fixed codec options of the golden file (every option spelled out, defaults included).
#: The v1 file predates rANS, log-coded moments, byte planes and the delta floor: those are
#: pinned off.
OPTIONS = dict(bits=3, chunk_symbols=256, min_numel=1024, lossless=False, lossless_key=True, exact=(),
               coder="huffman", moments="lossy", code_exact=False, delta_floor=None)

#: Dotted names of the tensors the golden file codes lossily (``lc/1``).
LOSSY = ("model.fc.weight", "model.emb.weight", "model.fill")


def _f32_bits(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(torch.int32).view(torch.float32)


def golden_state() -> tuple[dict, dict]:
    """The golden state and its base, from integer formulas only.

    Returns:
        ``(state, base)``: the base holds the same-named tensors the lossy ones are deltas of.
    """
    i = torch.arange(1024, dtype=torch.int64)
    # float32 [32, 32]: base in sixteenths, delta spread over several exponents.
    base_w = (((i * 37) % 33) - 16).to(torch.float32) / 16
    delta_w = (((i * 11) % 13) - 6).to(torch.float32) / 64 + ((i % 7) - 3).to(torch.float32) / 1024
    w = base_w + delta_w
    w[5] = float("inf")  # non-finite values are stored exactly: exceptions
    w[700] = _f32_bits([0x7FC00123])[0]  # a NaN with a payload
    w[1000] = float("-inf")
    # bfloat16 [16, 64]: a delta against a bf16 base.
    base_e = ((((i * 5) % 29) - 14).to(torch.float32) / 8).to(torch.bfloat16)
    e = (base_e.to(torch.float32) + (((i * 3) % 9) - 4).to(torch.float32) / 32).to(torch.bfloat16)
    # float32 [1024] whose delta is one value everywhere: a fill (no stream).
    base_f = ((i % 10) - 5).to(torch.float32) / 4
    fill = base_f + 0.75
    state = {
        "model": collections.OrderedDict(
            [
                ("fc.weight", w.reshape(32, 32)),
                ("fc.bias", torch.tensor([0.5, -0.0, 1.0e-3, -2.25, 3.0e38], dtype=torch.float32)),
                ("emb.weight", e.reshape(16, 64)),
                ("fill", fill),
                ("codes", torch.tensor([[0, -1, 2**40], [7, -(2**62), 3]], dtype=torch.int64)),
            ]
        ),
        "table": np.arange(6, dtype=np.int16).reshape(2, 3) - 2,
        "step": 1234,
        "meta": {
            "lr": 1.0e-3,
            "neg_zero": -0.0,
            "name": "golden ü",
            "blob": b"\x00\x01LCT\xff",
            "flags": [True, False, None],
            "shape": (2, 3),
            "size": torch.Size([4, 5]),
            "dtype": torch.bfloat16,
            7: "int key",
            ("a", 1): "tuple key",
            "nested": [(1, "a", [2.5, {"k": []}]), {}],
        },
    }
    base = {
        "model": {
            "fc.weight": base_w.reshape(32, 32),
            "emb.weight": base_e.reshape(16, 64),
            "fill": base_f,
        }
    }
    return state, base


#: Options of the rANS golden file, every one spelled out.
RANS_OPTIONS = dict(bits=3, chunk_symbols=256, min_numel=1024, lossless=False, lossless_key=True, exact=(),
                    coder="auto", moments="log", moment_precision=1, code_exact=True, delta_floor=None)


def golden_rans_state() -> tuple[dict, dict]:
    """A state and base, from integer formulas only, that use lc/2, lq/1 and bp/1.

    Returns:
        ``(state, base)``.
    """
    i = torch.arange(4096, dtype=torch.int64)
    base_w = (((i * 37) % 33) - 16).to(torch.float32) / 16
    # One element in 32 changes: the delta's symbols are mostly 0, which rANS codes in
    # well under one bit each (lc/2).
    w = base_w + ((i % 32) == 3).to(torch.float32) * ((((i * 7) % 5) - 2).to(torch.float32) / 64)
    w[100] = float("nan")  # an exception
    # Adam moments over many octaves, a decay of 0.9 / 0.999 over 2 steps (lq/1).
    m_base = ((((i * 13) % 17) - 8).to(torch.float32)) * torch.pow(2.0, -((i % 20) + 4).to(torch.float32))
    v_base = torch.pow(2.0, -((i * 5) % 30 + 10).to(torch.float32))
    v_base[::9] = 0.0
    touched = (i % 4) == 0
    m = m_base * 0.81 + touched.to(torch.float32) * torch.pow(2.0, -((i % 11) + 6).to(torch.float32))
    v = v_base * 0.998001 + touched.to(torch.float32) * torch.pow(2.0, -((i % 23) + 12).to(torch.float32))
    codes = (i * 2654435761) % 1000  # integers: byte planes (bp/1), XOR against the base
    opt = {
        "state": {0: {"step": torch.tensor(7.0), "exp_avg": m, "exp_avg_sq": v}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    base_opt = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": m_base, "exp_avg_sq": v_base}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    base_codes = codes.clone()
    base_codes[::5] += 3
    state = {"model": {"w": w.reshape(64, 64), "codes": codes}, "optimizer": opt}
    base = {"model": {"w": base_w.reshape(64, 64), "codes": base_codes}, "optimizer": base_opt}
    return state, base


#: Options of the context golden file: the rANS file's, with context coding asked for.
CONTEXT_OPTIONS = dict(RANS_OPTIONS, coder="context")


def golden_context_state() -> tuple[dict, dict]:
    """A state and base, from integer formulas only, whose weight delta is coded with lc/3
    (the weight moves against the base's first moment, as Adam moves it) and whose second
    moment is coded with lq/2 (its bins follow its base's binades).

    Returns:
        ``(state, base)``.
    """
    i = torch.arange(4096, dtype=torch.int64)
    base_w = (((i * 37) % 33) - 16).to(torch.float32) / 16
    m_base = ((((i * 13) % 17) - 8).to(torch.float32)) * torch.pow(2.0, -((i % 7) + 8).to(torch.float32))
    v_base = torch.pow(2.0, -((i * 5) % 9 + 14).to(torch.float32))
    step = -torch.sign(m_base) * torch.pow(2.0, -((i % 5) + 8).to(torch.float32))
    m = m_base * 0.9 + step * 2.0**-4
    v = v_base * 0.999
    opt = {
        "state": {0: {"step": torch.tensor(6.0), "exp_avg": m.reshape(64, 64), "exp_avg_sq": v.reshape(64, 64)}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    base_opt = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": m_base.reshape(64, 64), "exp_avg_sq": v_base.reshape(64, 64)}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    state = {"model": {"w": (base_w + step).reshape(64, 64)}, "optimizer": opt}
    base = {"model": {"w": base_w.reshape(64, 64)}, "optimizer": base_opt}
    return state, base


#: Options of the scaled golden file: the rANS file's, with first moments in sq/1 and the
#: coder that keeps sq/1 and lq/1 ("auto" wrote the file before it took lq/2 where that pays).
SCALED_OPTIONS = dict(RANS_OPTIONS, coder="rans", moments="scaled", moment_precision=0, scaled_precision=2)
#: The same with every coder grouped by contexts: sq/2 and lq/2.
SCALED_CONTEXT_OPTIONS = dict(SCALED_OPTIONS, coder="context")


def golden_scaled_state() -> tuple[dict, dict]:
    """A state and base, from integer formulas only, whose Adam first moment is coded with
    sq/1 against the second moment beside it (itself lq/1): levels of both signs over a wide
    range of magnitudes, elements never stepped (m = v = 0), a base holding -0.0, a value
    past the reach (an exception) and one whose second moment is zero (another).

    Returns:
        ``(state, base)``.
    """
    i = torch.arange(4096, dtype=torch.int64)
    v = torch.pow(2.0, -((i * 5) % 24 + 12).to(torch.float32))
    unit = torch.sqrt(v.double()).float()
    level = (((i * 11) % 23) - 11).to(torch.float32) / 4  # -2.75 .. 2.75 units of sqrt(v)
    m_base = ((((i * 13) % 17) - 8).to(torch.float32)) * unit / 8
    m = m_base * 0.9 + level * unit + ((i % 7) - 3).to(torch.float32) * unit / 64
    never = (i % 31) == 0
    m[never], v[never], m_base[never] = 0.0, 0.0, 0.0
    m_base[(i % 29) == 1] = -0.0
    m[5] = 1000.0 * unit[5]  # past the reach
    v[6], m[6] = 0.0, 1e-3  # nothing to scale by
    v_base = v * 1.001
    opt = {
        "state": {0: {"step": torch.tensor(9.0), "exp_avg": m.reshape(64, 64), "exp_avg_sq": v.reshape(64, 64)}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    base_opt = {
        "state": {0: {"step": torch.tensor(8.0), "exp_avg": m_base.reshape(64, 64),
                      "exp_avg_sq": v_base.reshape(64, 64)}},
        "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 1e-3}],
    }
    return {"optimizer": opt}, {"optimizer": base_opt}


def tensor_digest(t: torch.Tensor | np.ndarray) -> dict:
    """dtype, shape and SHA-256 of the little-endian bytes of a tensor or array."""
    if isinstance(t, np.ndarray):
        data = np.ascontiguousarray(t).tobytes()
        return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}
    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {
        "dtype": str(t.dtype).replace("torch.", ""),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def expected_digests(decoded: dict) -> dict:
    """The digest of every tensor and array of a decoded golden state, by dotted name."""
    out = {f"model.{k}": tensor_digest(v) for k, v in decoded["model"].items()}
    out["table"] = tensor_digest(decoded["table"])
    return out


def _write_codec_golden(lctriton, state_fn, options: dict, lct: pathlib.Path, js: pathlib.Path, codecs_pinned: str) -> None:
    state, base = state_fn()
    compressed, reconstruction = lctriton.compress(state, base, return_reconstruction=True, **options)
    data = compressed.to_bytes(format_version=1)
    decoded = lctriton.decompress(data, base=base)
    flat = lctriton.pipeline.flatten_tensors
    digests = {k: tensor_digest(v) for k, v in flat(decoded).items()}
    assert digests == {k: tensor_digest(v) for k, v in flat(reconstruction).items()}
    lct.write_bytes(data)
    info = {
        "comment": f"Expected decode of {lct.name} (see make_golden.py). Its bytes pin the "
        f"codecs {codecs_pinned}.",
        "format_version": "1.0",
        "nbytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "codecs": {rec["name"]: rec["codec"] for rec in compressed.index["tensors"]},
        "tensors": digests,
    }
    js.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"wrote {lct} ({len(data)} bytes) and {js}")


def main() -> int:
    sys.path.insert(0, str(HERE.parent.parent))
    import lctriton

    if "--rans" in sys.argv:
        _write_codec_golden(lctriton, golden_rans_state, RANS_OPTIONS, GOLDEN_RANS_LCT, GOLDEN_RANS_JSON,
                            "lc/2, lq/1 and bp/1")
        return 0
    if "--scaled-context" in sys.argv:
        _write_codec_golden(lctriton, golden_scaled_state, SCALED_CONTEXT_OPTIONS, GOLDEN_SCALED_CONTEXT_LCT,
                            GOLDEN_SCALED_CONTEXT_JSON, "sq/2 (with lq/2 for its second moment)")
        return 0
    if "--scaled" in sys.argv:
        _write_codec_golden(lctriton, golden_scaled_state, SCALED_OPTIONS, GOLDEN_SCALED_LCT,
                            GOLDEN_SCALED_JSON, "sq/1 (with lq/1 for its second moment)")
        return 0
    if "--context" in sys.argv:
        _write_codec_golden(lctriton, golden_context_state, CONTEXT_OPTIONS, GOLDEN_CONTEXT_LCT,
                            GOLDEN_CONTEXT_JSON, "lc/3 and lq/2")
        return 0
    state, base = golden_state()
    compressed, reconstruction = lctriton.compress(state, base, return_reconstruction=True, **OPTIONS)
    version = 2 if "--v2" in sys.argv else 1
    data = compressed.to_bytes(format_version=version)
    decoded = lctriton.decompress(data, base=base)
    assert expected_digests(decoded) == expected_digests(reconstruction)
    lct, js = (GOLDEN_V2_LCT, GOLDEN_V2_JSON) if version == 2 else (GOLDEN_LCT, GOLDEN_JSON)
    lct.write_bytes(data)
    info = {
        "comment": f"Expected decode of {lct.name} (see make_golden.py)"
        + (": golden_v1's state in container format 2.0" if version == 2 else "")
        + f". Changing {lct.name} means bumping the format version.",
        "format_version": f"{version}.0",
        "nbytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "codecs": {rec["name"]: rec["codec"] for rec in compressed.index["tensors"]},
        "tensors": expected_digests(decoded),
    }
    if version == 2:  # zlib builds may deflate the same index to other bytes
        info["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    js.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"wrote {lct} ({len(data)} bytes) and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
