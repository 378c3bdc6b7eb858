"""Drop-in replacements for the APIs of other checkpoint-compression packages.

Each submodule keeps the function names and signatures of the package it replaces, so a
training script switches by changing one import, but does the work with lctriton's codec
and container (no pickle):

* :mod:`lctriton.compat.lc_checkpoint`: the ``lc_checkpoint`` package from PyPI
  (``import lctriton.compat.lc_checkpoint as lc_checkpoint``).
"""

from __future__ import annotations

from lctriton.compat import lc_checkpoint

__all__ = ["lc_checkpoint"]
