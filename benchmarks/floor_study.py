"""What ``delta_floor`` costs a restored model: ratio against the restored model's test loss.

A floor drops every weight change smaller than ``2**-delta_floor`` of the tensor's typical
magnitude; closed loop, the change waits in the next delta until it passes the floor. The
restored model is then a little behind the saved one, by at most the floor per element. Where
the steps are large beside the weights (training from scratch) that is noise; where they are
small (fine-tuning a pretrained model) it is lag in the direction the run moves, and a restored
model evaluates worse than the one that was saved.

This study trains a workload, takes ``--checkpoints`` consecutive model checkpoints
``--between`` steps apart after ``--warmup`` steps (a key, then deltas against the previous
reconstruction, as ``bench_codec.py`` does) and, for each floor, records the chain's ratio over
the weights and the test loss and accuracy of every restored checkpoint next to the original's.
Usage::

    python benchmarks/floor_study.py --workload minilm --floors none 12 10 9 8 --out floor-minilm-cpu

writes ``benchmarks/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import lctriton
from lctriton import examples

WORKLOADS = {"digits": examples.digits_cnn, "minilm": examples.minilm_docstrings}


def _floor(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _evaluate(work: examples.Workload, state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Test loss and accuracy of ``state`` loaded into the workload's model (restored after)."""
    saved = {k: v.clone() for k, v in work.model.state_dict().items()}
    work.model.load_state_dict(state)
    try:
        return work.evaluate(work.model)
    finally:
        work.model.load_state_dict(saved)


def study(
    workload: str, floors: list[int | None], checkpoints: int, between: int, warmup: int, seed: int
) -> dict[str, Any]:
    """The chain of every floor over one trajectory; see the module docstring."""
    work = WORKLOADS[workload](seed)
    states = examples.trajectory(work, checkpoints, between, warmup_steps=warmup)
    raw = sum(t.numel() * t.element_size() for t in states[0].values() if t.is_floating_point())
    original = [_evaluate(work, s) for s in states[1:]]
    rows = []
    for floor in floors:
        _, base = lctriton.compress(states[0], return_reconstruction=True, delta_floor=floor)
        nbytes, restored = 0, []
        for state in states[1:]:
            compressed, base = lctriton.compress(state, base=base, return_reconstruction=True, delta_floor=floor)
            nbytes += compressed.nbytes
            restored.append(_evaluate(work, base))
        rows.append({
            "delta_floor": floor,
            "ratio": raw * (len(states) - 1) / nbytes,
            "test_loss": [loss for loss, _ in restored],
            "test_acc": [acc for _, acc in restored],
        })
    return {
        "workload": work.name,
        "checkpoints": checkpoints,
        "steps_between": between,
        "warmup_steps": warmup,
        "seed": seed,
        "original": {"test_loss": [loss for loss, _ in original], "test_acc": [acc for _, acc in original]},
        "floors": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="minilm")
    parser.add_argument("--floors", type=_floor, nargs="+", default=[None, 12, 10, 9, 8],
                        help="delta_floor values, 'none' for no floor")
    parser.add_argument("--checkpoints", type=int, default=4, help="a key and this many minus one deltas")
    parser.add_argument("--between", type=int, default=1, help="steps between the checkpoints")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the first checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results name under benchmarks/results/ (JSON)")
    args = parser.parse_args()
    started = time.time()
    result = study(args.workload, args.floors, args.checkpoints, args.between, args.warmup, args.seed)
    losses = ", ".join(f"{x:.4f}" for x in result["original"]["test_loss"])
    print(f"{result['workload']}: original test loss {losses}")
    for row in result["floors"]:
        losses = ", ".join(f"{x:.4f}" for x in row["test_loss"])
        print(f"  delta_floor={row['delta_floor']}: {row['ratio']:.1f}x, restored test loss {losses}")
    if args.out:
        from fidelity import write_study  # the harness's record of platform, versions and commit

        floors = " ".join("none" if f is None else str(f) for f in args.floors)
        command = (f"python3 benchmarks/floor_study.py --workload {args.workload} --floors {floors} "
                   f"--checkpoints {args.checkpoints} --between {args.between} --warmup {args.warmup} "
                   f"--seed {args.seed} --out {args.out}")
        print(f"wrote {write_study(args.out, 'floor_study', command, started, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
