"""The ``lctriton`` command: compress, decompress, inspect and demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import lctriton
from lctriton import api
from lctriton import format as fmt
from lctriton.config import CodecOptions
from lctriton.errors import LctError

__all__ = ["main"]

_DESCRIPTION = """\
Small, cheap PyTorch training checkpoints.

A key checkpoint stores the state exactly. A delta checkpoint stores only what changed
since its base (the state the previous checkpoint restores to), in a few bits per value:
pass the previous checkpoint with --base. Files never contain pickled code.
"""

_EXAMPLES = """\
examples:
  lctriton compress step100.pt step100.lct                       # key checkpoint (lossless)
  lctriton compress step200.pt step200.lct --base step100.lct    # delta against it
  lctriton decompress step200.lct restored.pt --base step100.lct
  lctriton inspect step200.lct
  lctriton convert step200.lct old-reader.lct --format-version 1  # for readers before format 2
  lctriton demo
"""


class _Bar:
    """A tqdm progress bar fed by the library's (done, total) callbacks."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_state(path: str) -> Any:
    """A state from a torch checkpoint (read with weights_only=True) or a .safetensors file."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(
                "error: reading .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign input
        raise SystemExit(f"error: cannot read {path!r} as a PyTorch checkpoint: {exc}") from None


def _write_state(path: str, state: Any) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)


def _resolve_base(bases: Sequence[str] | None, show_progress: bool) -> Any:
    """The state the given chain restores to: a plain checkpoint, or .lct files key first."""
    if not bases:
        return None
    state = None
    for path in bases:
        if path.endswith(".lct"):
            bar = _Bar(f"restoring {os.path.basename(path)}", show_progress)
            try:
                state = api.load(path, base=state, progress=bar)
            finally:
                bar.close()
        else:
            if state is not None:
                raise SystemExit(f"error: --base {path!r}: only the first base can be a plain checkpoint")
            state = _read_state(path)
    return state


def _delta_floor(text: str) -> int | None:
    """``--delta-floor``'s value: an int, or ``none`` for no floor (the range is the codec's
    to check, with its message)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {text!r}") from None


def _cmd_compress(args: argparse.Namespace) -> int:
    state = _read_state(args.input)
    base = _resolve_base(args.base, args.progress)
    options: dict[str, Any] = {"bits": args.bits, "lossless": args.lossless, "lossless_key": not args.lossy_key,
                               "delta_floor": args.delta_floor}
    if args.exact:
        options["exact"] = tuple(args.exact)
    bar = _Bar("compressing", args.progress)
    try:
        compressed = api.save(args.output, state, base=base, progress=bar,
                              format_version=args.format_version, **options)
    finally:
        bar.close()
    written = os.path.getsize(args.output)
    print(
        f"{args.output}: {compressed.raw_nbytes:,} -> {written:,} bytes "
        f"({compressed.raw_nbytes / written:.1f}x, {'delta' if base is not None else 'key'})"
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    container = fmt.open_container(args.input)  # memory-mapped: the sections are streamed
    try:
        # Every section's checksum is verified before a byte is written.
        written = api.write_atomic(args.output, lambda f: fmt.rewrite_container(container, f, args.format_version))
        codecs_used = sorted({rec.get("codec") for rec in container.index.get("tensors", [])} - {None})
        print(f"{args.output}: format {args.format_version}.0, {written:,} bytes "
              f"(was {'.'.join(map(str, container.version))}, {container.size:,} bytes); "
              f"codecs {', '.join(codecs_used) or 'none'} (a reader must know each)")
    finally:
        container.close()
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    base = _resolve_base(args.base, args.progress)
    bar = _Bar("decompressing", args.progress)
    try:
        state = api.load(args.input, base=base, progress=bar)
    finally:
        bar.close()
    _write_state(args.output, state)
    print(f"{args.output}: written")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = api.inspect(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kind = "delta" if info["delta"] else "key"
    print(f"{args.file}: lctriton format {info['version']}, {kind} checkpoint, "
          f"{info['raw_nbytes']:,} -> {info['nbytes']:,} bytes ({info['ratio']:.1f}x)")
    width = max([len(t["name"]) for t in info["tensors"]] + [6])
    print(f"{'tensor':<{width}} {'dtype':<9} {'shape':<18} {'codec':<6} {'raw':>12} {'stored':>12} "
          f"{'ratio':>8} {'error bound':>11}")
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        bound = f"{t['error_bound']:.3g}" if t["error_bound"] else "exact"
        print(f"{t['name']:<{width}} {t['dtype']:<9} {shape:<18} {t['codec']:<6} {t['raw_nbytes']:>12,} "
              f"{t['stored_nbytes']:>12,} {t['ratio']:>7.1f}x {bound:>11}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lctriton import demo

    fail_at = demo.check_options(args.checkpoints, args.interval,
                                 -1 if args.fail_at is None else args.fail_at)
    out_dir = args.out or tempfile.mkdtemp(prefix="lctriton-demo-")
    print(f"Training a CNN on scikit-learn's handwritten digits for "
          f"{args.checkpoints * args.interval} steps; checkpoints in {out_dir}")
    print(f"Every {args.interval} steps a CheckpointManager saves the whole training state (model, "
          f"Adam, step, RNG)\nin the background, deltas at {args.bits} bits per value, tagged "
          f"'{demo.CLEAN_TAG}' while the loss is healthy.")
    if fail_at:
        print(f"At step {fail_at} a corrupted batch (NaN pixels) sends the loss to NaN:\nthe run "
              f"rolls back to the '{demo.CLEAN_TAG}' checkpoint and goes on.")
    print()
    result = demo.run_demo(out_dir, checkpoints=args.checkpoints, interval=args.interval,
                           fail_at=fail_at, seed=args.seed, bits=args.bits, make_plot=args.plot,
                           progress=args.progress)
    print(demo.format_table(result))
    print("\nstall: how long manager.save blocked the loop; bg: compressing and writing it in the "
          "background;\nrestored: test accuracy after a fresh manager restores the checkpoint "
          "(its chain from the key).\n")
    print(demo.format_summary(result))
    return 0


def _cmd_schedule_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from lctriton import schedule

    trace = None
    if args.failure_trace:
        trace = [float(tok) for line in Path(args.failure_trace).read_text().splitlines()
                 for tok in line.split("#")[0].replace(",", " ").split()]
    mtbf = (float(np.mean(np.diff([0.0] + trace))) if trace
            else schedule._check_positive("--mtbf-hours", args.mtbf_hours) * 3600)
    if args.loss_log:
        # One loss per line, or "step loss" pairs; interpolated onto steps 1..N.
        rows = [[float(t) for t in line.replace(",", " ").split()]
                for line in Path(args.loss_log).read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        if not rows:
            raise ValueError(f"--loss-log {args.loss_log}: no losses")
        xs = [r[0] if len(r) > 1 else i + 1 for i, r in enumerate(rows)]
        ys = [r[-1] for r in rows]
        curve = np.interp(np.arange(1, args.steps + 1), xs, ys)
        label = f"log {args.loss_log}"
    else:
        spec = args.loss_curve or f"exp:0.1,2.0,{5.0 / args.steps:g}"
        kind, _, params = spec.partition(":")
        try:
            a, b, c = (float(v) for v in params.split(","))
        except ValueError:
            raise ValueError(f"--loss-curve must be exp:a,b,c, got {spec!r}") from None
        if kind != "exp":
            raise ValueError(f"--loss-curve must be exp:a,b,c, got {spec!r}")
        curve = a + b * np.exp(-c * np.arange(1, args.steps + 1))
        label = f"{a:g} + {b:g}·exp(-{c:g}·step)"
    every = args.every or max(1, args.steps // 20)
    policies = [
        schedule.EveryNSteps(every),
        schedule.EveryTSeconds(args.every_seconds),
        schedule.YoungDaly(mtbf, formula="young"),
        schedule.YoungDaly(mtbf, restart_seconds=args.restart_seconds),
        schedule.Adaptive(args.budget),
        schedule.ConvergenceAware(args.quantum, mtbf_seconds=mtbf),
    ]
    results = schedule.simulate(
        policies, steps=args.steps, step_seconds=args.step_seconds,
        checkpoint_seconds=args.checkpoint_seconds,
        mtbf_seconds=None if trace else mtbf, failure_trace=trace, loss_curve=curve,
        restart_seconds=args.restart_seconds, trials=args.trials, seed=args.seed)
    useful = args.steps * args.step_seconds
    print(f"{args.steps} steps x {args.step_seconds:g} s = {useful / 3600:.3f} h of compute; "
          f"checkpoint {args.checkpoint_seconds:g} s; "
          + (f"failure trace {args.failure_trace} (mean gap {mtbf / 3600:.2f} h)" if trace
             else f"MTBF {mtbf / 3600:g} h")
          + f"; loss {label}; {args.trials} trials, seed {args.seed}")
    print(f"Daly's interval: {schedule.daly_interval(args.checkpoint_seconds, mtbf):.0f} s, "
          f"Young's: {schedule.young_interval(args.checkpoint_seconds, mtbf):.0f} s\n")
    print(schedule.format_results(results))
    if args.plot:
        path = schedule.plot_simulation(results, args.plot, steps=args.steps, loss_curve=curve)
        print(f"\nplot: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lctriton`` command."""
    parser = argparse.ArgumentParser(
        prog="lctriton", description=_DESCRIPTION, epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lctriton {lctriton.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def progress_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       help="do not show progress bars")

    def format_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format-version", type=int, choices=[1, 2], default=2,
                       help="container format: 2 (default) deflates the index; 1 is read by "
                            "readers from before format 2 too, where they know every codec "
                            "the file uses ('lctriton inspect' lists them)")

    base_help = ("the base: a plain checkpoint, or the .lct chain this delta follows, key first "
                 "(repeat --base for each file)")
    p = sub.add_parser("compress", help="compress a PyTorch checkpoint (.pt, .safetensors) to .lct",
                       description="Compress a checkpoint file. Without --base it is a key checkpoint "
                                   "(exact by default); with --base, a delta against that state.")
    p.add_argument("input", help="checkpoint to read (torch.save file or .safetensors)")
    p.add_argument("output", help=".lct file to write (replaced atomically)")
    p.add_argument("--base", action="append", metavar="FILE", help=base_help)
    p.add_argument("--bits", type=int, default=3, help="bits per value of a delta, 1-8 (default 3)")
    p.add_argument("--lossless", action="store_true", help="store every tensor exactly")
    p.add_argument("--lossy-key", action="store_true", help="code a key checkpoint lossily too")
    p.add_argument("--delta-floor", type=_delta_floor, metavar="N|none",
                   default=CodecOptions.delta_floor,
                   help="drop changes below 2**-N of a tensor's typical magnitude, 0-32, or 'none' "
                        f"(default {CodecOptions.delta_floor})")
    p.add_argument("--exact", action="append", metavar="PATTERN",
                   help="keep tensors whose dotted name matches this glob exactly (repeatable)")
    format_flag(p)
    progress_flag(p)
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("convert", help="rewrite a .lct file in another container format version",
                       description="Rewrite a .lct file in container format 1 (for readers that "
                                   "predate format 2) or 2 (index deflated). The coded tensors are "
                                   "copied, not decoded; every section's checksum is verified first.")
    p.add_argument("input", help=".lct file to read")
    p.add_argument("output", help=".lct file to write (replaced atomically)")
    format_flag(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("decompress", help="restore a .lct file to a PyTorch checkpoint",
                       description="Restore a .lct file and write it with torch.save (or as "
                                   ".safetensors when the output ends so).")
    p.add_argument("input", help=".lct file to read")
    p.add_argument("output", help="checkpoint to write (.pt or .safetensors)")
    p.add_argument("--base", action="append", metavar="FILE", help=base_help)
    progress_flag(p)
    p.set_defaults(func=_cmd_decompress)

    p = sub.add_parser("inspect", help="show what a .lct file holds, per tensor",
                       description="List every tensor of a .lct file: codec, sizes, ratio and the "
                                   "bound on its quantization error. Nothing is decoded.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("demo",
                       help="train a CNN with asynchronous compressed checkpoints, survive a "
                            "failure, restore every checkpoint",
                       description="Train a CNN on scikit-learn's bundled digits with a "
                                   "CheckpointManager saving the whole training state "
                                   "asynchronously, inject a corrupted batch that sends the loss "
                                   "to NaN, roll back to the last clean checkpoint and finish; "
                                   "then restore every checkpoint, compare accuracy, and plot "
                                   "ratio, error and loss to demo.png.")
    p.add_argument("--checkpoints", type=int, default=20,
                   help="checkpoints of the finished run, which trains checkpoints x interval "
                        "steps (default 20)")
    p.add_argument("--interval", type=int, default=25,
                   help="training steps between checkpoints (default 25)")
    p.add_argument("--fail-at", type=int, metavar="STEP",
                   help="step whose batch is corrupted (default: a little past 60%% of the run; "
                        "0: no failure)")
    p.add_argument("--bits", type=int, default=3, help="bits per value of a delta (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out",
                   help="directory for the checkpoints and demo.png (default: a new temporary one)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write demo.png")
    progress_flag(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("schedule", help="checkpoint scheduling policies",
                       description="Compare when-to-checkpoint policies.")
    ssub = p.add_subparsers(dest="schedule_command", required=True, metavar="SUBCOMMAND")
    p = ssub.add_parser("simulate",
                        help="Monte Carlo failures: lost work, overhead and total time per policy",
                        description="Run seeded Monte Carlo failures for every N steps, every T "
                                    "seconds, Young, Daly, adaptive (CheckFreq) and "
                                    "convergence-aware (COCI, scale-free) policies; print expected "
                                    "lost work, overhead and total time, and plot them.")
    p.add_argument("--steps", type=int, default=10000, help="training steps (default 10000)")
    p.add_argument("--step-seconds", type=float, default=0.5, help="seconds per step (default 0.5)")
    p.add_argument("--checkpoint-seconds", type=float, default=20.0,
                   help="seconds a checkpoint blocks training (default 20)")
    p.add_argument("--mtbf-hours", type=float, default=4.0,
                   help="mean time between failures in hours (default 4)")
    p.add_argument("--failure-trace", metavar="FILE",
                   help="failure times in seconds, one per line (replaces --mtbf-hours)")
    p.add_argument("--restart-seconds", type=float, default=0.0, help="cost of each restart")
    curve = p.add_mutually_exclusive_group()
    curve.add_argument("--loss-log", metavar="FILE",
                       help="loss per line, or 'step loss' per line")
    curve.add_argument("--loss-curve", metavar="exp:A,B,C",
                       help="loss = A + B*exp(-C*step) (default exp:0.1,2,5/steps)")
    p.add_argument("--every", type=int, help="the fixed-interval policy's steps (default steps/20)")
    p.add_argument("--every-seconds", type=float, default=1800.0,
                   help="the fixed-time policy's seconds (default 1800)")
    p.add_argument("--budget", type=float, default=0.05,
                   help="the adaptive policy's overhead budget (default 0.05)")
    p.add_argument("--quantum", type=float, default=0.02,
                   help="the convergence-aware policy's progress per checkpoint (default 0.02)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.set_defaults(func=_cmd_schedule_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if hasattr(args, "progress"):
        args.progress = args.progress and sys.stderr.isatty()
    try:
        return args.func(args)
    except (LctError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
