"""How much of a weight delta's symbols the base's Adam moments predict.

A delta's symbols (``lc/1``/``lc/2``: sign and exponent bucket of ``x - base``) are coded with
one frequency table per tensor, so they cost their order-0 entropy. Adam moves a weight by
``-lr * m / (sqrt(v) + eps)``, and the base checkpoint already holds ``m`` and ``v`` from the
step before: the sign of the delta follows the sign of ``m``, its size the ratio
``|m| / sqrt(v)``. This study trains a workload, takes consecutive checkpoints ``K`` steps
apart, codes each weight delta's symbols at the default bucket plan and reports, over all
parameters with optimizer state, the empirical entropy per element:

* ``h0``: one table per tensor (what ``lc/2`` spends, less the table and rANS overheads);
* ``h_sign``: one table per sign of the base's ``m`` (negative, positive, zero);
* ``h_sign_ratio``: one table per sign of ``m`` and octave of ``|m| / (sqrt(v) + 1e-8)``
  (16 octaves: 48 contexts).

A context-coded ``lc`` codec would read the two moments from the base the decoder already
has; the figures bound what it could save (tables excluded). Usage::

    python benchmarks/context_study.py --workload minilm --between 1 20 --out context-minilm-cpu

writes ``benchmarks/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lctriton import backend, codecs, examples

WORKLOADS = {"digits": (examples.digits_cnn, 200), "minilm": (examples.minilm_docstrings, 20)}
#: Octaves of |m| / sqrt(v) told apart, from 2**-8 up; smaller and larger ratios share the ends.
OCTAVES = 16
_EPS = 1e-8


def entropy_bits(counts: np.ndarray) -> float:
    """Total bits of coding these counts with their own distribution: ``-sum(c * log2(c / n))``."""
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def conditional_bits(symbols: np.ndarray, contexts: np.ndarray, ncontexts: int) -> float:
    """Total bits with one distribution per context."""
    k = int(symbols.max()) + 1 if symbols.size else 1
    table = np.bincount(contexts * k + symbols, minlength=ncontexts * k).reshape(ncontexts, k)
    return sum(entropy_bits(row) for row in table)


def moment_contexts(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sign context in 0..2, sign x octave context in 0..3 * OCTAVES - 1) per element."""
    sign = np.where(m > 0, 1, np.where(m < 0, 0, 2)).astype(np.int64)
    ratio = np.abs(m.astype(np.float64)) / (np.sqrt(v.astype(np.float64)) + _EPS)
    with np.errstate(divide="ignore"):
        octave = np.floor(np.log2(ratio))
    octave = np.clip(np.nan_to_num(octave, neginf=-OCTAVES), -8, OCTAVES - 9).astype(np.int64) + 8
    return sign, sign * OCTAVES + octave


def delta_symbols(x: torch.Tensor, base: torch.Tensor, bits: int) -> np.ndarray:
    """The symbols ``lc/1`` codes for ``x`` against ``base`` at ``bits`` (the pipeline's plan)."""
    plan = codecs.plan_buckets(backend.lc_histogram(x, base).cpu().numpy(), bits)
    symbols, _, _ = backend.lc_symbols(
        x, base, torch.from_numpy(plan.key_to_symbol), torch.from_numpy(plan.representatives)
    )
    return symbols.cpu().numpy().astype(np.int64)


def study(workload: str, between: int, bits: int, seed: int) -> dict:
    factory, warmup = WORKLOADS[workload]
    torch.manual_seed(seed)
    work = factory(seed)
    for _ in range(warmup):
        work.train_step()
    # The live optimizer maps each parameter to its moments (a state dict numbers them only).
    params = [p for group in work.optimizer.param_groups for p in group["params"]]
    before = {id(p): p.detach().clone() for p in params}
    state = {id(p): {k: v.clone() for k, v in work.optimizer.state[p].items()} for p in params if p in work.optimizer.state}
    for _ in range(between):
        work.train_step()
    totals = {"elements": 0, "h0": 0.0, "h_sign": 0.0, "h_sign_ratio": 0.0}
    for p in params:
        if id(p) not in state or p.numel() < 1024 or "exp_avg" not in state[id(p)]:
            continue
        symbols = delta_symbols(p.detach(), before[id(p)], bits)
        sign, both = moment_contexts(
            state[id(p)]["exp_avg"].reshape(-1).numpy(), state[id(p)]["exp_avg_sq"].reshape(-1).numpy()
        )
        totals["elements"] += symbols.size
        totals["h0"] += entropy_bits(np.bincount(symbols))
        totals["h_sign"] += conditional_bits(symbols, sign, 3)
        totals["h_sign_ratio"] += conditional_bits(symbols, both, 3 * OCTAVES)
    n = max(totals["elements"], 1)
    return {
        "workload": workload,
        "steps_between": between,
        "bits": bits,
        "elements": totals["elements"],
        "bits_per_element": {k: totals[k] / n for k in ("h0", "h_sign", "h_sign_ratio")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--between", type=int, nargs="+", default=[1, 20], help="steps between the checkpoints")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results name under benchmarks/results/ (JSON)")
    args = parser.parse_args()
    started = time.time()
    rows = [study(args.workload, k, args.bits, args.seed) for k in args.between]
    for r in rows:
        b = r["bits_per_element"]
        print(f"{r['workload']} K={r['steps_between']}: {b['h0']:.3f} bits/element with one table, "
              f"{b['h_sign']:.3f} given sign(m), {b['h_sign_ratio']:.3f} given sign(m) and |m|/sqrt(v)")
    if args.out:
        from fidelity import write_study  # the harness's record of platform, versions and commit

        command = "python3 benchmarks/context_study.py " + " ".join(
            [f"--workload {args.workload}", "--between", *map(str, args.between), f"--bits {args.bits}",
             f"--seed {args.seed}", f"--out {args.out}"])
        print(f"wrote {write_study(args.out, 'context_study', command, started, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
