"""Checkpointing from a plain PyTorch training loop, with one line of setup.

Two styles, both counting the steps the optimizer takes (not batches: with gradient
accumulation several batches make one step, and a step that a ``GradScaler`` skips for
non-finite gradients is not counted) and both saving through a
:class:`~lctriton.manager.CheckpointManager`:

* :func:`checkpoint_every` registers a hook on the optimizer: the loop stays as it is, and
  every ``every``-th ``optimizer.step()`` (or each step the manager's schedule picks)
  saves::

      hook = checkpoint_every(opt, manager, lambda: ts, every=100)
      for batch in loader:
          loss_fn(model(batch)).backward()
          opt.step()                        # saves at steps 100, 200, ...
          opt.zero_grad()
      hook.remove()
      manager.close()

* :class:`CheckpointedOptimizerStep` replaces ``optimizer.step()`` with ``step(loss)``, as
  COCI's ``optimizer_step(loss, model, optimizer)`` does: the loss of the step is handed to
  the manager's schedule, so a convergence-aware policy can place checkpoints where the loss
  still falls fast::

      ckpt = CheckpointedOptimizerStep(opt, manager, lambda: ts)
      for batch in loader:
          loss = loss_fn(model(batch))
          loss.backward()
          ckpt.step(loss)                   # optimizer.step(), then save if the schedule says so
          ckpt.zero_grad()

``state_fn`` returns what to save: a state dict, or an object with ``state_dict()`` such as
:class:`lctriton.state.TrainingState` (whose ``step`` is then set to the step being saved, so
the checkpoint knows where it was taken).

The manager copies the state before ``save`` returns, so the next ``optimizer.step()`` may
change the parameters at once: no pre-step wait is needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from lctriton.manager import CheckpointManager, SaveHandle
from lctriton.state import TrainingState

__all__ = ["checkpoint_every", "StepHook", "CheckpointedOptimizerStep"]

logger = logging.getLogger(__name__)

StateFn = Callable[[], Any]


def _check_step(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_every(every: Any) -> int | None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive int or None, got {every!r}")
    return every


def _check_common(optimizer: Any, manager: Any, state_fn: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not (hasattr(manager, "save") and hasattr(manager, "should_save")):
        raise TypeError(
            "manager must be a CheckpointManager (with save() and should_save()), "
            f"got {type(manager).__name__}"
        )
    if not callable(state_fn):
        raise TypeError(f"state_fn must be callable, got {type(state_fn).__name__}")


def _gather(state_fn: StateFn, step: int) -> Any:
    """Call ``state_fn`` and turn its result into what the manager stores."""
    state = state_fn()
    if isinstance(state, TrainingState):
        # The saved state must carry the step it was taken at, whatever the caller last set.
        return state.state_dict(step=step)
    return state


def _loss_value(loss: Any) -> float | None:
    """The loss as a Python float (``None`` stays ``None``).

    Raises:
        TypeError: If ``loss`` is neither a number nor a one-element tensor.
    """
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(f"loss must be a one-element tensor, got shape {tuple(loss.shape)}")
        # .item() waits for the device; a convergence-aware schedule needs the value now.
        return float(loss.detach().item())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a float or a one-element tensor, got {type(loss).__name__}")
    return float(loss)


class StepHook:
    """What :func:`checkpoint_every` returns: a removable handle on the optimizer hook.

    Attributes:
        step: Optimizer steps counted so far (``start_step`` plus the steps seen).
        every: The fixed interval, or ``None`` when the manager's schedule decides.
        last_save: The :class:`~lctriton.manager.SaveHandle` of the latest save, or ``None``.
        saved_steps: Steps saved by this hook, in order.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        manager: CheckpointManager,
        state_fn: StateFn,
        every: int | None,
        start_step: int,
    ) -> None:
        self.manager = manager
        self.state_fn = state_fn
        self.every = every
        self.step = start_step
        self.last_save: SaveHandle | None = None
        self.saved_steps: list[int] = []
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.every is not None:
            due = self.step % self.every == 0
        else:
            due = self.manager.should_save(self.step)
        if due:
            # An error here (e.g. an earlier background save failed) leaves optimizer.step():
            # the loop must not go on believing it is protected.
            self.last_save = self.manager.save(self.step, _gather(self.state_fn, self.step))
            self.saved_steps.append(self.step)
            logger.debug("saved a checkpoint at optimizer step %d", self.step)

    def remove(self) -> None:
        """Detach the hook from the optimizer; later steps neither count nor save. Saves
        already started go on (``manager.wait()`` waits for them). Calling it twice is fine."""
        self._handle.remove()

    def __enter__(self) -> StepHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        when = f"every={self.every}" if self.every is not None else "schedule"
        return f"StepHook(step={self.step}, {when}, saved={len(self.saved_steps)})"


def checkpoint_every(
    optimizer: torch.optim.Optimizer,
    manager: CheckpointManager,
    state_fn: StateFn,
    every: int | None = None,
    *,
    start_step: int = 0,
) -> StepHook:
    """Save a checkpoint after every ``every``-th ``optimizer.step()``.

    The hook runs after each ``optimizer.step()`` (``register_step_post_hook``), counts it,
    and at steps ``every``, ``2*every``, ... calls ``manager.save(step, state_fn())``.

    Args:
        optimizer: The optimizer whose steps are counted.
        manager: Where checkpoints go.
        state_fn: Returns the state to save: a state dict or an object with ``state_dict()``
            (a :class:`~lctriton.state.TrainingState` gets ``step`` set to the step saved).
            Called only when a checkpoint is due.
        every: Save every this many optimizer steps. ``None`` asks
            ``manager.should_save(step)`` after each step instead, so the manager's
            ``every`` or ``schedule`` decides.
        start_step: Steps already taken, e.g. ``manager.restore(...).step`` when resuming,
            so that step numbers continue where the restored run stopped.

    Returns:
        A :class:`StepHook`; call its ``remove()`` (or use it as a context manager) to stop
        checkpointing. It also reports the step count and the saves made.

    Raises:
        TypeError: If ``optimizer`` is not an optimizer, ``manager`` lacks ``save`` and
            ``should_save``, or ``state_fn`` is not callable.
        ValueError: If ``every`` is not a positive int or None, or ``start_step`` is negative.
    """
    _check_common(optimizer, manager, state_fn)
    every = _check_every(every)
    start_step = _check_step(start_step, "start_step")
    return StepHook(optimizer, manager, state_fn, every, start_step)


class CheckpointedOptimizerStep:
    """``optimizer.step()`` followed by a checkpoint when the manager's schedule wants one.

    Modelled on COCI's ``optimizer_step(loss, model, optimizer)``, which a training script
    calls in place of ``optimizer.step()``: the loss of the step is what a convergence-aware
    schedule (checkpoints at equal decrements of the fitted loss curve) needs, so it is passed
    to ``manager.should_save(step, loss)``. With a manager built with ``every=k`` and no
    schedule, the loss is ignored and every ``k``-th step saves.

    Unlike COCI this does not wait for a previous snapshot before stepping: the manager has
    copied the state by the time ``save`` returns.

    Args:
        optimizer: The optimizer to step.
        manager: Where checkpoints go; its ``should_save(step, loss)`` decides when.
        state_fn: Returns the state to save (see :func:`checkpoint_every`).
        start_step: Steps already taken (when resuming).

    Attributes:
        step_count: Optimizer steps taken so far, ``start_step`` included.
        last_save: The handle of the latest save, or ``None``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``start_step`` is negative.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        manager: CheckpointManager,
        state_fn: StateFn,
        *,
        start_step: int = 0,
    ) -> None:
        _check_common(optimizer, manager, state_fn)
        self.optimizer = optimizer
        self.manager = manager
        self.state_fn = state_fn
        self.step_count = _check_step(start_step, "start_step")
        self.last_save: SaveHandle | None = None

    def step(self, loss: float | torch.Tensor | None = None) -> SaveHandle | None:
        """Take one optimizer step, then checkpoint if ``manager.should_save`` says so.

        Gradients must already be computed (call ``loss.backward()`` first); this neither
        computes nor clears them.

        Args:
            loss: The training loss of this step (a float or a one-element tensor; a tensor
                is read with ``.item()``, which waits for the device). Passed to the
                schedule and, when finite, stored as ``metadata["loss"]`` of the checkpoint.

        Returns:
            The save's handle when a checkpoint was started, else ``None``.

        Raises:
            TypeError: If ``loss`` is not a number or a one-element tensor.
            LctError: If an earlier background save failed.
        """
        value = _loss_value(loss)
        self.optimizer.step()
        self.step_count += 1
        if not self.manager.should_save(self.step_count, value):
            return None
        metadata = {"loss": value} if value is not None and math.isfinite(value) else None
        self.last_save = self.manager.save(
            self.step_count, _gather(self.state_fn, self.step_count), metadata=metadata
        )
        logger.debug("saved a checkpoint at optimizer step %d (loss %s)", self.step_count, value)
        return self.last_save

    # COCI's name for the same call.
    optimizer_step = step

    def __call__(self, loss: float | torch.Tensor | None = None) -> SaveHandle | None:
        """Same as :meth:`step`."""
        return self.step(loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad(set_to_none)``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        name = type(self.optimizer).__name__
        return f"CheckpointedOptimizerStep(step={self.step_count}, optimizer={name})"
