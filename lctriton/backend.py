"""Dispatch of codec passes: CUDA tensors to the Triton kernels, others to the reference.

On CPU the rANS coder's loops run compiled (``lctriton.kernels.rans_cpu``, byte for byte the
reference's format) where a C compiler is present, and as the numpy reference elsewhere.

``LCTRITON_BACKEND`` forces a choice for debugging: ``reference`` runs the pure-torch
reference everywhere (CUDA tensors included, and the numpy rANS loops), ``triton`` requires
the Triton kernels (under ``TRITON_INTERPRET=1`` they run on CPU tensors too), ``auto`` (the
default) picks by device.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from lctriton.kernels import reference

__all__ = [
    "BACKEND_ENV",
    "choose",
    "threads_allowed",
    "lc_histogram",
    "lc_encode",
    "lc_decode",
    "lc_symbols",
    "lc_reconstruct",
    "lq_symbols",
    "lq_reconstruct",
    "sq_symbols",
    "sq_reconstruct",
    "rans_encode",
    "rans_encode_streams",
    "rans_decode",
    "moment_contexts",
    "binade_contexts",
    "context_counts",
    "context_histogram",
    "group_by_context",
    "ungroup_by_context",
    "quantize_groups",
    "dequantize_groups",
    "fingerprint",
]

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


def _cpu_rans() -> ModuleType:
    """The rANS coder for the reference backend: compiled when it builds here, else numpy."""
    if _forced() != "reference":
        module = importlib.import_module("lctriton.kernels.rans_cpu")
        if module.available():
            return module
    return reference


def _cpu_compiled(device: torch.device | str) -> ModuleType:
    """``device``'s backend, with the compiled CPU loops standing in for the reference's numpy
    ones on CPU (where they build and the reference is not forced)."""
    module = choose(device)
    if module is reference and torch.device(device).type == "cpu":
        return _cpu_rans()
    return module


def threads_allowed(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` may be coded from several threads at once: true for the
    reference codec; Triton's CPU interpreter patches the language globally while it runs."""
    return choose(device) is reference


def lc_histogram(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Pass 1 on the backend of ``x``'s device (see ``reference.lc_histogram``); on CPU,
    compiled for float32 where it builds."""
    return _cpu_compiled(x.device).lc_histogram(x, base)


def lc_encode(x, base, key_to_symbol, representatives, code_lengths, chunk_symbols):
    """Pass 2 on the backend of ``x``'s device (see ``reference.lc_encode``)."""
    return choose(x.device).lc_encode(x, base, key_to_symbol, representatives, code_lengths, chunk_symbols)


def lc_decode(items: list[reference.LcStream], chunk_symbols: int, device: torch.device) -> list[torch.Tensor]:
    """Decode many streams on ``device``'s backend (see ``reference.lc_decode``)."""
    return choose(device).lc_decode(items, chunk_symbols)


def lc_symbols(x, base, key_to_symbol, representatives):
    """Pass 2 without the Huffman stage (see ``reference.lc_symbols``); on CPU, compiled for
    float32 where it builds."""
    return _cpu_compiled(x.device).lc_symbols(x, base, key_to_symbol, representatives)


def lc_reconstruct(symbols, representatives, base, dtype):
    """Symbols to values on the backend of ``symbols``' device (see ``reference.lc_reconstruct``);
    on CPU, compiled for float32 where it builds."""
    return _cpu_compiled(symbols.device).lc_reconstruct(symbols, representatives, base, dtype)


def lq_symbols(x, base, scale, key_to_symbol, representatives):
    """The lq/1 pass on the backend of ``x``'s device (see ``reference.lq_symbols``); on CPU,
    compiled for float32 where it builds."""
    return _cpu_compiled(x.device).lq_symbols(x, base, scale, key_to_symbol, representatives)


def lq_reconstruct(symbols, representatives, base, scale, dtype):
    """lq/1 decode on the backend of ``symbols``' device (see ``reference.lq_reconstruct``); on
    CPU, compiled for float32 where it builds."""
    return _cpu_compiled(symbols.device).lq_reconstruct(symbols, representatives, base, scale, dtype)


def _sq_module(device: torch.device | str) -> ModuleType:
    """sq/1's backend: the compiled pass on CPU where it builds, else the reference, whose
    torch operations run on any device with the same bits."""
    return _cpu_rans() if torch.device(device).type == "cpu" else reference


def sq_symbols(x, base, scale, norm, precision):
    """sq/1's encoder pass (see ``reference.sq_symbols``); on CPU, compiled where it builds."""
    return _sq_module(x.device).sq_symbols(x, base, scale, norm, precision)


def sq_reconstruct(symbols, reach, precision, base, scale, norm):
    """sq/1's decoder pass on ``base``'s device (see ``reference.sq_reconstruct``); on CPU,
    compiled where it builds."""
    return _sq_module(base.device).sq_reconstruct(symbols, reach, precision, base, scale, norm)


def rans_encode(symbols: torch.Tensor, freqs: torch.Tensor, chunk_symbols: int):
    """rANS-code symbols on the backend of their device (see ``reference.rans_encode``)."""
    module = choose(symbols.device)
    if module is reference:
        module = _cpu_rans()
    return module.rans_encode(symbols, freqs, chunk_symbols)


def rans_encode_streams(symbols: torch.Tensor, spans: list[tuple[int, int]], freqs, chunk_symbols: int):
    """rANS-code several streams of ``symbols``, each with its own table, in one call on the
    backend of their device (see ``reference.rans_encode_streams``)."""
    module = choose(symbols.device)
    if module is reference:
        module = _cpu_rans()
    return module.rans_encode_streams(symbols, spans, freqs, chunk_symbols)


def rans_decode(items: list[reference.RansStream], chunk_symbols: int, device: torch.device) -> list[torch.Tensor]:
    """Decode many rANS streams on ``device``'s backend (see ``reference.rans_decode``)."""
    module = choose(device)
    if module is reference:
        return _cpu_rans().rans_decode(items, chunk_symbols)
    return module.rans_decode(items, chunk_symbols, device)


def _context_module(device: torch.device) -> ModuleType:
    """lc/3's context stage: torch ops (the reference) on a GPU, the compiled loops on CPU."""
    return _cpu_rans() if device.type == "cpu" else reference


def moment_contexts(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """lc/3 contexts from the base's moments (see ``reference.moment_contexts``)."""
    return _context_module(first.device).moment_contexts(first, second)


def binade_contexts(base: torch.Tensor, offset: int) -> torch.Tensor:
    """lq/2 contexts from a moment's base (see ``reference.binade_contexts``)."""
    return _context_module(base.device).binade_contexts(base, offset)


def context_counts(contexts: torch.Tensor) -> torch.Tensor:
    """Elements per context (see ``reference.context_counts``)."""
    return _context_module(contexts.device).context_counts(contexts)


def context_histogram(contexts: torch.Tensor, symbols: torch.Tensor, nsym: int) -> torch.Tensor:
    """Symbol counts per context (see ``reference.context_histogram``)."""
    return _context_module(contexts.device).context_histogram(contexts, symbols, nsym)


def group_by_context(contexts: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """Symbols in context order (see ``reference.group_by_context``)."""
    return _context_module(contexts.device).group_by_context(contexts, symbols)


def ungroup_by_context(contexts: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """Symbols back in index order (see ``reference.ungroup_by_context``)."""
    return _context_module(contexts.device).ungroup_by_context(contexts, grouped)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool):
    """Group quantization of an activation (see ``reference.quantize_groups``)."""
    return choose(x.device).quantize_groups(x, bits, group_size, seed, stochastic)


def dequantize_groups(codes, low, step, bits: int, group_size: int, numel: int, dtype: torch.dtype):
    """Restore a group-quantized activation (see ``reference.dequantize_groups``)."""
    return choose(codes.device).dequantize_groups(codes, low, step, bits, group_size, numel, dtype)


def fingerprint(tensor: torch.Tensor) -> int:
    """Fingerprint on the tensor's backend (see ``reference.fingerprint``); on CPU, the
    compiled sums where they build."""
    return _cpu_compiled(tensor.device).fingerprint(tensor)
