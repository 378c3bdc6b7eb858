"""``lctriton demo``: train a real model with asynchronous compressed checkpoints, survive a
failure by rolling back, and restore every checkpoint.

A small CNN learns scikit-learn's bundled handwritten digits (no download). A
:class:`~lctriton.manager.CheckpointManager` saves the whole training state (model, Adam
optimizer, step, random generators: a :class:`~lctriton.state.TrainingState`) every
``interval`` steps in a background thread: the first checkpoint is a lossless key, the later
ones deltas against the reconstruction of the one before. Every checkpoint taken while the
loss is healthy is tagged ``"clean"`` (the tag moves forward).

At step ``fail_at`` one image of the training batch is corrupted (its pixels become NaN): the
loss turns NaN and the optimizer step poisons every weight. The loop notices (a non-finite
loss, or a spike far above the recent median), calls
``manager.rollback("clean", into=state)``, and carries on from the last clean checkpoint with
the batches that follow the corrupted one, until the planned number of steps is done.

The stall of each save (how long ``save`` blocked the loop) is compared with a synchronous
``torch.save`` of the same state, flushed and fsynced, to the same directory. At the end every
checkpoint on disk is restored by a fresh manager, as a new process would, and the restored
model is evaluated next to the original of that step.

:func:`run_demo` returns a :class:`DemoResult`; :func:`format_table` and :func:`format_summary`
render it as text and :func:`plot` draws ``demo.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from lctriton import examples
from lctriton.manager import CheckpointManager
from lctriton.pipeline import iter_tensors
from lctriton.testing import time_torch_save

try:  # the whole training state; a model + optimizer + step dict without it
    from lctriton.state import TrainingState
except ImportError:  # pragma: no cover - only while state.py is absent
    TrainingState = None  # type: ignore[assignment,misc]

__all__ = [
    "CheckpointRow",
    "DemoResult",
    "LossPoint",
    "RollbackEvent",
    "format_summary",
    "format_table",
    "plot",
    "check_options",
    "default_fail_at",
    "run_demo",
]

logger = logging.getLogger(__name__)

CLEAN_TAG = "clean"
PLOT_NAME = "demo.png"
_SPIKE_FACTOR = 10.0  # a loss above 10x the recent median (plus 1) is a spike
_SPIKE_WINDOW = 50
_TORCH_SAVE_REPS = 3


@dataclasses.dataclass
class CheckpointRow:
    """One checkpoint of the run.

    Attributes:
        step: Training step it holds.
        kind: ``"key"`` or ``"delta"``.
        base_step: The checkpoint a delta was coded against.
        raw_nbytes: Bytes of the state's tensors in memory.
        file_nbytes: Bytes of its file.
        stall_s: Seconds ``manager.save`` blocked the training loop.
        background_s: Seconds the background worker spent on it (compress + write + fsync).
        loss: Test loss of the original model at that step.
        accuracy: Test accuracy (percent) of the original model at that step.
        tags: Its tags at the end of the run.
        file: Its file name in the output directory.
        discarded: Removed by the rollback (taken after the clean checkpoint).
        restored: Restored by a fresh manager at the end.
        restored_loss: Test loss of the restored model.
        restored_accuracy: Test accuracy of the restored model.
        max_abs_error: Largest absolute difference between restored and original weights.
        restore_s: Seconds the fresh manager took to restore it (its chain from the key).
    """

    step: int
    kind: str
    base_step: int | None
    raw_nbytes: int
    file_nbytes: int
    stall_s: float
    background_s: float
    loss: float
    accuracy: float
    tags: tuple[str, ...] = ()
    file: str = ""
    discarded: bool = False
    restored: bool = False
    restored_loss: float = math.nan
    restored_accuracy: float = math.nan
    max_abs_error: float = math.nan
    restore_s: float = math.nan

    @property
    def ratio(self) -> float:
        """``raw_nbytes / file_nbytes``."""
        return self.raw_nbytes / self.file_nbytes


@dataclasses.dataclass(frozen=True)
class LossPoint:
    """The training loss of one optimizer step, in the order the steps ran.

    Attributes:
        iteration: Position in execution order (counts the steps undone by the rollback).
        step: Training step (repeats after a rollback).
        loss: Batch loss (NaN for the poisoned step).
        discarded: The step was undone by the rollback.
    """

    iteration: int
    step: int
    loss: float
    discarded: bool


@dataclasses.dataclass(frozen=True)
class RollbackEvent:
    """The injected failure and the recovery.

    Attributes:
        failed_step: Step whose batch was corrupted.
        loss: Its loss.
        reason: ``"non-finite loss"`` or ``"loss spike"``.
        restored_step: The clean checkpoint training went back to.
        steps_redone: Steps between the clean checkpoint and the failure, trained again.
        discarded_steps: Checkpoints after the clean one, removed by the rollback.
        seconds: Time ``manager.rollback`` took.
    """

    failed_step: int
    loss: float
    reason: str
    restored_step: int
    steps_redone: int
    discarded_steps: tuple[int, ...]
    seconds: float


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
        out_dir: The checkpoint directory.
        rows: Every checkpoint taken, in step order (discarded ones included).
        losses: The training loss of every step run.
        rollback: The failure and the recovery (None when no failure was injected).
        torch_save_s: Seconds of each synchronous ``torch.save`` + flush + fsync of the final
            state to the same directory.
        state_nbytes: Bytes of the tensors of one training state.
        steps: Training steps of the final run.
        interval: Steps between checkpoints.
        bits: Codec bits per value of a delta.
        final_loss: Test loss at the end.
        final_accuracy: Test accuracy at the end.
        train_s: Wall time of the training loop (saves and rollback included).
        plot_path: The PNG written, if any.
        training_state: Whether the state was a :class:`~lctriton.state.TrainingState`.
    """

    out_dir: str
    rows: list[CheckpointRow]
    losses: list[LossPoint]
    rollback: RollbackEvent | None
    torch_save_s: list[float]
    state_nbytes: int
    steps: int
    interval: int
    bits: int
    final_loss: float
    final_accuracy: float
    train_s: float
    plot_path: str | None = None
    training_state: bool = True

    @property
    def kept(self) -> list[CheckpointRow]:
        """Checkpoints not discarded by the rollback."""
        return [r for r in self.rows if not r.discarded]

    @property
    def stall_mean_s(self) -> float:
        return statistics.fmean(r.stall_s for r in self.rows)

    @property
    def stall_median_s(self) -> float:
        return statistics.median(r.stall_s for r in self.rows)

    @property
    def torch_save_mean_s(self) -> float:
        return statistics.fmean(self.torch_save_s)

    @property
    def stall_fraction(self) -> float:
        """Mean stall per save over the mean synchronous ``torch.save`` time."""
        return self.stall_mean_s / self.torch_save_mean_s


def default_fail_at(checkpoints: int, interval: int) -> int:
    """A step a little past the checkpoint about 60% of the way through the run (0, no
    failure, for a run of fewer than two checkpoints: there would be no clean one before)."""
    if checkpoints < 2 or interval < 2:
        return 0
    return max(1, int(checkpoints * 0.6)) * interval + max(1, interval * 3 // 5)


def check_options(checkpoints: int, interval: int, fail_at: int | None = -1) -> int:
    """Validate :func:`run_demo`'s schedule; return the failure step (0 for none).

    Raises:
        ValueError: If a count is below 1, or ``fail_at`` is not after the first checkpoint,
            before the last step, and off the checkpoint steps.
    """
    if checkpoints < 1 or interval < 1:
        raise ValueError(f"checkpoints and interval must be >= 1, got {checkpoints} and {interval}")
    if fail_at == -1:
        return default_fail_at(checkpoints, interval)
    steps = checkpoints * interval
    if fail_at and (not interval < fail_at < steps or fail_at % interval == 0):
        raise ValueError(
            f"fail_at must be between the first checkpoint (step {interval}) and the last "
            f"step ({steps}), and not a checkpoint step; got {fail_at}"
        )
    return fail_at or 0


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    checkpoints: int = 20,
    interval: int = 25,
    fail_at: int | None = -1,
    seed: int = 0,
    bits: int = 3,
    keep_last: int | None = None,
    make_plot: bool = True,
    progress: bool = False,
) -> DemoResult:
    """Train with asynchronous compressed checkpoints, inject a failure, roll back, restore.

    Args:
        out_dir: Directory of the checkpoints and the plot (created if needed).
        checkpoints: Checkpoints of the finished run; it trains ``checkpoints * interval``
            steps.
        interval: Training steps between checkpoints.
        fail_at: Step whose batch is corrupted: -1 for :func:`default_fail_at`, None or 0
            for no failure. It must come after the first checkpoint, before the last step,
            and not on a checkpoint step.
        seed: Seed of the workload.
        bits: Codec bits per value of a delta.
        keep_last: Retention of the manager; default: keep every checkpoint.
        make_plot: Write ``demo.png`` in ``out_dir`` (needs matplotlib).
        progress: Show a progress bar (for the command line).

    Returns:
        The measurements.

    Raises:
        ValueError: If an argument is out of range.
    """
    fail_at = check_options(checkpoints, interval, fail_at)
    steps = checkpoints * interval
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = examples.digits_cnn(seed)
    model, optimizer = work.model, work.optimizer
    if TrainingState is not None:
        training = TrainingState(model=model, optimizer=optimizer)

        def gather(step: int) -> Any:
            return training.state_dict(step=step)

        def restore_into(manager: CheckpointManager, tag: str) -> Any:
            return manager.rollback(tag, into=training)

    else:  # pragma: no cover - only while state.py is absent
        def gather(step: int) -> Any:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}

        def restore_into(manager: CheckpointManager, tag: str) -> Any:
            return manager.rollback(tag, model=model, optimizer=optimizer)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="training", unit="step", leave=False)

    manager = CheckpointManager(out, every=interval, keep_last=keep_last or checkpoints + 1,
                                bits=bits)
    rows: dict[int, CheckpointRow] = {}  # the checkpoints of the current timeline
    originals: dict[int, dict[str, torch.Tensor]] = {}
    saved: list[tuple[CheckpointRow, Any]] = []  # every save, in order, with its handle
    losses: list[LossPoint] = []
    recent: list[float] = []
    event: RollbackEvent | None = None
    poisoned = False
    step = 0
    start = time.perf_counter()
    try:
        while step < steps:
            step += 1
            corrupt = bool(fail_at) and step == fail_at and not poisoned
            loss = _train_step(work, corrupt)
            poisoned = poisoned or corrupt
            losses.append(LossPoint(len(losses), step, loss, False))
            reason = _failure(loss, recent)
            if reason is not None:
                t0 = time.perf_counter()
                restored = restore_into(manager, CLEAN_TAG)
                seconds = time.perf_counter() - t0
                discarded = tuple(s for s in sorted(rows) if s > restored.step)
                for s in discarded:
                    rows.pop(s).discarded = True
                    originals.pop(s)
                event = RollbackEvent(step, loss, reason, restored.step, step - restored.step,
                                      discarded, seconds)
                logger.info("step %d: loss %s (%s); rolled back to step %d", step, loss, reason,
                            restored.step)
                # Undo the steps after the clean checkpoint; the data stream goes on past the
                # corrupted batch, so the poisoned window is not replayed.
                for i, p in enumerate(losses):
                    if p.step > restored.step and not p.discarded:
                        losses[i] = dataclasses.replace(p, discarded=True)
                if bar is not None:
                    bar.update(restored.step - step)
                step = restored.step
                del recent[:]
                continue
            recent.append(loss)
            del recent[:-_SPIKE_WINDOW]
            if bar is not None:
                bar.update(1)
            if manager.should_save(step, loss):
                test_loss, accuracy = work.evaluate(model)
                originals[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                before = len(manager.stall_seconds)
                # The loss was healthy at every step since the last checkpoint: tag it clean.
                handle = manager.save(step, gather(step), tag=CLEAN_TAG,
                                      metadata={"loss": test_loss, "accuracy": accuracy})
                rows[step] = CheckpointRow(step, "", None, 0, 0, manager.stall_seconds[before],
                                           math.nan, test_loss, accuracy)
                saved.append((rows[step], handle))
        manager.close()  # every save durable, and the worker done with its bookkeeping
        train_s = time.perf_counter() - start
        # Background seconds are appended in completion order: one worker, so save order.
        for (row, handle), seconds in zip(saved, manager.background_seconds, strict=True):
            info = handle.result()
            row.kind, row.base_step, row.file = info.kind, info.base_step, info.file
            row.raw_nbytes, row.file_nbytes = info.raw_nbytes, info.nbytes
            row.background_s = seconds
        for info in manager.checkpoints():
            rows[info.step].tags = info.tags
        final_loss, final_accuracy = work.evaluate(model)
        torch_save_s = time_torch_save(out, gather(step), _TORCH_SAVE_REPS)
        state_nbytes = sum(t.numel() * t.element_size() for t in iter_tensors(gather(step)))
    finally:
        if bar is not None:
            bar.close()
        manager.close()

    _restore_all(out, rows, originals, seed)
    result = DemoResult(
        out_dir=str(out),
        rows=sorted((row for row, _ in saved), key=lambda r: (r.step, not r.discarded)),
        losses=losses, rollback=event, torch_save_s=torch_save_s, state_nbytes=state_nbytes,
        steps=steps, interval=interval, bits=bits,
        final_loss=final_loss, final_accuracy=final_accuracy, train_s=train_s,
        training_state=TrainingState is not None,
    )
    if make_plot:
        result.plot_path = str(plot(result, out / PLOT_NAME))
    return result


def _train_step(work: examples.Workload, corrupt: bool) -> float:
    """One optimizer step; ``corrupt`` turns one image of its batch into NaNs."""
    if not corrupt:
        return work.train_step()

    def poison(module: torch.nn.Module, args: tuple) -> tuple:
        images = args[0].clone()
        images[0] = float("nan")
        return (images, *args[1:])

    hook = work.model.register_forward_pre_hook(poison)
    try:
        return work.train_step()
    finally:
        hook.remove()


def _failure(loss: float, recent: list[float]) -> str | None:
    """Why ``loss`` means the run has gone wrong, or None when it is healthy."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if len(recent) >= 10 and loss > _SPIKE_FACTOR * statistics.median(recent) + 1.0:
        return "loss spike"
    return None


def _restore_all(out: Path, rows: dict[int, CheckpointRow], originals: dict, seed: int) -> None:
    """Restore every checkpoint on disk in a fresh manager; evaluate it next to the original."""
    fresh = examples.digits_cnn(seed)
    with CheckpointManager(out) as manager:
        for info in manager.checkpoints():
            t0 = time.perf_counter()
            restored = manager.restore(info.step)
            row = rows[info.step]
            row.restore_s = time.perf_counter() - t0
            state = restored.state
            fresh.model.load_state_dict(state["model"])
            fresh.optimizer.load_state_dict(state["optimizer"])  # the whole state comes back
            if state.get("step") != info.step:
                raise AssertionError(
                    f"checkpoint of step {info.step} restored step {state.get('step')}")
            row.restored = True
            row.restored_loss, row.restored_accuracy = fresh.evaluate(fresh.model)
            row.max_abs_error = max(
                float((state["model"][k].float() - v.float()).abs().max()) if v.numel() else 0.0
                for k, v in originals[info.step].items()
            )


# --------------------------------------------------------------------------- text


def format_table(result: DemoResult | list[CheckpointRow]) -> str:
    """One line per checkpoint: sizes, ratio, stall, accuracy before and after restoring."""
    rows = result.rows if isinstance(result, DemoResult) else result
    header = (
        f"{'step':>5} {'kind':>5} {'raw':>9} {'on disk':>9} {'ratio':>7} {'stall ms':>8} "
        f"{'bg ms':>6} {'acc %':>6} {'restored %':>10} {'max |err|':>9} {'restore ms':>10}  tags"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        restored = f"{r.restored_accuracy:>10.2f}" if r.restored else f"{'-':>10}"
        error = f"{r.max_abs_error:>9.2e}" if r.restored else f"{'-':>9}"
        took = f"{r.restore_s * 1e3:>10.1f}" if r.restored else f"{'-':>10}"
        note = ",".join(r.tags) + (" (discarded by rollback)" if r.discarded else "")
        lines.append(
            f"{r.step:>5} {r.kind:>5} {_size(r.raw_nbytes):>9} {_size(r.file_nbytes):>9} "
            f"{r.ratio:>6.1f}x {r.stall_s * 1e3:>8.2f} {r.background_s * 1e3:>6.0f} "
            f"{r.accuracy:>6.2f} {restored} {error} {took}  {note}".rstrip()
        )
    return "\n".join(lines)


def format_summary(result: DemoResult, width: int = 100) -> str:
    """The run in a few labelled lines: bytes, stall against ``torch.save``, the failure and
    the rollback, the restores."""
    kept = result.kept
    keys = sum(r.kind == "key" for r in kept)
    raw = sum(r.raw_nbytes for r in kept)
    disk = sum(r.file_nbytes for r in kept)
    deltas = [r for r in kept if r.kind == "delta"]
    parts = "model, Adam, step, RNG" if result.training_state else "model, Adam, step"
    dropped = len(result.rows) - len(kept)
    items = [
        ("checkpoints",
         f"{len(kept)} kept ({keys} key, {len(deltas)} delta)"
         + (f", {dropped} discarded by the rollback" if dropped else "")
         + f"; the whole training state every {result.interval} steps "
         f"({_size(result.state_nbytes)}: {parts})"),
    ]
    bytes_line = f"{_size(raw)} raw -> {_size(disk)} on disk ({raw / disk:.1f}x)"
    if deltas:
        delta_ratio = sum(r.raw_nbytes for r in deltas) / sum(r.file_nbytes for r in deltas)
        bytes_line += f"; deltas alone {delta_ratio:.1f}x at {result.bits} bits per value"
    items.append(("bytes", bytes_line))
    background = statistics.fmean(r.background_s for r in result.rows)
    items.append((
        "stall",
        f"{result.stall_mean_s * 1e3:.2f} ms per save (median {result.stall_median_s * 1e3:.2f}, "
        f"max {max(r.stall_s for r in result.rows) * 1e3:.2f}) against "
        f"{result.torch_save_mean_s * 1e3:.2f} ms for a synchronous torch.save + fsync of the same "
        f"state to the same disk: the loop waits {100 * result.stall_fraction:.0f}% as long; "
        f"compression and writing ran in the background ({background * 1e3:.0f} ms per save)",
    ))
    event = result.rollback
    if event is None:
        items.append(("failure", "none injected"))
    else:
        items.append(("failure", f"corrupted batch at step {event.failed_step} -> loss "
                                 f"{event.loss:.4g} ({event.reason})"))
        discarded = list(event.discarded_steps) if event.discarded_steps else "none"
        items.append((
            "rollback",
            f"to the '{CLEAN_TAG}' checkpoint of step {event.restored_step} in "
            f"{event.seconds * 1e3:.1f} ms; {event.steps_redone} steps redone on the batches after "
            f"the corrupted one; checkpoints discarded: {discarded}",
        ))
    restored = [r for r in result.rows if r.restored]
    if restored:
        worst_acc = max(abs(r.accuracy - r.restored_accuracy) for r in restored)
        worst_err = max(r.max_abs_error for r in restored)
        items.append((
            "restore",
            f"{len(restored)} of {len(kept)} checkpoints restored by a fresh manager (each chain "
            f"replayed from its key): test accuracy changes by at most {worst_acc:.2f} points, "
            f"weights by at most {worst_err:.2e}",
        ))
    items.append(("final", f"step {result.steps}, test accuracy {result.final_accuracy:.2f}% "
                           f"(loss {result.final_loss:.4f}); training loop {result.train_s:.1f} s"))
    if result.plot_path:
        items.append(("plot", result.plot_path))
    label = max(len(k) for k, _ in items) + 2
    lines = []
    for key, text in items:
        lines.append(textwrap.fill(text, width, initial_indent=key.ljust(label),
                                   subsequent_indent=" " * label, break_on_hyphens=False,
                                   break_long_words=False))
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------- plot


def plot(result: DemoResult, path: str | os.PathLike[str]) -> Path:
    """Draw the loss curve (failure and rollback marked), the ratio and the restored weight
    error per checkpoint into a PNG.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ratio, ax_err = fig.subplots(3, 1, sharex=True, height_ratios=[1.4, 1, 1])

    kept = [p for p in result.losses if not p.discarded and math.isfinite(p.loss)]
    ax_loss.plot([p.step for p in kept], [p.loss for p in kept], lw=0.9, color="tab:blue",
                 label="training loss")
    undone = [p for p in result.losses if p.discarded and math.isfinite(p.loss)]
    if undone:
        ax_loss.plot([p.step for p in undone], [p.loss for p in undone], lw=0.9, color="tab:orange",
                     label="steps undone by the rollback")
    ax_loss.set_yscale("log")
    saves = [r.step for r in result.kept]
    for s in saves:
        ax_loss.axvline(s, color="0.85", lw=0.6, zorder=0)
    event = result.rollback
    if event is not None:
        top = max(p.loss for p in result.losses if math.isfinite(p.loss))
        ax_loss.axvline(event.failed_step, color="tab:red", ls="--", lw=1)
        ax_loss.plot([event.failed_step], [top], marker="X", color="tab:red", ms=10, ls="none",
                     label=f"corrupted batch: loss {event.loss:.3g}")
        ax_loss.axvline(event.restored_step, color="tab:green", lw=1.2)
        ax_loss.annotate(
            f"rollback to '{CLEAN_TAG}' checkpoint (step {event.restored_step})",
            xy=(event.restored_step, top), xytext=(event.restored_step - result.interval, top),
            color="tab:red", fontsize=8, ha="right", va="center",
            arrowprops={"arrowstyle": "<-", "color": "tab:red"},
        )
    ax_loss.set_ylabel("batch loss")
    ax_loss.set_title(f"digits CNN: asynchronous compressed checkpoints every {result.interval} "
                      f"steps (grey lines), failure and rollback")
    ax_loss.legend(fontsize=8, loc="lower left")

    rows = result.kept
    width = result.interval * 0.6
    colors = ["0.5" if r.kind == "key" else "tab:green" for r in rows]
    ax_ratio.bar([r.step for r in rows], [r.ratio for r in rows], width=width, color=colors)
    for r in rows:
        if r.kind == "key":
            ax_ratio.annotate("key", (r.step, r.ratio), ha="center", va="bottom", fontsize=7)
    ax_ratio.set_ylabel("compression ratio (raw / file)")
    ax_ratio.set_title("ratio per checkpoint: lossless keys (grey), deltas (green)", fontsize=9)

    restored = [r for r in rows if r.restored]
    ax_err.plot([r.step for r in restored], [r.max_abs_error for r in restored], marker="o", ms=4,
                color="tab:purple")
    ax_err.set_ylabel("max |restored - original| weight")
    ax_err.set_xlabel("training step")
    if restored:
        worst = max(abs(r.accuracy - r.restored_accuracy) for r in restored)
        ax_err.set_title(f"weight error after restoring each checkpoint in a fresh manager "
                         f"(test accuracy changes by at most {worst:.2f} points)", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
