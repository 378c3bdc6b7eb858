"""Training-loop integrations: checkpoint with a :class:`~lctriton.manager.CheckpointManager`
from a plain loop, a Hugging Face ``Trainer`` or a PyTorch Lightning ``Trainer``.

This package exports only the plain-loop helpers, which need nothing beyond torch. The
framework callbacks live in submodules that import their framework, and are imported
explicitly so that ``import lctriton.hooks`` never pulls in transformers or lightning::

    from lctriton.hooks import checkpoint_every, CheckpointedOptimizerStep
    from lctriton.hooks.huggingface import LctritonCallback     # needs transformers
    from lctriton.hooks.lightning import LctritonCheckpoint     # needs lightning

Install both frameworks with ``pip install "lctriton[integrations]"``.
"""

from lctriton.hooks.loop import CheckpointedOptimizerStep, StepHook, checkpoint_every

__all__ = ["checkpoint_every", "StepHook", "CheckpointedOptimizerStep"]
