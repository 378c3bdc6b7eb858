"""Helpers shared by the kernel modules: interpreter detection and argument checks."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "check_tensor", "check_device", "check_pair", "DTYPE_KIND"]

#: Code passed to kernels as a constexpr for each floating dtype they accept.
DTYPE_KIND = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` can be handed to a Triton kernel here."""
    if not (t.is_cuda or interpreting()):
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor or TRITON_INTERPRET=1 "
            "(lctriton.kernels.reference is the CPU codec)"
        )


def check_pair(x: object, base: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a launcher's ``x`` (a floating tensor) and ``base`` (None or its twin).

    Returns:
        Both flat and contiguous (``base`` None when absent).

    Raises:
        TypeError: If either is not a tensor or ``x`` has an unsupported dtype.
        ValueError: If ``base`` differs from ``x`` in shape, dtype or device, or a kernel
            cannot read them where they are.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_KIND:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    flat = check_tensor("x", x)
    if base is None:
        return flat, None
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a tensor or None, got {type(base).__name__}")
    if base.shape != x.shape or base.dtype != x.dtype or base.device != x.device:
        raise ValueError(
            f"base must match x in shape, dtype and device: x is {tuple(x.shape)} {x.dtype} on {x.device}, "
            f"base is {tuple(base.shape)} {base.dtype} on {base.device}"
        )
    return flat, check_tensor("base", base)


def check_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A launcher's tensor argument, checked for its device, as a flat contiguous tensor.

    Raises:
        ValueError: If it lives where no kernel can read it.
    """
    check_device(name, t)
    return t.contiguous().reshape(-1)
