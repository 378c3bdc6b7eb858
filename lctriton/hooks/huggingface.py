"""A Hugging Face ``transformers.Trainer`` callback that checkpoints through lctriton.

::

    from lctriton.hooks.huggingface import LctritonCallback

    manager = CheckpointManager("ckpt", every=50)
    args = TrainingArguments(..., save_strategy="no")   # let lctriton do the checkpointing
    callback = LctritonCallback(manager, resume=True)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    manager.close()

At the end of each optimizer step (``on_step_end``) the callback asks whether a checkpoint
is due and, if so, saves a :class:`lctriton.state.TrainingState` of the model, the optimizer,
the learning-rate scheduler and the random generators, with the :class:`TrainerState`
counters (global step, epoch, tokens seen, FLOs, best metric) as plain values in its
``extra["trainer_state"]``. ``on_train_end`` waits until every save is durable.

Resuming (``resume=True``) happens in ``on_train_begin``, the first moment at which the
Trainer has built its optimizer and scheduler. It restores the model, optimizer, scheduler,
generators and the TrainerState counters, so the run stops at the same ``max_steps`` and
the schedule continues. It does **not** fast-forward the data loader: the Trainer decides
how many batches to skip before ``on_train_begin`` and only from its own checkpoints, so the
resumed run starts its data from the beginning. Use Trainer's own ``resume_from_checkpoint``
where the exact data position matters.

Only the world-zero process saves; the model's ``state_dict()`` must hold the whole model
there (single process or DDP, not FSDP/DeepSpeed sharding). Importing this module needs
``transformers``; ``import lctriton`` and ``import lctriton.hooks`` never import it.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # transformers is an optional dependency
    raise ImportError(
        f"lctriton.hooks.huggingface needs Hugging Face transformers ({exc}): "
        "pip install transformers  (or pip install 'lctriton[integrations]')"
    ) from exc

from lctriton.hooks._core import CallbackCore
from lctriton.manager import CheckpointManager, Restored
from lctriton.state import TRAINING_STATE_FORMAT, TrainingState

__all__ = ["LctritonCallback", "TRAINER_STATE_FIELDS"]

logger = logging.getLogger(__name__)

#: The ``TrainerState`` fields saved (as plain values) and restored. ``log_history`` is left
#: out: it grows with every log and each checkpoint would carry all of it again.
TRAINER_STATE_FIELDS: tuple[str, ...] = (
    "epoch",
    "global_step",
    "max_steps",
    "num_input_tokens_seen",
    "total_flos",
    "best_metric",
    "best_global_step",
    "best_model_checkpoint",
)

# Restored into the TrainerState: ``max_steps`` is not, since it belongs to the resumed
# run's arguments (a run resumed to train longer must not stop at the old limit).
_RESTORED_FIELDS = tuple(name for name in TRAINER_STATE_FIELDS if name != "max_steps")

_PLAIN = (bool, int, float, str, type(None))


def _trainer_state_values(state: Any) -> dict[str, Any]:
    values = {}
    for name in TRAINER_STATE_FIELDS:
        value = getattr(state, name, None)
        # Only plain values: the checkpoint format stores no arbitrary objects.
        values[name] = value if isinstance(value, _PLAIN) else None
    return values


class LctritonCallback(CallbackCore, TrainerCallback):
    """Save lctriton checkpoints from a ``transformers.Trainer`` run.

    Args:
        manager: Where checkpoints go. The callback does not close it.
        every: Save every this many optimizer steps (``state.global_step``). ``None`` asks
            ``manager.should_save(step)`` instead (its ``every`` or ``schedule``; the
            Trainer hands callbacks no loss, so a schedule receives ``loss=None``).
        save_optimizer: Also save the optimizer and the learning-rate scheduler (needed to
            resume training; False keeps only the model, generators and counters).
        resume: In ``on_train_begin``, restore the manager's latest checkpoint, if any.
        rng: Save (and restore) the python, numpy, torch and CUDA generators.

    Attributes:
        last_save: Handle of the latest save, or ``None``.
        saved_steps: Steps saved by this callback, in order.
        restored: What ``resume`` restored, or ``None``.

    Raises:
        TypeError: If ``manager`` lacks ``save``/``should_save``/``restore``, or a flag is not
            a bool.
        ValueError: If ``every`` is not a positive int or None.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        every: int | None = None,
        save_optimizer: bool = True,
        *,
        resume: bool = False,
        rng: bool = True,
    ) -> None:
        self._init_core(manager, every, "every", save_optimizer, resume, rng)

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Resume from the latest checkpoint when ``resume`` is set."""
        self._last_seen = state.global_step
        if self.resume and self.manager.latest_step is not None:
            self.restored = self.restore(
                kwargs["model"],
                kwargs.get("optimizer"),
                kwargs.get("lr_scheduler"),
                trainer_state=state,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save when a checkpoint is due at ``state.global_step``."""
        step = state.global_step
        # The Trainer hands callbacks no loss: a schedule gets None.
        if not self._due(step, state.is_world_process_zero):
            return
        values = _trainer_state_values(state)
        training_state = TrainingState(
            model=kwargs["model"],
            optimizer=kwargs.get("optimizer") if self.save_optimizer else None,
            scheduler=kwargs.get("lr_scheduler") if self.save_optimizer else None,
            step=step,
            epoch=int(state.epoch or 0),
            extra={"trainer_state": values},
            rng=self.rng,
        )
        metadata = {"epoch": values["epoch"]} if isinstance(values["epoch"], float) else None
        self._record(step, self.manager.save(step, training_state, metadata=metadata))
        logger.debug("saved a checkpoint at global step %d", step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Wait until every checkpoint of the run is durable (raises a background error)."""
        self.manager.wait()

    # ------------------------------------------------------------------ restoring

    def restore(
        self,
        model: Any,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        *,
        trainer_state: Any = None,
        which: int | str = "latest",
    ) -> Restored:
        """Load a checkpoint saved by this callback into live objects.

        Parts of the checkpoint with no live object here are skipped, so ``restore(model)``
        loads the weights alone. The random generators are restored only when resuming a
        run, that is when ``trainer_state`` is given.

        Args:
            model: The model (``trainer.model``).
            optimizer: The Trainer's optimizer, to restore its state.
            lr_scheduler: The Trainer's scheduler, to restore its state.
            trainer_state: A ``TrainerState`` whose counters (all of
                :data:`TRAINER_STATE_FIELDS` but ``max_steps``) are set from the checkpoint.
            which: ``"latest"``, a step or a tag.

        Returns:
            What the manager restored.

        Raises:
            ValueError: If the checkpoint is not a training state.
            LookupError: If ``which`` names no checkpoint.
        """
        restored = self.manager.restore(which)
        saved = restored.state
        if not isinstance(saved, dict) or saved.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(
                f"checkpoint {which!r} (step {restored.step}) is not a TrainingState saved by "
                "LctritonCallback"
            )
        live = {"optimizer": optimizer, "scheduler": lr_scheduler}
        skipped = [part for part, obj in live.items() if part in saved and obj is None]
        if skipped:
            logger.info(
                "restoring step %d without its %s state", restored.step, " and ".join(skipped)
            )
        # Give TrainingState exactly the parts to load: its strict check then still catches a
        # model whose keys differ from the checkpoint's.
        saved = {k: v for k, v in saved.items() if k not in skipped}
        resuming = trainer_state is not None
        if not resuming:
            saved.pop("rng", None)
        training_state = TrainingState(
            model=model,
            optimizer=optimizer if "optimizer" in saved else None,
            scheduler=lr_scheduler if "scheduler" in saved else None,
            rng="rng" in saved,
        )
        training_state.load_state_dict(saved)
        if trainer_state is not None:
            values = (training_state.extra or {}).get("trainer_state", {})
            for name in _RESTORED_FIELDS:
                if name in values:
                    setattr(trainer_state, name, values[name])
            trainer_state.global_step = restored.step
        self._last_seen = restored.step
        logger.info("restored the checkpoint of step %d", restored.step)
        return restored
