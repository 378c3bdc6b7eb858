"""Fidelity harness: how training recovers when it resumes from compressed checkpoints.

Following Inshrinkerator's evaluation, a workload is trained twice from the same seed:

* the *reference* run trains ``steps`` steps uninterrupted;
* the *restored* run saves ``{"model": ..., "optimizer": ...}`` every ``every`` steps through
  a :class:`lctriton.CheckpointManager` built with the setting under test, and at ``restores``
  evenly spaced save steps throws the live model and optimizer state away, loads the latest
  restore point into them and goes on. By default a fresh manager restores it from disk,
  decoding the key and every delta of the chain as after a crash; ``--restore-from memory``
  lets the saving manager hand back the chain head it keeps (what the files decode to,
  checked once against them), for states whose chains take minutes to decode.

The data order and the dropout RNG live inside the workload's own ``train_step`` and are
never restored, so both runs see the same batches and masks: the only difference between them
is the lossy state. For each setting the harness records the compression ratios (per delta
checkpoint and over all checkpoints, for the weights, the optimizer state and the whole
state), the final test loss and accuracy and their differences from the reference, the
train-loss and test-loss curves, the error every restore introduced, and wall times. A
lossless setting must reproduce the reference bit for bit: that is the harness's own check.

Training is chaotic, so any perturbation moves the final metrics by chance. Noise-floor
controls (``--controls``) rerun the reference with the weights perturbed by one part in a
million at the restore steps and no checkpoints: differences within their range say nothing
about the codec. A single seed is one draw of that chaos (on the digits CNN a control moved
the final loss by 2%, and so does a change of the thread count): run the sweep with several
``--seed`` values and read the range with ``--summarize``. On a shared machine,
``--threads 1`` keeps torch's threads from spin-waiting for each other, which can make a step
ten times slower.

Usage::

    python3 benchmarks/fidelity.py --workload digits --threads 1 --out fidelity-digits-cpu
    python3 benchmarks/fidelity.py --workload minilm --threads 1 --out fidelity-minilm-cpu
    python3 benchmarks/fidelity.py --workload minilm --settings '[{"bits": 3, "key_every": 20}]'
    python3 benchmarks/fidelity.py --plot benchmarks/results/fidelity-*-cpu.json --out fidelity-cpu
    python3 benchmarks/fidelity.py --summarize benchmarks/results/fidelity-digits-first-moment-seed*-cpu.json

Settings are dicts of ``CheckpointManager`` options passed through unchanged (codec options
such as ``bits`` or ``lossless`` and manager options such as ``key_every``), so options the
library gains later need no change here. Results go to ``benchmarks/results/<out>.json`` and
``<out>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # As in the benchmarks' conftest: Triton kernels, if ever imported, run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lctriton  # noqa: E402
from lctriton import CheckpointManager, examples  # noqa: E402

__all__ = [
    "PRESETS",
    "WORKLOADS",
    "WorkloadSpec",
    "check_record",
    "eval_steps",
    "machine_info",
    "parse_settings",
    "plot",
    "restore_steps",
    "setting_label",
    "summarize",
    "sweep",
]

logger = logging.getLogger("lctriton.benchmarks.fidelity")

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

PRESETS: dict[str, list[dict[str, Any]]] = {
    "baseline": [{"lossless": True}, {"bits": 2}, {"bits": 3}, {"bits": 4}],
    # The coders and moment modes: Huffman with moments coded like weights (the codec before
    # rANS and lq/1), the defaults, and the cheaper settings around them.
    "codecs": [
        {"lossless": True},
        {"coder": "huffman", "moments": "lossy"},
        {},
        {"moment_precision": 0},
        {"moments": "predict"},
        {"bits": 2},
        {"bits": 2, "moments": "predict"},
        {"bits": 4},
    ],
}
"""Named lists of settings for ``--settings``."""


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A workload the CLI knows, with defaults sized for a 2-core CPU.

    Attributes:
        build: ``build(seed) -> lctriton.examples.Workload``.
        steps: Training steps per run.
        every: Steps between checkpoints.
        restores: Restores in each restored run.
        controls: Noise-floor control runs.
        restore_from: ``"disk"`` or ``"memory"`` (see :func:`sweep`).
        cosine_over_run: Build with ``cosine_steps`` set to the run's steps (``--steps`` or
            ``steps``), so that the learning rate reaches 0 at the run's last step.
    """

    build: Callable[[int], examples.Workload]
    steps: int
    every: int
    restores: int
    controls: int
    restore_from: str = "disk"
    cosine_over_run: bool = False


WORKLOADS: dict[str, WorkloadSpec] = {
    # About 22 steps per epoch: 1000 steps are 45 epochs, well into the converged regime.
    "digits": WorkloadSpec(examples.digits_cnn, steps=1000, every=20, restores=10, controls=3),
    # The same run with the learning rate decayed to 0 along a half cosine, as most training
    # schedules end, instead of held at its peak through 45 epochs.
    "digits-cosine": WorkloadSpec(
        examples.digits_cnn, steps=1000, every=20, restores=10, controls=3, cosine_over_run=True
    ),
    # 0.3-0.5 s per step on 2 cores; 200 steps are 5.5 epochs of the 584 docstrings. A
    # checkpoint is 271 MB of tensors, which the CPU codec encodes in about 9 s (a lossy
    # delta) to 30 s (a lossless one) and decodes at about 50 MB/s: a checkpoint every 20
    # steps and restores from the manager's memory keep the sweep near 20 minutes, where
    # every 10 steps and restores decoded from disk would take about an hour.
    "minilm": WorkloadSpec(
        examples.minilm_docstrings,
        steps=200,
        every=20,
        restores=8,
        controls=1,
        restore_from="memory",
    ),
}
"""Workloads of ``--workload``, with their default schedule."""


# --------------------------------------------------------------------------- schedule


def restore_steps(steps: int, every: int, restores: int) -> list[int]:
    """Steps at which the restored run restores: ``restores`` save steps, evenly spaced.

    Candidates are the save steps (multiples of ``every``) except the first, which is always
    a key and so says nothing about the chain, and except ``steps`` itself, so that training
    goes on after every restore. They are picked at the centres of ``restores`` equal slices
    of the candidates, which keeps them distinct and spreads them over the whole run.

    Args:
        steps: Training steps of the run.
        every: Steps between checkpoints.
        restores: Number of restores (0 for none).

    Returns:
        The restore steps, increasing.

    Raises:
        ValueError: If there are fewer candidate steps than ``restores``.
    """
    if steps < 1 or every < 1 or restores < 0:
        raise ValueError(
            f"need steps >= 1, every >= 1, restores >= 0; got {steps}, {every}, {restores}"
        )
    candidates = [s for s in range(2 * every, steps, every)]
    if restores > len(candidates):
        raise ValueError(
            f"{restores} restores need as many save steps after the first and before step "
            f"{steps}; every={every} gives {len(candidates)}"
        )
    if restores == 0:
        return []
    width = len(candidates) / restores
    # The candidate under each slice's centre: centres are width >= 1 apart, so the picks are
    # distinct, and the last centre lies before the end of the list.
    return [candidates[math.floor((i + 0.5) * width)] for i in range(restores)]


def eval_steps(steps: int, points: int) -> list[int]:
    """Steps after which both runs evaluate on the test split: 0 and ``points`` more, evenly
    spaced, the last being ``steps``."""
    return (
        sorted({0} | {round(steps * k / points) for k in range(1, points + 1)})
        if points
        else [0, steps]
    )


def setting_label(setting: Mapping[str, Any]) -> str:
    """A short readable name for a setting: ``lossless``, ``bits=2,key_every=20``."""
    if not setting:
        return "defaults"
    parts = []
    for name, value in setting.items():
        if value is True:
            parts.append(name)
        elif isinstance(value, (list, tuple)):
            parts.append(f"{name}={'|'.join(map(str, value))}")
        else:
            parts.append(f"{name}={value}")
    return ",".join(parts)


# --------------------------------------------------------------------------- state helpers


def _float_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every floating-point tensor of a nested state."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield prefix, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from _float_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def _group(name: str) -> str:
    """The error group of a dotted state name: ``model``, or ``optimizer.<state key>`` (the
    key of a per-parameter optimizer entry, e.g. ``optimizer.exp_avg_sq``)."""
    parts = name.split(".")
    if parts[0] == "optimizer" and len(parts) >= 4 and parts[1] == "state":
        return f"optimizer.{parts[3]}"
    return parts[0]


def _restore_error(
    live: Mapping[str, Any], restored: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """How far a restored state is from the live one it was saved from, per group.

    Returns, per group (``model``, ``optimizer.exp_avg``, ...): ``rel_l2`` (norm of the
    difference over norm of the live tensors), ``max_abs`` and ``zeroed`` (fraction of
    elements restored as exactly 0 where the live value was not: the failure Adam's second
    moment is prone to, since its small changes are what a lossy delta drops).
    """
    restored_tensors = dict(_float_tensors(restored))
    sums: dict[str, list[float]] = {}
    for name, live_tensor in _float_tensors(live):
        other = restored_tensors.get(name)
        if other is None:
            raise KeyError(f"the restored state lacks {name}")
        a, b = live_tensor.detach().double(), other.detach().double()
        acc = sums.setdefault(_group(name), [0.0, 0.0, 0.0, 0.0, 0.0])
        diff = b - a
        acc[0] += float(diff.square().sum())
        acc[1] += float(a.square().sum())
        acc[2] = max(acc[2], float(diff.abs().max())) if diff.numel() else acc[2]
        acc[3] += float(((b == 0) & (a != 0)).sum())
        acc[4] += a.numel()
    return {
        group: {
            "rel_l2": math.sqrt(d2) / math.sqrt(n2) if n2 else math.sqrt(d2),
            "max_abs": max_abs,
            "zeroed": zeroed / count if count else 0.0,
        }
        for group, (d2, n2, max_abs, zeroed, count) in sums.items()
    }


def _rel_distance(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]
) -> float:
    """Relative L2 distance of two model state dicts over their floating-point tensors."""
    d2 = n2 = 0.0
    for name, ref in reference.items():
        if ref.is_floating_point():
            d2 += float((other[name].double() - ref.double()).square().sum())
            n2 += float(ref.double().square().sum())
    return math.sqrt(d2 / n2) if n2 else math.sqrt(d2)


def _same_state(a: Any, b: Any) -> bool:
    """Whether two nested states are identical: same structure, values and tensor bits."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _clone_state(state: Any) -> Any:
    """A deep copy of a nested state with cloned tensors."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone_state(v) for v in state)
    return state


def _file_breakdown(path: Path) -> dict[str, int]:
    """Raw and stored bytes of a checkpoint file's tensors, for the weights and the optimizer
    state (from ``lctriton.inspect``, which reads the index and decodes nothing)."""
    described = lctriton.inspect(path)
    out = {
        "model_raw": 0,
        "model_stored": 0,
        "optimizer_raw": 0,
        "optimizer_stored": 0,
        "tensor_raw": 0,
        "tensor_stored": 0,
    }
    for tensor in described["tensors"]:
        group = tensor["name"].split(".", 1)[0]
        out["tensor_raw"] += tensor["raw_nbytes"]
        out["tensor_stored"] += tensor["stored_nbytes"]
        if group in ("model", "optimizer"):
            out[f"{group}_raw"] += tensor["raw_nbytes"]
            out[f"{group}_stored"] += tensor["stored_nbytes"]
    return out


def _ratios(checkpoints: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Compression ratios over a set of checkpoints.

    ``state``: raw bytes of all tensors over file bytes (container overhead included);
    ``weights`` and ``optimizer``: raw over stored bytes of the ``model.*`` and
    ``optimizer.*`` tensors (their coded sections, without the container's index).
    """
    if not checkpoints:
        return {"count": 0, "state": None, "weights": None, "optimizer": None}

    def ratio(raw: str, stored: str) -> float | None:
        den = sum(c[stored] for c in checkpoints)
        return sum(c[raw] for c in checkpoints) / den if den else None

    return {
        "count": len(checkpoints),
        "state": ratio("tensor_raw", "file_nbytes"),
        "weights": ratio("model_raw", "model_stored"),
        "optimizer": ratio("optimizer_raw", "optimizer_stored"),
    }


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass
class _Run:
    """What one training run produced."""

    train_loss: list[float]
    evals: list[dict[str, float]]
    final_model: dict[str, torch.Tensor]
    final_optimizer: dict[str, Any]
    timings: dict[str, float]
    workload: dict[str, Any]
    checkpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    restores: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    disk_check: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.evals[-1]


def _evaluate(
    workload: examples.Workload, step: int, timings: dict[str, float]
) -> dict[str, float]:
    start = time.perf_counter()
    loss, acc = workload.evaluate(workload.model)
    timings["eval_s"] += time.perf_counter() - start
    return {"step": step, "test_loss": loss, "test_acc": acc}


def _train(
    build: Callable[[int], examples.Workload],
    seed: int,
    steps: int,
    eval_at: Sequence[int],
    after_step: Callable[[examples.Workload, int, dict[str, float]], None] | None = None,
) -> _Run:
    """Train a fresh workload ``steps`` steps; ``after_step`` runs after each step (before
    any evaluation of that step), so a restore there is what training and evaluation see."""
    start = time.perf_counter()
    timings = {"build_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "save_s": 0.0, "restore_s": 0.0}
    workload = build(seed)
    timings["build_s"] = time.perf_counter() - start
    wanted = set(eval_at)
    evals = [_evaluate(workload, 0, timings)] if 0 in wanted else []
    losses = []
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        losses.append(workload.train_step())
        timings["train_s"] += time.perf_counter() - tick
        if after_step is not None:
            after_step(workload, step, timings)
        if step in wanted:
            evals.append(_evaluate(workload, step, timings))
            logger.debug(
                "%s step %d: test loss %.4f, accuracy %.2f%%",
                workload.name,
                step,
                evals[-1]["test_loss"],
                evals[-1]["test_acc"],
            )
    if not evals or evals[-1]["step"] != steps:
        evals.append(_evaluate(workload, steps, timings))
    timings["wall_s"] = time.perf_counter() - start
    description = {
        "name": workload.name,
        "parameters": workload.num_parameters,
        "batch_size": workload.batch_size,
        "train_size": workload.train_size,
        "test_size": workload.test_size,
        "info": workload.info,
    }
    return _Run(
        losses,
        evals,
        _clone_state(workload.model.state_dict()),
        _clone_state(workload.optimizer.state_dict()),
        timings,
        description,
    )


def _discard_live_state(workload: examples.Workload) -> None:
    """Throw the live model and optimizer state away, so that anything a restore failed to
    bring back shows up as NaN instead of silently surviving from the live run."""
    with torch.no_grad():
        for tensor in workload.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(math.nan)
    workload.optimizer.state.clear()


def _restored_run(
    build: Callable[[int], examples.Workload],
    seed: int,
    steps: int,
    every: int,
    restore_at: Sequence[int],
    eval_at: Sequence[int],
    setting: Mapping[str, Any],
    directory: Path,
    restore_from: str,
) -> _Run:
    """Train while checkpointing through a CheckpointManager, restoring at ``restore_at``.

    ``restore_from="disk"``: each restore opens a fresh manager on the directory, as a new
    process would, which decodes the key and every delta of the chain from the files.
    ``"memory"``: the saving manager restores, handing back the chain head it keeps (the
    reconstruction the files decode to, without decoding them); the first restore from a
    delta is also decoded from disk and must match it bit for bit (``disk_check``).
    """
    restore_set = set(restore_at)
    checkpoints: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    disk_check: dict[str, Any] = {}
    manager = CheckpointManager(directory, async_save=False, **setting)

    def from_disk() -> lctriton.Restored:
        with CheckpointManager(directory, async_save=False, **setting) as fresh:
            return fresh.restore("latest")

    def after_step(workload: examples.Workload, step: int, timings: dict[str, float]) -> None:
        nonlocal manager
        if step % every:
            return
        state = {"model": workload.model.state_dict(), "optimizer": workload.optimizer.state_dict()}
        tick = time.perf_counter()
        info = manager.save(step, state).result()
        timings["save_s"] += time.perf_counter() - tick
        record = {
            "step": step,
            "kind": info.kind,
            "base_step": info.base_step,
            "file_nbytes": info.nbytes,
            "raw_nbytes": info.raw_nbytes,
        }
        # Inspect now: retention may delete the file at a later save.
        record.update(_file_breakdown(manager.directory / info.file))
        checkpoints.append(record)
        if step not in restore_set:
            return
        tick = time.perf_counter()
        if restore_from == "disk":
            # The old manager is closed first, as if its process had died.
            manager.close()
            manager = CheckpointManager(directory, async_save=False, **setting)
        restored = manager.restore("latest")
        restore_s = time.perf_counter() - tick
        if restore_from == "memory" and not disk_check and restored.info.kind == "delta":
            tick = time.perf_counter()
            decoded = from_disk()
            disk_check.update(
                step=step,
                identical=_same_state(decoded.state, restored.state),
                decode_s=time.perf_counter() - tick,
            )
            if not disk_check["identical"]:
                logger.error(
                    "step %d: the chain decoded from disk differs from the manager's "
                    "in-memory head",
                    step,
                )
        if restored.step != step:
            raise RuntimeError(f"restoring after the save of step {step} gave step {restored.step}")
        error = _restore_error(state, restored.state)
        _discard_live_state(workload)
        tick = time.perf_counter()
        workload.model.load_state_dict(restored.state["model"])
        workload.optimizer.load_state_dict(restored.state["optimizer"])
        timings["restore_s"] += restore_s + time.perf_counter() - tick
        chain = 0
        for previous in reversed(checkpoints):  # deltas since the key this point decodes from
            if previous["kind"] == "key":
                break
            chain += 1
        restores.append(
            {
                "step": step,
                "kind": restored.info.kind,
                "chain_deltas": chain,
                "source": restore_from,
                "restore_s": restore_s,
                "error": error,
            }
        )
        logger.info(
            "  restored step %d from a %s (%d deltas after the key): weights rel L2 error %.3g",
            step,
            restored.info.kind,
            chain,
            error["model"]["rel_l2"],
        )

    try:
        run = _train(build, seed, steps, eval_at, after_step)
    finally:
        manager.close()
    run.checkpoints, run.restores, run.disk_check = checkpoints, restores, disk_check or None
    return run


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged value is recorded as null."""
    return value if math.isfinite(value) else None


def _rel_pct(value: float, reference: float) -> float | None:
    return _finite(100.0 * (value - reference) / reference) if reference else None


def _tail_mean(losses: Sequence[float]) -> float:
    """Mean of the last tenth (at least one) of a loss curve."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def _compare(reference: _Run, run: _Run, label: str) -> dict[str, Any]:
    """The fields every run's record has: final metrics, their differences from the
    reference, whether it is the reference bit for bit, its curves and timings."""
    ref_final, final = reference.final, run.final
    bit_identical = (
        run.train_loss == reference.train_loss
        and run.evals == reference.evals
        and _same_state(run.final_model, reference.final_model)
        and _same_state(run.final_optimizer, reference.final_optimizer)
    )
    record = {
        "label": label,
        "final": {"test_loss": _finite(final["test_loss"]), "test_acc": final["test_acc"]},
        "acc_diff_points": final["test_acc"] - ref_final["test_acc"],
        "loss_diff_rel_pct": _rel_pct(final["test_loss"], ref_final["test_loss"]),
        # The last tenth of the train-loss curve, averaged: a lossy restore can lower the
        # final test loss (its noise regularizes) while training clearly fits worse.
        "train_loss_tail_diff_rel_pct": _rel_pct(
            _tail_mean(run.train_loss), _tail_mean(reference.train_loss)
        ),
        "diverged": not all(math.isfinite(x) for x in run.train_loss + [final["test_loss"]]),
        "bit_identical": bit_identical,
        "final_weights_rel_distance": _finite(
            _rel_distance(reference.final_model, run.final_model)
        ),
        "train_loss": [_finite(x) for x in run.train_loss],
        "evals": [{**e, "test_loss": _finite(e["test_loss"])} for e in run.evals],
        "timings": run.timings,
    }
    loss = record["loss_diff_rel_pct"]
    logger.info(
        "  %s: test accuracy %.2f%% (%+.2f points), test loss %.4f (%s)%s",
        label,
        final["test_acc"],
        record["acc_diff_points"],
        final["test_loss"],
        "n/a" if loss is None else f"{loss:+.2f}%",
        ", bit-identical" if bit_identical else "",
    )
    return record


def _run_setting(
    build: Callable[[int], examples.Workload],
    reference: _Run,
    setting: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    every: int,
    restore_at: Sequence[int],
    eval_at: Sequence[int],
    workdir: Path,
    restore_from: str,
) -> dict[str, Any]:
    label = setting_label(setting)
    logger.info("setting %s", label)
    with tempfile.TemporaryDirectory(prefix="fidelity-", dir=workdir) as directory:
        run = _restored_run(
            build, seed, steps, every, restore_at, eval_at, setting, Path(directory), restore_from
        )
    deltas = [c for c in run.checkpoints if c["kind"] == "delta"]
    record = {"setting": dict(setting), **_compare(reference, run, label)}
    record.update(
        {
            "ratio": {"delta": _ratios(deltas), "all": _ratios(run.checkpoints)},
            "restores": run.restores,
            "restores_from_delta": sum(r["kind"] == "delta" for r in run.restores),
            "disk_check": run.disk_check,
            "checkpoints": run.checkpoints,
        }
    )
    logger.info(
        "  %s: delta ratio %s, all checkpoints %s",
        label,
        *(
            f"{r:.2f}" if r else "-"
            for r in (record["ratio"]["delta"]["state"], record["ratio"]["all"]["state"])
        ),
    )
    return record


def _run_control(
    build: Callable[[int], examples.Workload],
    reference: _Run,
    index: int,
    noise: float,
    *,
    seed: int,
    steps: int,
    restore_at: Sequence[int],
    eval_at: Sequence[int],
) -> dict[str, Any]:
    """A noise-floor run: no checkpoints; at each restore step the weights are multiplied by
    ``1 + noise * N(0, 1)`` (a few float32 ulps for the default 1e-6).

    Training is chaotic: any perturbation, however small, sends the run onto another
    trajectory whose final loss differs by chance. A lossy setting whose differences are
    within those of the controls cannot be told from that chance at this run length.
    """
    label = f"control {index}: weights x (1 + {noise:g} N(0,1)) at the restores"
    logger.info("noise-floor control %d", index)
    generator = torch.Generator().manual_seed(1_000_003 * (index + 1))
    perturb_at = set(restore_at)

    def after_step(workload: examples.Workload, step: int, timings: dict[str, float]) -> None:
        if step in perturb_at:
            with torch.no_grad():
                for tensor in workload.model.state_dict().values():
                    if tensor.is_floating_point():
                        factor = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                        tensor.mul_((1.0 + noise * factor).to(tensor.dtype))

    run = _train(build, seed, steps, eval_at, after_step)
    return {"control": {"index": index, "weight_noise": noise}, **_compare(reference, run, label)}


def sweep(
    build: Callable[[int], examples.Workload],
    settings: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    every: int,
    restores: int,
    seed: int = 0,
    eval_points: int = 10,
    controls: int = 0,
    control_noise: float = 1e-6,
    restore_from: str = "disk",
    workdir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the reference and one restored run per setting; return the record.

    Args:
        build: ``build(seed) -> Workload``; called once per run, with the same seed.
        settings: Dicts of ``CheckpointManager`` options, passed through unchanged
            (``async_save`` is always False: a restore must follow its save).
        steps: Training steps per run.
        every: Steps between checkpoints.
        restores: Restores per restored run (see :func:`restore_steps`).
        seed: The workload seed.
        eval_points: Test-set evaluations besides step 0, evenly spaced to ``steps``.
        controls: Noise-floor runs (no checkpoints; the weights get a relative
            ``control_noise`` perturbation at each restore step): how much the final
            metrics move by chance once the trajectory is perturbed at all.
        control_noise: Relative standard deviation of the controls' perturbation.
        restore_from: ``"disk"``: every restore decodes the chain from the files through a
            fresh manager, as after a crash. ``"memory"``: the saving manager hands back the
            chain head it keeps (what the files decode to; the first delta restore is also
            decoded from disk and compared bit for bit), for states whose chains take
            long to decode.
        workdir: Where checkpoint directories go (a temporary directory per setting,
            removed afterwards); default: the system's temporary directory.

    Returns:
        A JSON-ready dict: ``workload``, ``config``, ``reference``, ``settings`` (one record
        per setting, in order) and ``controls``. ``machine`` and ``command`` are the
        caller's to add.

    Raises:
        ValueError: If the schedule is impossible or a setting is not a dict.
    """
    if restore_from not in ("disk", "memory"):
        raise ValueError(f"restore_from must be 'disk' or 'memory', got {restore_from!r}")
    for setting in settings:
        if not isinstance(setting, Mapping):
            raise ValueError(
                f"a setting must be a dict of CheckpointManager options, got {setting!r}"
            )
        if "async_save" in setting:
            raise ValueError("async_save is fixed to False by the harness")
    restore_at = restore_steps(steps, every, restores)
    eval_at = eval_steps(steps, eval_points)
    started = time.time()
    loadavg = list(os.getloadavg())
    logger.info("reference run: %d steps", steps)
    reference = _train(build, seed, steps, eval_at)
    logger.info(
        "  reference: test accuracy %.2f%%, test loss %.4f (%.1f s)",
        reference.final["test_acc"],
        reference.final["test_loss"],
        reference.timings["wall_s"],
    )
    with tempfile.TemporaryDirectory(prefix="lctriton-fidelity-", dir=workdir) as scratch:
        records = [
            _run_setting(
                build,
                reference,
                setting,
                seed=seed,
                steps=steps,
                every=every,
                restore_at=restore_at,
                eval_at=eval_at,
                workdir=Path(scratch),
                restore_from=restore_from,
            )
            for setting in settings
        ]
    control_records = [
        _run_control(
            build,
            reference,
            index,
            control_noise,
            seed=seed,
            steps=steps,
            restore_at=restore_at,
            eval_at=eval_at,
        )
        for index in range(controls)
    ]
    return {
        "benchmark": "fidelity",
        "workload": reference.workload,
        "config": {
            "steps": steps,
            "every": every,
            "restores": restores,
            "seed": seed,
            "restore_steps": restore_at,
            "eval_steps": eval_at,
            "controls": controls,
            "control_noise": control_noise,
            "restore_from": restore_from,
        },
        "reference": {
            "final": reference.final,
            "train_loss": reference.train_loss,
            "evals": reference.evals,
            "timings": reference.timings,
        },
        "settings": records,
        "controls": control_records,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "loadavg_start": loadavg,
        "wall_s": time.time() - started,
    }


def check_record(record: Mapping[str, Any]) -> list[str]:
    """The harness's sanity check: problems with a sweep record (empty when sound).

    Every lossless setting must have reproduced the reference bit for bit, and a chain
    decoded from disk must equal the manager's in-memory head.
    """
    problems = [
        f"{s['label']}: a lossless setting did not reproduce the reference run bit for bit"
        for s in record["settings"]
        if s["setting"].get("lossless") is True and not s["bit_identical"]
    ]
    problems += [
        f"{s['label']}: step {s['disk_check']['step']} decoded from disk differs from the "
        "manager's in-memory chain head"
        for s in record["settings"]
        if s.get("disk_check") and not s["disk_check"]["identical"]
    ]
    return problems


# --------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, library versions and the lctriton commit (with the files that
    differ from it, since results of a dirty tree depend on them)."""
    import hashlib

    import numpy

    diff = _git("diff", "HEAD", "--", "lctriton", "kernels")
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "lctriton": lctriton.__version__,
        "lctriton_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the library change what was measured: name them.
        "lctriton_changes": (
            _git("status", "--porcelain", "--untracked-files=all", "--", "lctriton", "kernels")
            or ""
        ).splitlines(),
        "lctriton_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "lctriton_path": str(Path(lctriton.__file__).resolve().parent),
        # The machine may be shared: a high load makes the wall times mean little.
        "loadavg": list(os.getloadavg()),
        "lctriton_threads": os.environ.get("LCTRITON_THREADS"),
        "lctriton_backend": os.environ.get("LCTRITON_BACKEND"),
    }


# --------------------------------------------------------------------------- plot


def _smooth(values: Sequence[float | None], window: int) -> list[float]:
    """Trailing moving average (NaN where a value is missing or not finite)."""
    out, buffer = [], []
    for value in values:
        buffer.append(math.nan if value is None else value)
        if len(buffer) > window:
            buffer.pop(0)
        out.append(sum(buffer) / len(buffer))
    return out


def _eval_diffs(run: Mapping[str, Any], reference: Mapping[int, float]) -> list[tuple[int, float]]:
    """(step, test loss vs the reference's in %) at each evaluation with both losses finite."""
    return [
        (e["step"], 100.0 * (e["test_loss"] - reference[e["step"]]) / reference[e["step"]])
        for e in run["evals"]
        if e["test_loss"] is not None and reference.get(e["step"])
    ]


def plot(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, curves: int = 5
) -> None:
    """Draw the ratio-fidelity curve and the loss curves of one or more sweep records.

    Top row: final accuracy difference (points) and test-loss difference (%) against the
    compression ratio of the delta checkpoints (log scale), one marker per setting, one
    colour per workload, with the range the noise-floor controls reached shaded. Then one row
    per workload: smoothed train loss of the reference and of up to ``curves`` settings, and
    the test-loss difference from the reference at each evaluation (controls in grey), the
    restore steps dotted.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(records)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.2 * rows), squeeze=False)
    palette = plt.get_cmap("tab10")
    markers = "os^Dvp*hX<>"
    for w, record in enumerate(records):
        color = palette(w)
        name = record["workload"]["name"]
        for key, ax in (("acc_diff_points", axes[0][0]), ("loss_diff_rel_pct", axes[0][1])):
            chance = [c[key] for c in record.get("controls", []) if c[key] is not None]
            if chance:
                ax.axhspan(
                    min(chance + [0.0]),
                    max(chance + [0.0]),
                    color=color,
                    alpha=0.12,
                    label=f"{name}: noise floor ({len(chance)} controls)",
                )
            missing = 0
            for i, s in enumerate(record["settings"]):
                x = s["ratio"]["delta"]["state"] or s["ratio"]["all"]["state"]
                y = s[key]
                if x is None or y is None:
                    # Diverged (or nothing to compare): say so in the corner of the panel.
                    ax.annotate(
                        f"{name} {s['label']}: diverged",
                        (0.02, 0.02 + 0.06 * missing),
                        xycoords="axes fraction",
                        fontsize=8,
                        color=color,
                    )
                    missing += 1
                    continue
                ax.scatter(
                    [x],
                    [y],
                    color=color,
                    marker=markers[i % len(markers)],
                    s=50,
                    label=f"{name}: {s['label']}",
                    zorder=3,
                )
                ax.annotate(
                    s["label"],
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=8,
                    color=color,
                )
    for ax, ylabel in (
        (axes[0][0], "final test accuracy − reference (points)"),
        (axes[0][1], "final test loss vs reference (%)"),
    ):
        ax.set_xscale("log")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("compression ratio of delta checkpoints (raw tensor bytes / file bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[0][0].set_title("ratio–fidelity: final test accuracy")
    axes[0][1].set_title("ratio–fidelity: final test loss")

    for w, record in enumerate(records, start=1):
        name = record["workload"]["name"]
        config = record["config"]
        window = max(1, config["steps"] // 40)
        ax_loss, ax_diff = axes[w]
        steps = range(1, len(record["reference"]["train_loss"]) + 1)
        ax_loss.plot(
            steps,
            _smooth(record["reference"]["train_loss"], window),
            color="black",
            lw=2.2,
            label="reference",
        )
        ref_evals = {e["step"]: e["test_loss"] for e in record["reference"]["evals"]}
        for i, control in enumerate(record.get("controls", [])):
            points = _eval_diffs(control, ref_evals)
            if points:
                steps_c, values = zip(*points, strict=True)
                ax_diff.plot(
                    steps_c,
                    values,
                    color="grey",
                    lw=0.9,
                    alpha=0.7,
                    label="noise-floor controls" if i == 0 else None,
                )
        for i, s in enumerate(record["settings"][:curves]):
            color = palette(i + 1)
            dashed = "--" if s["bit_identical"] else "-"
            tag = " (bit-identical)" if s["bit_identical"] else ""
            ax_loss.plot(
                steps,
                _smooth(s["train_loss"], window),
                color=color,
                lw=1.2,
                ls=dashed,
                label=s["label"] + tag,
            )
            points = _eval_diffs(s, ref_evals)
            if points:
                steps_s, values = zip(*points, strict=True)
                ax_diff.plot(
                    steps_s,
                    values,
                    color=color,
                    marker="o",
                    ms=4,
                    ls=dashed,
                    label=s["label"] + tag,
                )
        for ax in (ax_loss, ax_diff):
            for step in config["restore_steps"]:
                ax.axvline(step, color="grey", lw=0.6, ls=":")
            ax.set_xlabel(f"step (dotted: the {len(config['restore_steps'])} restores)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel(f"train loss (mean of {window} steps)")
        ax_loss.set_title(f"{name}: train loss, a checkpoint every {config['every']} steps")
        ax_diff.axhline(0.0, color="grey", lw=0.8)
        ax_diff.set_ylabel("test loss vs reference (%)")
        ax_diff.set_title(f"{name}: test-loss difference during training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_settings(text: str) -> list[dict[str, Any]]:
    """Settings from ``--settings``: a preset name, a JSON list of dicts or one JSON dict, or
    the path of a file holding such JSON."""
    if text in PRESETS:
        return [dict(s) for s in PRESETS[text]]
    source = (
        Path(text).read_text()
        if not text.lstrip().startswith(("[", "{")) and Path(text).is_file()
        else text
    )
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--settings is neither a preset ({', '.join(PRESETS)}) nor JSON: {exc}"
        ) from exc
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ValueError("--settings JSON must be a dict or a list of dicts")
    return value


def _jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: strict JSON has no NaN, and a
    diverged run must not cost the record of the whole sweep."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_study(name: str, benchmark: str, command: str, started: float, results: Any) -> Path:
    """Write a study's record to ``benchmarks/results/<name>.json``: what ran (``benchmark``,
    ``command``), where (:func:`machine_info`), how long since ``started`` (a ``time.time()``)
    and its ``results``.

    Returns:
        The path written.
    """
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({
        "benchmark": benchmark,
        "command": command,
        "machine": machine_info(),
        "wall_s": time.time() - started,
        "results": results,
    }, indent=2) + "\n")
    return out


def _results_path(out: str, suffix: str) -> Path:
    name = out[: -len(".json")] if out.endswith(".json") else out
    path = Path(name) if os.sep in name else RESULTS_DIR / name
    return path.with_name(path.name + suffix)


def _table(record: Mapping[str, Any]) -> str:
    """The sweep's numbers as a Markdown table."""
    ref = record["reference"]["final"]

    def fmt(value: float | None, spec: str = ".2f") -> str:
        # A trailing "%" in spec is a literal percent sign, not the percent format.
        if value is None:
            return "-"
        return format(value, spec[:-1]) + "%" if spec.endswith("%") else format(value, spec)

    lines = [
        f"{record['workload']['name']}: reference test accuracy {ref['test_acc']:.2f}%, "
        f"test loss {ref['test_loss']:.4f}",
        "",
        "| setting | delta ratio: state | weights | optimizer | all ratio: state "
        "| acc diff (points) | loss diff | train loss diff (last 10%) | restores from a delta "
        "| bit-identical | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def fidelity(run: Mapping[str, Any]) -> str:
        loss = fmt(run["loss_diff_rel_pct"], "+.2f%")
        # .get: records written before this field existed still print.
        train = fmt(run.get("train_loss_tail_diff_rel_pct"), "+.1f%")
        return f"{run['acc_diff_points']:+.2f} | {loss} | {train}"

    def tail(run: Mapping[str, Any]) -> str:
        same = "yes" if run["bit_identical"] else "no"
        return f"{same} | {run['timings']['wall_s']:.0f} |"

    for s in record["settings"]:
        d, a = s["ratio"]["delta"], s["ratio"]["all"]
        ratios = " | ".join(fmt(r) for r in (d["state"], d["weights"], d["optimizer"], a["state"]))
        lines.append(
            f"| {s['label']} | {ratios} | {fidelity(s)} "
            f"| {s['restores_from_delta']}/{len(s['restores'])} | {tail(s)}"
        )
    for c in record.get("controls", []):
        lines.append(f"| {c['label']} | - | - | - | - | {fidelity(c)} | - | {tail(c)}")
    return "\n".join(lines)


def summarize(records: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of several records (seeds) of one sweep: per setting, the range over
    the records of the whole state's delta ratio, the accuracy and loss differences and the
    late training loss difference; then the same differences for the noise-floor controls.

    A single record's loss difference can be noise: on the digits CNN one control (weights
    perturbed by 1e-6) moved the final loss by 2%, so a setting is read against the spread
    of the others and of the controls over several seeds.
    """
    if not records:
        raise ValueError("summarize needs at least one record")
    seeds = [r.get("config", {}).get("seed") for r in records]
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        for run in record["settings"]:
            rows.setdefault(run["label"], []).append(run)
    controls = [c for record in records for c in record.get("controls", [])]

    def span(values: Sequence[float | None], spec: str) -> str:
        got = [v for v in values if v is not None]
        if not got:
            return "-"
        low, high = format(min(got), spec), format(max(got), spec)
        return low if low == high else f"{low} .. {high}"

    lines = [
        f"{records[0]['workload']['name']}, seeds {', '.join(str(s) for s in seeds)}: range over the seeds",
        "",
        "| setting | runs | delta ratio: state | acc diff (points) | loss diff (%) | train loss diff, last 10% (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, runs in list(rows.items()) + ([("noise-floor controls", controls)] if controls else []):
        ratio = span([r["ratio"]["delta"]["state"] for r in runs if "ratio" in r], ".1f")
        lines.append(
            f"| {label} | {len(runs)} | {ratio} | {span([r['acc_diff_points'] for r in runs], '+.2f')} "
            f"| {span([r['loss_diff_rel_pct'] for r in runs], '+.2f')} "
            f"| {span([r.get('train_loss_tail_diff_rel_pct') for r in runs], '+.1f')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a sweep (or only plot saved records) and write JSON and PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--steps", type=int, help="training steps (default per workload)")
    parser.add_argument(
        "--every", type=int, help="steps between checkpoints (default per workload)"
    )
    parser.add_argument(
        "--restores", type=int, help="restores per restored run (default per workload)"
    )
    parser.add_argument(
        "--settings",
        default="baseline",
        help=f"preset ({', '.join(PRESETS)}), JSON list of option dicts, or a JSON file",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-points", type=int, default=10, help="test evaluations besides step 0"
    )
    parser.add_argument(
        "--controls",
        type=int,
        help="noise-floor runs: weights perturbed by 1e-6 at the restore steps, no "
        "checkpoints (default per workload)",
    )
    parser.add_argument(
        "--restore-from",
        choices=("disk", "memory"),
        help="disk: every restore decodes the chain through a fresh manager; memory: the "
        "saving manager hands back its chain head, checked once against disk (default per "
        "workload)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); on a shared machine 1 avoids the threads "
        "spin-waiting for each other, which can make a step ten times slower",
    )
    parser.add_argument("--workdir", help="where checkpoint directories go (default: system temp)")
    parser.add_argument(
        "--out",
        help="result name under benchmarks/results/ (or a path), without suffix; "
        "default fidelity-<workload>",
    )
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="JSON",
        help="only plot these saved records together into <out>.png",
    )
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        help="only print the range over these saved records (seeds) of one sweep, per setting",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )

    if args.summarize:
        print(summarize([json.loads(Path(p).read_text()) for p in args.summarize]))
        return 0

    if args.plot:
        records = [json.loads(Path(p).read_text()) for p in args.plot]
        png = _results_path(args.out or "fidelity", ".png")
        plot(records, png)
        print(f"wrote {png}")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = WORKLOADS[args.workload]
    try:
        settings = parse_settings(args.settings)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    steps = args.steps or spec.steps
    build = functools.partial(spec.build, cosine_steps=steps) if spec.cosine_over_run else spec.build
    record = sweep(
        build,
        settings,
        steps=steps,
        every=args.every or spec.every,
        restores=spec.restores if args.restores is None else args.restores,
        seed=args.seed,
        eval_points=args.eval_points,
        workdir=args.workdir,
        controls=spec.controls if args.controls is None else args.controls,
        restore_from=args.restore_from or spec.restore_from,
    )
    record["command"] = (
        shlex.join(["python3", *sys.argv])
        if argv is None
        else shlex.join(["python3", "benchmarks/fidelity.py", *argv])
    )
    record["machine"] = machine_info()
    problems = check_record(record)
    record["sanity"] = {"ok": not problems, "problems": problems}
    out = _results_path(args.out or f"fidelity-{args.workload}", ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n")
    print(_table(record))
    print(f"wrote {out}")
    if not args.no_plot:
        png = out.with_suffix(".png")
        try:
            plot([record], png)
            print(f"wrote {png}")
        except ImportError:
            # The numbers are saved; the picture can be drawn later with --plot.
            print(
                f"no PNG: matplotlib is not installed (pip install matplotlib; then --plot {out})"
            )
    for problem in problems:
        print(f"SANITY CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
