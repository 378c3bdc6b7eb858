"""Helpers shared by the kernel modules: interpreter detection, autotune candidates, checks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton

__all__ = ["interpreting", "perf_configs", "check_tensor", "check_device", "DTYPE_KIND"]

#: Code passed to kernels as a constexpr for each floating dtype they accept.
DTYPE_KIND = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def perf_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """Autotune candidates: all of them on a GPU, only the first under the interpreter
    (with several, ``triton.autotune`` benchmarks through a GPU driver)."""
    configs = list(configs)
    return configs[:1] if interpreting() else configs


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` can be handed to a Triton kernel here."""
    if not (t.is_cuda or interpreting()):
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor or TRITON_INTERPRET=1 "
            "(lctriton.kernels.reference is the CPU codec)"
        )


def check_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A launcher's tensor argument, checked for its device, as a flat contiguous tensor.

    Raises:
        ValueError: If it lives where no kernel can read it.
    """
    check_device(name, t)
    return t.contiguous().reshape(-1)
