"""Activation memory: compressed saved activations and checkpointed segments.

Training keeps every tensor autograd saves in forward until backward uses it; for deep or
wide models these saved activations, not the weights, decide peak memory. Two remedies, and
their combination:

* **Compression** (:func:`compressed`, :class:`CompressedActivations`): every tensor autograd
  saves passes through ``torch.autograd.graph.saved_tensors_hooks`` and is held as 8, 4 or
  2-bit codes per group of elements (``lctriton.kernels.groupquant`` on CUDA, its reference
  twin elsewhere), then restored when backward asks for it. Memory falls by about the code
  width's share (4 bits: 86% for float32, 72% for bfloat16) for the cost of one pass over the
  data each way.
* **Segment checkpointing** (:func:`checkpoint`, :func:`checkpoint_sequential`): a segment
  keeps only its inputs and recomputes everything else in backward
  (``torch.utils.checkpoint``, non-reentrant).
* **Both**: with ``compress=``, a segment's inputs (the checkpoint boundaries) are stored
  compressed as well, so only a fraction of even the boundaries stays in memory.

Attention is the exception to the chosen width: its backward recomputes probabilities from
the saved queries and keys against an exact log-sum-exp, so their error comes back
exponentiated. What ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` save is
kept at ``attention_bits`` (8 by default; None: exact).

What stays exact (held as the tensor itself): integer and boolean tensors (indices, masks),
tensors with fewer than ``min_numel`` elements, parameters and views of them, and tensors
autograd did not produce, such as inputs and the statistics and masks that normalization and
dropout keep beside their outputs (unless ``compress_leaves``); also anything saved inside
``exact()``, inside a module of ``exact_modules``, or for which the ``exact`` predicate says so.

A tensor saved twice in one forward (a ReLU's output, saved by the ReLU and by the next
linear layer) is compressed once. Exact tensors modified in place after being saved raise in
backward, as autograd does without hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lctriton import backend
from lctriton.config import ActivationConfig

__all__ = [
    "ActivationConfig",
    "ActivationStats",
    "compressed",
    "exact",
    "manual_seed",
    "CompressedActivations",
    "checkpoint",
    "checkpoint_sequential",
]

logger = logging.getLogger(__name__)

#: Floating dtypes the quantizer takes; anything else is saved as it is.
_COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)
#: Process-wide count of compressed tensors: each gets its own rounding seed, so that the
#: same activation in consecutive steps is not rounded by the same noise.
_PACKS = itertools.count()
#: Replaces ``torch.initial_seed()`` as the base of the rounding seeds (``manual_seed``).
_BASE_SEED: int | None = None
_LOCAL = threading.local()
#: Functions whose saved tensors are attention's (``ActivationConfig.attention_bits``).
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)


@dataclasses.dataclass
class ActivationStats:
    """What one :func:`compressed` region saved, each distinct tensor counted once.

    Attributes:
        tensors_compressed: Saved tensors held as codes.
        tensors_exact: Saved tensors held as they are.
        bytes_in: Bytes of the compressed tensors as autograd handed them over.
        bytes_out: Bytes their codes and group ranges take.
        bytes_exact: Bytes of the tensors held exactly (often alive anyway: parameters,
            inputs).
    """

    tensors_compressed: int = 0
    tensors_exact: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_exact: int = 0

    @property
    def saved_bytes(self) -> int:
        """Bytes autograd asked to keep."""
        return self.bytes_in + self.bytes_exact

    @property
    def stored_bytes(self) -> int:
        """Bytes actually kept for them."""
        return self.bytes_out + self.bytes_exact


def manual_seed(seed: int) -> None:
    """Restart the stream of rounding seeds: from here on, the same forward passes round the
    same way (as ``torch.manual_seed`` does for torch's generators).

    Each compressed tensor's seed mixes a base (``ActivationConfig.seed``, else this seed,
    else ``torch.initial_seed()``) with a process-wide count of compressed tensors, so that
    consecutive steps draw fresh noise; this resets the count.

    Raises:
        ValueError: If ``seed`` is not an int in [0, 2**63).
    """
    global _PACKS, _BASE_SEED
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    _BASE_SEED = seed
    _PACKS = itertools.count()


def _seed(config: ActivationConfig) -> int:
    """A fresh 31-bit rounding seed: the base seed mixed with the count of packs."""
    if config.seed is not None:
        base = config.seed
    else:
        base = _BASE_SEED if _BASE_SEED is not None else torch.initial_seed()
    x = (base * 0x9E3779B97F4A7C15 + next(_PACKS) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & 0x7FFFFFFF


def _dense_order(t: torch.Tensor) -> list[int] | None:
    """The dimension order in which ``t``'s memory is contiguous, when it is dense but not
    row-major (channels-last, a transpose): compressing in memory order and restoring the same
    strides avoids a copy on each side. None for row-major or overlapping/gapped tensors."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return order if t.permute(order).is_contiguous() else None


class _Exact:
    """A tensor saved as it is, with its version to catch in-place changes before backward."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        # detach(): a saved output holding itself through its grad_fn would be a cycle that
        # Python's collector cannot see into.
        self.tensor = tensor.detach()
        self.version = tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the tensors saved for backward (kept exact by lctriton.activations, shape "
                f"{tuple(self.tensor.shape)}) was modified by an in-place operation after it was "
                f"saved: version {self.tensor._version}, expected {self.version}"
            )
        return self.tensor


class _Packed:
    """A saved tensor held as group-quantized codes."""

    __slots__ = ("codes", "low", "step", "shape", "dtype", "order", "bits", "group_size", "source", "__weakref__")

    def __init__(self, t: torch.Tensor, config: ActivationConfig, bits: int) -> None:
        order = _dense_order(t)
        memory = t.permute(order) if order is not None else t
        self.codes, self.low, self.step = backend.quantize_groups(
            memory.detach(), bits, config.group_size, _seed(config), config.rounding == "stochastic"
        )
        self.shape = memory.shape
        self.dtype = t.dtype
        self.order = order
        self.bits = bits
        self.group_size = config.group_size
        self.source = weakref.ref(t)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.low.nbytes + self.step.nbytes

    def unpack(self) -> torch.Tensor:
        flat = backend.dequantize_groups(
            self.codes, self.low, self.step, self.bits, self.group_size, self.shape.numel(), self.dtype
        )
        out = flat.view(self.shape)
        if self.order is not None:
            inverse = [0] * len(self.order)
            for i, d in enumerate(self.order):
                inverse[d] = i
            out = out.permute(inverse)
        return out


def _exact_depth() -> int:
    return getattr(_LOCAL, "exact_depth", 0)


def _attention_depth() -> int:
    return getattr(_LOCAL, "attention_depth", 0)


class _AttentionScope(TorchFunctionMode):
    """Marks the calls of attention functions, so that what they save gets
    ``attention_bits``. (Nested calls run without the mode: attention inside
    ``multi_head_attention_forward`` is covered by marking that function too.)"""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in _ATTENTION:
            return func(*args, **(kwargs or {}))
        _LOCAL.attention_depth = _attention_depth() + 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            _LOCAL.attention_depth -= 1


def _enter_exact_module(module: nn.Module, args: Any) -> None:
    _LOCAL.exact_depth = _exact_depth() + 1


def _leave_exact_module(module: nn.Module, args: Any, output: Any) -> None:
    _LOCAL.exact_depth = max(0, _exact_depth() - 1)


def _scope_exact_modules(root: nn.Module, types: tuple[type, ...]) -> list[Any]:
    """Hooks that mark the forward of every submodule of ``types`` as an exact region."""
    handles: list[Any] = []
    if not types:
        return handles
    for module in root.modules():
        if isinstance(module, types):
            handles.append(module.register_forward_pre_hook(_enter_exact_module))
            handles.append(module.register_forward_hook(_leave_exact_module, always_call=True))
    return handles


def _is_parameter_like(t: torch.Tensor) -> bool:
    """A parameter (or a leaf that requires grad) or a view of one: alive anyway."""
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


def _config(config: ActivationConfig | None, options: dict[str, Any]) -> ActivationConfig:
    if config is None:
        return ActivationConfig.from_kwargs(**options)
    if not isinstance(config, ActivationConfig):
        raise TypeError(f"config must be an ActivationConfig or None, got {type(config).__name__}")
    if options:
        ActivationConfig.from_kwargs(**options)  # names the unknown options, if any
        return dataclasses.replace(config, **options)
    return config


class compressed(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager)
    """Compress every tensor autograd saves while the context is active.

    Example::

        with lctriton.activations.compressed(bits=4) as region:
            loss = criterion(model(x), y)
        loss.backward()
        logger.info("kept %d of %d bytes", region.stats.stored_bytes, region.stats.saved_bytes)

    Backward may run after the context has closed: the saved tensors carry what they need.
    The innermost of nested ``saved_tensors_hooks`` contexts decides, so ``compressed``
    inside ``exact()`` compresses and ``exact()`` inside ``compressed`` keeps exact.

    Args:
        config: The options; ``None`` builds them from ``options``.
        module: A model whose submodules of ``config.exact_modules`` become exact regions
            while the context is active (the wrapper :class:`CompressedActivations` does this
            for its module).
        **options: :class:`ActivationConfig` fields, overriding ``config``'s.

    Raises:
        TypeError: If ``config`` is not an ActivationConfig or an option is unknown.
        ValueError: If an option's value is invalid.
    """

    def __init__(self, config: ActivationConfig | None = None, *, module: nn.Module | None = None,
                 **options: Any) -> None:
        self.config = _config(config, options)
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
        self.module = module
        self.stats = ActivationStats()
        # Packed tensors by the id of their source, weakly: a tensor saved twice is packed
        # once, and nothing here outlives the graph that holds it.
        self._packed: weakref.WeakValueDictionary[int, _Packed] = weakref.WeakValueDictionary()
        self._handles: list[Any] = []
        self._attention: _AttentionScope | None = None
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> compressed:
        if self.module is not None:
            self._handles = _scope_exact_modules(self.module, self.config.exact_modules)
        if self.config.attention_bits != self.config.bits:
            self._attention = _AttentionScope()
            self._attention.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._attention is not None:
            self._attention.__exit__(None, None, None)
            self._attention = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keeps_exact(self, t: torch.Tensor) -> bool:
        cfg = self.config
        if t.dtype not in _COMPRESSIBLE or t.numel() < cfg.min_numel or t.layout != torch.strided:
            return True
        # Tensor subclasses (DTensor, fake and meta tensors) carry semantics the codes would lose.
        if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type not in ("cpu", "cuda"):
            return True
        # A broadcast view (stride 0) is smaller in memory than its codes would be.
        if t.untyped_storage().nbytes() < t.nbytes:
            return True
        if _is_parameter_like(t) or (t.grad_fn is None and not cfg.compress_leaves):
            return True
        if _exact_depth() > 0:
            return True
        return cfg.exact is not None and bool(cfg.exact(t))

    def _pack(self, t: torch.Tensor) -> _Exact | _Packed:
        bits: int | None = self.config.bits
        if _attention_depth() > 0:
            bits = self.config.attention_bits
        if bits is None or self._keeps_exact(t):
            self.stats.tensors_exact += 1
            self.stats.bytes_exact += t.nbytes
            return _Exact(t)
        hit = self._packed.get(id(t))
        if hit is not None and hit.source() is t:
            return hit
        with torch.no_grad():
            packed = _Packed(t, self.config, bits)
        self._packed[id(t)] = packed
        self.stats.tensors_compressed += 1
        self.stats.bytes_in += t.nbytes
        self.stats.bytes_out += packed.nbytes
        return packed

    @staticmethod
    def _unpack(saved: _Exact | _Packed) -> torch.Tensor:
        with torch.no_grad():
            return saved.unpack()


def _keep(t: torch.Tensor) -> _Exact:
    return _Exact(t)


def _unpack_exact(saved: _Exact) -> torch.Tensor:
    return saved.unpack()


@contextlib.contextmanager
def exact() -> Iterator[None]:
    """Keep every tensor saved inside this context exact, even within :func:`compressed`."""
    with torch.autograd.graph.saved_tensors_hooks(_keep, _unpack_exact):
        yield


class CompressedActivations(nn.Module):
    """Run a module with its saved activations compressed (optionally as one checkpointed
    segment whose input is stored compressed).

    The wrapper's ``state_dict`` has the wrapped module's keys, so checkpoints do not change
    when a model is wrapped.

    Args:
        module: The module to run.
        config: The options; ``None`` builds them from ``options``.
        checkpoint: Recompute the module in backward instead of keeping its activations
            (only its compressed input is kept).
        **options: :class:`ActivationConfig` fields, overriding ``config``'s.

    Attributes:
        stats: :class:`ActivationStats` of the latest forward (None before the first and in
            checkpoint mode).
    """

    def __init__(self, module: nn.Module, config: ActivationConfig | None = None, *,
                 checkpoint: bool = False, **options: Any) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(checkpoint, bool):
            raise TypeError(f"checkpoint must be a bool, got {checkpoint!r}")
        self.module = module
        self.config = _config(config, options)
        self.checkpoint = checkpoint
        self.stats: ActivationStats | None = None
        self._scopes = _scope_exact_modules(module, self.config.exact_modules)
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpoint:
            return checkpoint(self.module, *args, compress=self.config, **kwargs)
        with compressed(self.config) as region:
            out = self.module(*args, **kwargs)
        self.stats = region.stats
        return out


def _strip_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)


def _as_config(compress: ActivationConfig | bool | int | None) -> ActivationConfig | None:
    if compress is None or compress is False:
        return None
    if compress is True:
        return ActivationConfig()
    if isinstance(compress, ActivationConfig):
        return compress
    if isinstance(compress, int):
        return ActivationConfig(bits=compress)
    raise TypeError(f"compress must be None, a bool, a bit width or an ActivationConfig, got {compress!r}")


def checkpoint(function: Callable[..., Any], *args: Any,
               compress: ActivationConfig | bool | int | None = None,
               preserve_rng_state: bool = True, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` as a checkpointed segment.

    Only the segment's inputs are kept; its activations are recomputed in backward
    (``torch.utils.checkpoint.checkpoint`` without reentry, so ``torch.autograd.grad`` works
    and RNG state is replayed). With ``compress``, the inputs are kept compressed too: the
    recomputation starts from their restored values.

    Args:
        function: The segment.
        *args: Its positional arguments.
        compress: ``None``/False for exact inputs; True, a bit width or an
            :class:`ActivationConfig` to compress them.
        preserve_rng_state: Replay the forward's RNG state in the recomputation (dropout
            draws the same mask).
        **kwargs: Its keyword arguments.

    Returns:
        What ``function`` returns.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    config = _as_config(compress)
    run = torch.utils.checkpoint.checkpoint
    if config is None:
        return run(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs)
    with compressed(config):
        return run(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs)


def _run_modules(modules: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
        for m in modules:
            x = m(x)
        return x

    return run


def checkpoint_sequential(functions: nn.Sequential | Iterable[Callable[[Any], Any]], segments: int,
                          input: Any, *, compress: ActivationConfig | bool | int | None = None,
                          preserve_rng_state: bool = True) -> Any:
    """Run a sequence of modules in ``segments`` checkpointed segments.

    Like ``torch.utils.checkpoint.checkpoint_sequential``: every segment but the last keeps
    only its input and recomputes in backward; the last runs normally, since backward needs
    its activations first. With ``compress``, the segment inputs and the last segment's
    activations are stored compressed.

    Args:
        functions: The modules (or callables of one argument), in order.
        segments: How many segments to cut them into (at most one per module).
        input: The first module's input.
        compress: As for :func:`checkpoint`.
        preserve_rng_state: As for :func:`checkpoint`.

    Returns:
        The last module's output.

    Raises:
        ValueError: If ``segments`` is not between 1 and the number of modules.
    """
    modules = list(functions.children()) if isinstance(functions, nn.Sequential) else list(functions)
    if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= max(1, len(modules)):
        raise ValueError(f"segments must be an int from 1 to {len(modules)} (the number of modules), got {segments!r}")
    config = _as_config(compress)
    # As PyTorch cuts them: equal segments, the remainder going to the last.
    size = len(modules) // segments
    x = input
    for i in range(segments - 1):
        x = checkpoint(_run_modules(modules[i * size:(i + 1) * size]), x, compress=config,
                       preserve_rng_state=preserve_rng_state)
    last = _run_modules(modules[(segments - 1) * size:])
    if config is None:
        return last(x)
    with compressed(config):
        return last(x)
