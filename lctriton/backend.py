"""Dispatch of codec passes: CUDA tensors to the Triton kernels, others to the reference.

``LCTRITON_BACKEND`` forces a choice for debugging: ``reference`` runs the pure-torch
reference everywhere (CUDA tensors included), ``triton`` requires the Triton kernels (under
``TRITON_INTERPRET=1`` they run on CPU tensors too), ``auto`` (the default) picks by device.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from lctriton.kernels import reference

__all__ = ["BACKEND_ENV", "choose", "threads_allowed", "lc_histogram", "lc_encode", "lc_decode", "fingerprint"]

logger = logging.getLogger(__name__)

BACKEND_ENV = "LCTRITON_BACKEND"
_CHOICES = ("auto", "reference", "triton")


def _forced() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(_CHOICES)}, got {value!r}")
    return value


def _triton_module() -> ModuleType | None:
    """The Triton kernels, when they exist in this installation and triton imports."""
    try:
        return importlib.import_module("lctriton.kernels.triton_codec")
    except ImportError:
        return None


def choose(device: torch.device | str) -> ModuleType:
    """The module whose launchers handle tensors on ``device``.

    Raises:
        RuntimeError: If ``LCTRITON_BACKEND=triton`` but the Triton kernels are unavailable.
    """
    forced = _forced()
    if forced == "reference":
        return reference
    device = torch.device(device)
    if forced == "auto" and device.type != "cuda":
        return reference
    module = _triton_module()
    if module is None:
        if forced == "triton":
            raise RuntimeError(f"{BACKEND_ENV}=triton but the Triton kernels cannot be imported")
        logger.debug("Triton kernels unavailable; using the reference codec on %s", device)
        return reference
    return module


def threads_allowed(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` may be coded from several threads at once: true for the
    reference codec; Triton's CPU interpreter patches the language globally while it runs."""
    return choose(device) is reference


def lc_histogram(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Pass 1 on the backend of ``x``'s device (see ``reference.lc_histogram``)."""
    return choose(x.device).lc_histogram(x, base)


def lc_encode(x, base, key_to_symbol, representatives, code_lengths, chunk_symbols):
    """Pass 2 on the backend of ``x``'s device (see ``reference.lc_encode``)."""
    return choose(x.device).lc_encode(x, base, key_to_symbol, representatives, code_lengths, chunk_symbols)


def lc_decode(items: list[reference.LcStream], chunk_symbols: int, device: torch.device) -> list[torch.Tensor]:
    """Decode many streams on ``device``'s backend (see ``reference.lc_decode``)."""
    return choose(device).lc_decode(items, chunk_symbols)


def fingerprint(tensor: torch.Tensor) -> int:
    """Fingerprint on the tensor's backend (see ``reference.fingerprint``)."""
    return choose(tensor.device).fingerprint(tensor)
