"""``lctriton demo``: train a real model, keep a chain of compressed checkpoints, restore each.

A small CNN learns scikit-learn's bundled handwritten digits (no download). Every
``interval`` steps the whole training state (model and Adam optimizer) is saved: the first
checkpoint is a lossless key, every later one a delta against the reconstruction of the one
before. Each checkpoint is then restored by replaying the chain from the key, and the restored
model is evaluated on the held-out digits next to the original.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from lctriton import api, examples

__all__ = ["CheckpointRow", "run_demo"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointRow:
    """One checkpoint of the demo chain."""

    step: int
    kind: str
    raw_nbytes: int
    file_nbytes: int
    compress_s: float
    decompress_s: float
    loss: float
    accuracy: float
    restored_loss: float
    restored_accuracy: float
    path: str

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.file_nbytes


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    checkpoints: int = 12,
    interval: int = 25,
    seed: int = 0,
    bits: int = 3,
    progress: bool = False,
) -> list[CheckpointRow]:
    """Train, checkpoint and restore; return one row per checkpoint.

    Args:
        out_dir: Directory for the checkpoint files (created if needed).
        checkpoints: Number of checkpoints in the chain (the first is the key).
        interval: Training steps between checkpoints.
        seed: Seed of the workload.
        bits: Codec symbol width.
        progress: Show a progress bar (for the command line).

    Returns:
        The rows, in chain order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = examples.digits_cnn(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=checkpoints * interval, desc="training", unit="step", leave=False)
    rows: list[CheckpointRow] = []
    paths: list[Path] = []
    base = None
    step = 0
    for k in range(checkpoints):
        for _ in range(interval):
            work.train_step()
            step += 1
            if bar is not None:
                bar.update(1)
        loss, acc = work.evaluate(work.model)
        state = {"model": work.model.state_dict(), "optimizer": work.optimizer.state_dict(), "step": step}
        path = out / f"ckpt-{k:03d}-step{step:05d}.lct"
        t0 = time.perf_counter()
        compressed, base = api.compress(state, base=base, return_reconstruction=True, bits=bits)
        t1 = time.perf_counter()
        with open(path, "wb") as f:
            compressed.write(f)
        paths.append(path)
        rows.append(
            CheckpointRow(step, "key" if k == 0 else "delta", compressed.raw_nbytes, path.stat().st_size,
                          t1 - t0, 0.0, loss, acc, 0.0, 0.0, str(path))
        )
    if bar is not None:
        bar.close()
    # Restore every checkpoint by replaying the chain, as a fresh process would.
    restored = None
    model = examples.digits_cnn(seed).model
    for row, path in zip(rows, paths):
        t0 = time.perf_counter()
        restored = api.load(path, base=restored)
        row.decompress_s = time.perf_counter() - t0
        model.load_state_dict(restored["model"])
        row.restored_loss, row.restored_accuracy = work.evaluate(model)
    return rows


def format_table(rows: list[CheckpointRow]) -> str:
    """The demo's table as text."""
    header = (
        f"{'step':>5} {'kind':>5} {'raw':>9} {'on disk':>9} {'ratio':>7} {'comp MB/s':>9} "
        f"{'dec MB/s':>9} {'acc %':>6} {'restored %':>10} {'loss':>7} {'restored':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.step:>5} {r.kind:>5} {_size(r.raw_nbytes):>9} {_size(r.file_nbytes):>9} {r.ratio:>6.1f}x "
            f"{r.raw_nbytes / r.compress_s / 1e6:>9.0f} {r.raw_nbytes / r.decompress_s / 1e6:>9.0f} "
            f"{r.accuracy:>6.2f} {r.restored_accuracy:>10.2f} {r.loss:>7.4f} {r.restored_loss:>8.4f}"
        )
    deltas = [r for r in rows if r.kind == "delta"]
    if deltas:
        raw = sum(r.raw_nbytes for r in deltas)
        disk = sum(r.file_nbytes for r in deltas)
        worst = max(abs(r.accuracy - r.restored_accuracy) for r in rows)
        lines.append("-" * len(header))
        lines.append(
            f"deltas: {_size(raw)} -> {_size(disk)} ({raw / disk:.1f}x); whole chain "
            f"{_size(sum(r.raw_nbytes for r in rows))} -> {_size(sum(r.file_nbytes for r in rows))}; "
            f"largest accuracy change after restore: {worst:.2f} points"
        )
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
