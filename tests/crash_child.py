"""A deterministic "training" process for the crash tests of CheckpointManager.

Not a test module: ``tests/test_manager_reliability.py`` runs it in a subprocess and kills
it with SIGKILL while it saves, then checks what a new manager restores.

Usage::

    python crash_child.py DIRECTORY --seed N [--mode lossless|lossy] [--max-steps N]
                          [--step-seconds S] [--wait-go]

The state is a dict of float32 tensors (a model and an Adam-like optimizer, about 3 MB) and
an int step. Step ``s`` updates it in place by a pure function of the state and ``s``, so
:func:`state_at` recomputes the exact bits of any step from the seed alone.

Protocol on stdout (one line each, written whole and flushed):

* ``LOADED``         imports done and the manager open (with ``--wait-go``: now waiting for
                     a line on stdin before training starts, so that the parent can start
                     the interpreter early and still time the kill from ``READY``);
* ``SAVING <step>``  just before ``manager.save(step, ...)``;
* ``DURABLE <step>`` from the ``durable`` future's done callback: file and manifest are on
                     storage;
* ``FAILED <step> <error>`` if a save failed;
* ``READY``          once the first save is durable;
* ``DONE``           after ``--max-steps`` steps and a clean close (if not killed before).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

#: Parameter shapes of the model; the optimizer holds two tensors of each.
SHAPES = {
    "embed.weight": (256, 384),
    "fc.weight": (384, 256),
    "fc.bias": (384,),
    "norm.weight": (256,),
}
LR = 1e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

#: Options of the manager in each mode (the parent opens its managers with the same ones).
MANAGER_OPTIONS = {
    "lossless": {"lossless": True, "key_every": 4, "keep_last": 3},
    "lossy": {"key_every": 4, "keep_last": 3},
}


def initial_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in SHAPES.items()}
    optimizer = {
        "exp_avg": {name: torch.zeros(shape) for name, shape in SHAPES.items()},
        "exp_avg_sq": {name: torch.zeros(shape) for name, shape in SHAPES.items()},
    }
    return {"model": model, "optimizer": optimizer, "step": 0}


def train_step(state: dict, step: int) -> None:
    """Advance ``state`` to ``step`` in place (only elementwise ops: bit-reproducible)."""
    for name, w in state["model"].items():
        grad = torch.sin(w * 31.0 + 0.37 * step) + 0.01 * step
        m = state["optimizer"]["exp_avg"][name]
        v = state["optimizer"]["exp_avg_sq"][name]
        m.mul_(BETA1).add_(grad, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        w.sub_(LR * m / (v.sqrt() + EPS))
    state["step"] = step


def state_at(seed: int, step: int) -> dict:
    """The exact state the child holds after ``step`` steps.

    Runs on one intra-op thread, as the child does: these small elementwise ops gain
    nothing from more, and on a busy machine OpenMP threads spinning against other
    processes made the replay a thousand times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = initial_state(seed)
        for s in range(1, step + 1):
            train_step(state, s)
        return state
    finally:
        torch.set_num_threads(threads)


def state_nbytes(state: dict) -> int:
    def walk(obj):
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        return 0

    return walk(state)


_out_lock = threading.Lock()


def emit(line: str) -> None:
    # One write per line under a lock: the worker thread's callbacks and the main thread
    # never interleave within a line (a SIGKILL may still cut the last line short).
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _report(future) -> None:
    exc = future.exception()
    if exc is None:
        emit(f"DURABLE {future.result().step}")
    else:
        emit(f"FAILED {getattr(future, 'lct_step', '?')} {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--mode", choices=sorted(MANAGER_OPTIONS), default="lossless")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep after each step")
    parser.add_argument("--wait-go", action="store_true",
                        help="wait for a line on stdin before training")
    args = parser.parse_args(argv)

    from lctriton.manager import CheckpointManager

    torch.set_num_threads(1)
    state = initial_state(args.seed)
    nbytes = state_nbytes(state)
    # At most two staged copies in flight: save() then blocks, as a real run whose saves
    # are slower than its steps would.
    manager = CheckpointManager(args.directory, staging_bytes=2 * nbytes,
                                **MANAGER_OPTIONS[args.mode])
    emit("LOADED")
    if args.wait_go and not sys.stdin.readline():
        return 1  # the parent went away
    for step in range(1, args.max_steps + 1):
        train_step(state, step)
        emit(f"SAVING {step}")
        handle = manager.save(step, state)
        handle.durable.lct_step = step
        handle.durable.add_done_callback(_report)
        if step == 1:
            handle.result()
            emit("READY")
        if args.step_seconds:
            time.sleep(args.step_seconds)
    manager.close()
    emit("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
