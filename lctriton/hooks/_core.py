"""What the framework callbacks share: argument checks, bookkeeping, when a save is due."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CallbackCore"]


class CallbackCore:
    """Base of the Hugging Face and Lightning callbacks.

    Attributes:
        manager: Where checkpoints go.
        every: Save every this many steps; ``None`` asks ``manager.should_save``.
        save_optimizer: Also save optimizers and schedulers.
        resume: Restore the latest checkpoint when training starts.
        rng: Save and restore the random generators.
        last_save: Handle of the latest save, or ``None``.
        saved_steps: Steps saved, in order.
        restored: What ``resume`` restored, or ``None``.
    """

    def _init_core(self, manager: Any, every: int | None, every_name: str, save_optimizer: bool,
                   resume: bool, rng: bool) -> None:
        if not all(hasattr(manager, m) for m in ("save", "should_save", "restore", "wait")):
            raise TypeError(f"manager must be a CheckpointManager, got {type(manager).__name__}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"{every_name} must be a positive int or None, got {every!r}")
        for name, value in (("save_optimizer", save_optimizer), ("resume", resume), ("rng", rng)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.manager = manager
        self.every = every
        self.save_optimizer = save_optimizer
        self.resume = resume
        self.rng = rng
        self.last_save = None
        self.saved_steps: list[int] = []
        self.restored = None
        self._last_seen = -1

    def _due(self, step: int, main_process: bool, loss: Callable[[], float | None] | None = None) -> bool:
        """Whether to save at ``step``; each step is decided once (several batches can end
        on one optimizer step with gradient accumulation), on the main process only.

        Args:
            step: The global optimizer step.
            main_process: Whether this process saves.
            loss: Returns the step's loss; called only when the manager has a schedule that
                can use it (reading a loss may wait for the device).
        """
        if step <= self._last_seen:
            return False
        self._last_seen = step
        if not main_process:
            return False
        if self.every is not None:
            return step % self.every == 0
        scheduled = getattr(self.manager, "schedule", None) is not None
        return self.manager.should_save(step, loss() if scheduled and loss is not None else None)

    def _record(self, step: int, handle: Any) -> None:
        self.last_save = handle
        self.saved_steps.append(step)
