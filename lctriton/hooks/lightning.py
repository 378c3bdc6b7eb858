"""A PyTorch Lightning callback that checkpoints through lctriton.

::

    from lctriton.hooks.lightning import LctritonCheckpoint

    manager = CheckpointManager("ckpt", every=50)
    trainer = lightning.Trainer(max_steps=10_000, enable_checkpointing=False,
                                callbacks=[LctritonCheckpoint(manager, resume=True)])
    trainer.fit(module, loader)
    manager.close()

After each training batch that completed an optimizer step (``trainer.global_step``
advanced) the callback asks whether a checkpoint is due and, if so, saves::

    {"format": "lctriton-lightning", "version": 1, "step", "epoch",
     "model":         pl_module.state_dict(),
     "optimizers":    [state dict of each of trainer.optimizers],
     "lr_schedulers": [state dict of each configured scheduler],
     "precision":     the precision plugin's state (the AMP grad scaler), when it has one,
     "loops":         {"fit_loop": trainer.fit_loop.state_dict()}  (progress counters),
     "rng":           lctriton.state.capture_rng()}

``on_train_end`` waits until every save is durable. Restoring (``resume=True``, or
:meth:`LctritonCheckpoint.restore` called during ``fit``) happens in ``on_fit_start``, which
Lightning runs after building the optimizers and right before it would restore a
``ckpt_path`` itself, and puts back the same parts, loop progress included, so
``trainer.global_step`` continues and ``max_steps`` counts the whole run: the result is the
same as Lightning's own ``ckpt_path`` resume of the same step (a ``ckpt_path`` given as well
is restored after, and wins). As there, a data loader that is not resumable restarts its
epoch from the beginning (Lightning warns). For the weights alone,
``manager.restore(model=module)`` works outside any Trainer.

The base class is ``lightning.pytorch.Callback`` when the ``lightning`` package imports,
else ``pytorch_lightning.Callback``; each Trainer accepts only its own package's callbacks.
Only the global-zero process saves; the module's ``state_dict()`` must hold the whole
model there (single device or DDP, not FSDP/DeepSpeed sharding). Importing this module
needs Lightning; ``import lctriton`` and ``import lctriton.hooks`` never import it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    try:  # the standalone package name of Lightning before 2.0, still published
        import pytorch_lightning as pl
    except ImportError as exc:  # Lightning is an optional dependency
        raise ImportError(
            f"lctriton.hooks.lightning needs PyTorch Lightning ({exc}): "
            "pip install lightning  (or pip install 'lctriton[integrations]')"
        ) from exc

import torch

from lctriton.hooks._core import CallbackCore
from lctriton.manager import CheckpointManager, Restored
from lctriton.state import capture_rng, restore_rng

__all__ = ["LctritonCheckpoint", "LIGHTNING_STATE_FORMAT", "LIGHTNING_STATE_VERSION"]

logger = logging.getLogger(__name__)

LIGHTNING_STATE_FORMAT = "lctriton-lightning"
LIGHTNING_STATE_VERSION = 1


def _loss_value(outputs: Any) -> float | None:
    """The training loss in ``training_step``'s output, if it has one."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach().item())
    return None


class LctritonCheckpoint(CallbackCore, pl.Callback):
    """Save lctriton checkpoints from a Lightning ``Trainer.fit`` run.

    Args:
        manager: Where checkpoints go. The callback does not close it.
        every_n_train_steps: Save every this many optimizer steps (``trainer.global_step``).
            ``None`` asks ``manager.should_save(step, loss)`` instead, with the loss that
            ``training_step`` returned when the manager has a schedule.
        save_optimizer: Also save optimizers, schedulers and the precision plugin (needed to
            resume training).
        resume: In ``on_fit_start``, restore the manager's latest checkpoint, if any.
        rng: Save (and restore) the python, numpy, torch and CUDA generators.

    Attributes:
        last_save: Handle of the latest save, or ``None``.
        saved_steps: Steps saved by this callback, in order.
        restored: What ``resume`` restored, or ``None``.

    Raises:
        TypeError: If ``manager`` lacks ``save``/``should_save``/``restore``, or a flag is not
            a bool.
        ValueError: If ``every_n_train_steps`` is not a positive int or None.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        every_n_train_steps: int | None = None,
        *,
        save_optimizer: bool = True,
        resume: bool = False,
        rng: bool = True,
    ) -> None:
        super().__init__()
        self._init_core(manager, every_n_train_steps, "every_n_train_steps", save_optimizer, resume, rng)

    @property
    def every_n_train_steps(self) -> int | None:
        """Save every this many optimizer steps (None: the manager decides)."""
        return self.every

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Resume from the latest checkpoint when ``resume`` is set."""
        self._last_seen = trainer.global_step
        if self.resume and self.manager.latest_step is not None:
            self.restored = self.restore(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Save when a checkpoint is due at ``trainer.global_step``."""
        step = trainer.global_step
        if not self._due(step, trainer.is_global_zero, lambda: _loss_value(outputs)):
            return
        handle = self.manager.save(
            step, self._state(trainer, pl_module, step), metadata={"epoch": trainer.current_epoch}
        )
        self._record(step, handle)
        logger.debug("saved a checkpoint at global step %d", step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Wait until every checkpoint of the run is durable (raises a background error)."""
        self.manager.wait()

    # ------------------------------------------------------------------ state

    def _state(self, trainer: Any, pl_module: Any, step: int) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": LIGHTNING_STATE_FORMAT,
            "version": LIGHTNING_STATE_VERSION,
            "step": step,
            "epoch": trainer.current_epoch,
            "model": pl_module.state_dict(),
            "loops": {"fit_loop": trainer.fit_loop.state_dict()},
        }
        if self.save_optimizer:
            # The strategy's view of an optimizer's state (consolidated where it is sharded).
            state["optimizers"] = [trainer.strategy.optimizer_state(o) for o in trainer.optimizers]
            state["lr_schedulers"] = [
                c.scheduler.state_dict() for c in trainer.lr_scheduler_configs
            ]
            precision = trainer.precision_plugin.state_dict()
            if precision:
                state["precision"] = precision
        if self.rng:
            state["rng"] = capture_rng()
        return state

    def restore(self, trainer: Any, pl_module: Any, which: int | str = "latest") -> Restored:
        """Load a checkpoint saved by this callback into a Trainer that is fitting.

        Call it from ``on_fit_start`` or later (``resume=True`` does), when the Trainer's
        optimizers and schedulers exist.

        Args:
            trainer: The Trainer.
            pl_module: The LightningModule.
            which: ``"latest"``, a step or a tag.

        Returns:
            What the manager restored.

        Raises:
            ValueError: If the checkpoint was not saved by this callback, or its optimizers or
                schedulers do not match the Trainer's in number.
            LookupError: If ``which`` names no checkpoint.
        """
        restored = self.manager.restore(which)
        saved = restored.state
        if not isinstance(saved, dict) or saved.get("format") != LIGHTNING_STATE_FORMAT:
            raise ValueError(
                f"checkpoint {which!r} (step {restored.step}) was not saved by LctritonCheckpoint"
            )
        if saved.get("version") != LIGHTNING_STATE_VERSION:
            raise ValueError(
                f"checkpoint {which!r} has version {saved.get('version')!r}; this lctriton reads "
                f"version {LIGHTNING_STATE_VERSION}"
            )
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        # Check every count before loading anything, so a mismatch leaves the run untouched.
        for part, live in (("optimizers", trainer.optimizers), ("lr_schedulers", schedulers)):
            if part in saved and len(saved[part]) != len(live):
                raise ValueError(
                    f"the checkpoint at step {restored.step} holds {len(saved[part])} {part} but "
                    f"the trainer has {len(live)} (restore during fit, e.g. with resume=True)"
                )
        pl_module.load_state_dict(saved["model"])
        if "optimizers" in saved:  # absent when saved with save_optimizer=False
            for optimizer, opt_state in zip(trainer.optimizers, saved["optimizers"], strict=True):
                optimizer.load_state_dict(opt_state)
        if "lr_schedulers" in saved:
            for scheduler, sched_state in zip(schedulers, saved["lr_schedulers"], strict=True):
                scheduler.load_state_dict(sched_state)
        if "precision" in saved:
            trainer.precision_plugin.load_state_dict(saved["precision"])
        # The loop progress carries global_step, the epoch and the batch position, as it does
        # in Lightning's own checkpoints.
        trainer.fit_loop.load_state_dict(saved["loops"]["fit_loop"])
        if "rng" in saved:
            restore_rng(saved["rng"])
        self._last_seen = restored.step
        logger.info("restored the checkpoint of step %d", restored.step)
        return restored
