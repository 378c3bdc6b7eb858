"""Validated, immutable options for the codec.

``CodecOptions`` is created from the keyword arguments of :func:`lctriton.compress` and
:func:`lctriton.save`; every field is checked on creation so that a bad option fails at the
call that passed it, with a message naming it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from lctriton.kernels.reference import AQ_BITS, AQ_MAX_GROUP, AQ_MIN_GROUP

__all__ = [
    "CodecOptions",
    "ActivationConfig",
    "DEFAULT_EXACT_PATTERNS",
    "MOMENT_PATTERNS",
    "FIRST_MOMENT_PATTERNS",
    "MOMENT_MODES",
    "CODERS",
    "ROUNDINGS",
]

#: Name patterns (``fnmatch`` on the dotted path) that are always stored losslessly:
#: counters and statistics whose exact value matters.
DEFAULT_EXACT_PATTERNS: tuple[str, ...] = ("*num_batches_tracked", "*.step", "step")

#: Name patterns of optimizer moments (Adam, AdamW, Adamax's second moment, SGD momentum,
#: RMSprop), which ``moments`` decides how to code.
MOMENT_PATTERNS: tuple[str, ...] = (
    "*.exp_avg",
    "*.exp_avg_sq",
    "*.max_exp_avg_sq",
    "*.exp_inf",
    "*.momentum_buffer",
    "*.square_avg",
)

#: The moments among :data:`MOMENT_PATTERNS` that average gradients themselves (Adam's first
#: moment, SGD's momentum): ``first_moment`` decides how they are coded.
FIRST_MOMENT_PATTERNS: tuple[str, ...] = ("*.exp_avg", "*.momentum_buffer")

#: How optimizer moments are coded in delta checkpoints.
MOMENT_MODES = ("log", "scaled", "predict", "lossy", "exact")

#: The largest ``delta_floor``: 2**-32 of a tensor's typical magnitude is far below float32's
#: resolution of it.
MAX_DELTA_FLOOR = 32

#: Entropy coders of lossy symbols.
CODERS = ("auto", "huffman", "rans", "context")


def _tuple_of(value: object, item: type, name: str, what: str) -> tuple:
    """An option that takes one ``item`` or a sequence of them, as a tuple.

    Raises:
        TypeError: Naming the option, if ``value`` is neither.
    """
    items = (value,) if isinstance(value, item) else value
    if not isinstance(items, Iterable) or not all(isinstance(v, item) for v in items):
        raise TypeError(f"{name} must be a sequence of {what}, got {value!r}")
    return tuple(items)


def _from_kwargs(cls: type, what: str, options: dict[str, object]) -> Any:
    """``cls(**options)``, with a TypeError naming unknown options and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**options)


@dataclasses.dataclass(frozen=True)
class CodecOptions:
    """How tensors are encoded.

    Attributes:
        bits: Symbol width of the lossy codec: ``2**bits - 1`` exponent buckets are kept
            (the largest in magnitude), everything else becomes zero. 1 to 8; default 3.
        lossless: Store every tensor exactly, deltas included (whole-file lossless mode).
        lossless_key: Store key checkpoints (those without a base) exactly. When False, a
            key checkpoint is coded lossily against an all-zero base.
        exact: Extra ``fnmatch`` patterns over dotted names ("model.bn.running_mean") of
            tensors to store exactly, added to :data:`DEFAULT_EXACT_PATTERNS`.
        min_numel: Tensors with fewer elements are stored exactly: the codec's tables would
            cost more than they save.
        chunk_symbols: Symbols per independently decodable chunk of the entropy-coded stream.
        coder: Entropy coder of lossy symbols: ``"huffman"`` (``lc/1``), ``"rans"``
            (``lc/2``, below one bit per symbol), ``"context"`` (``lc/3``: one rANS table per
            context read from the base's Adam moments of the parameter, where the base holds
            them; ``lc/2`` elsewhere; and ``lq/2`` for optimizer moments, grouped by their
            base's binades, where that saves at least 5%) or ``"auto"`` (``lc/3`` where it
            saves at least 5%, else rANS where it saves at least 10% of a tensor's Huffman
            payload, by the histograms; moments ``lq/2`` as with ``"context"``). Scaled first
            moments are ``sq/2`` (grouped by the base's moments) with ``"context"``, and with
            ``"auto"`` where a sample says that saves at least 5% of ``sq/1``. Context coding
            needs a state that holds the model and its optimizer side by side (``{"model":
            ..., "optimizer": ...}``, as :class:`lctriton.TrainingState` and the checkpoint
            managers save it).
        moments: How optimizer moments (:data:`MOMENT_PATTERNS`) are coded in a delta:
            ``"log"`` quantizes them in the log domain against the base decayed by the
            optimizer's betas over the steps between the checkpoints (``lq/1``: relative
            error bounded by the bin width, so no second moment collapses to zero);
            ``"scaled"`` (default) codes Adam's first moment in units of the square root of
            its second moment, the unit of the step it causes (``sq/1``: the restored
            ``m / sqrt(v)`` of every element is within ``2**-(scaled_precision + 1)`` of the
            saved one, however small its gradients), and every other moment as ``"log"``
            (so does a first moment without a float32 ``exp_avg_sq`` beside it, such as
            SGD's momentum). On the fidelity workloads it takes the whole Adam state to
            several times the ratio of ``"log"`` at the same final loss;
            ``"predict"`` stores no values and restores the base times the one factor per
            tensor that fits the new values best (least squares for signed moments, the
            median ratio for non-negative ones; the decay where the base holds no
            information); ``"lossy"``
            codes them like weights (absolute error: small second moments become zero,
            which can blow up Adam's first update after a restore); ``"exact"`` stores them
            losslessly. Key checkpoints follow ``lossless_key``.
        first_moment: How first moments (:data:`FIRST_MOMENT_PATTERNS`: Adam's ``exp_avg``,
            SGD's ``momentum_buffer``) are coded, one of the ``moments`` modes; None (default)
            codes them as ``moments`` says. ``first_moment="predict"`` removes most of the
            optimizer state's bytes, but a restored run then starts from a momentum close to
            zero, which moved the final loss by up to 11% in the fidelity benchmark.
        moment_precision: Mantissa bits of an ``lq/1`` bin: ``2**moment_precision`` bins per
            octave, relative error up to ``2**-moment_precision``. 0 to 4; default 0 (one bin
            per octave). A second moment restored within its octave changes an element's
            step by at most a factor of about 1.4 until Adam's ``1 / (1 - beta2)``-step memory
            forgets it; on the fidelity workloads precision 0 moved the final loss about as
            much as precision 2 did, at about a third more of the whole state's ratio
            (``benchmarks/results/fidelity-digits-scaled-seed*``, ``fidelity-minilm-scaled``).
        scaled_precision: Levels per unit of ``sqrt(exp_avg_sq)`` of ``"scaled"`` first
            moments: ``2**scaled_precision``, so the restored step of each element is within
            ``2**-(scaled_precision + 1)`` of the saved one. 0 to 4; default 2 (an eighth):
            on the digits CNN, precision 1 gave a fifth more ratio and moved the final loss
            by up to 2.6% over three seeds, precision 2 by up to 1.4%.
        code_exact: Entropy-code exactly stored tensors as byte planes (``bp/1``; against
            the base's bytes when there is one) instead of storing their raw bytes.
        delta_floor: In a delta, the lossy codec drops every change smaller than
            ``2**-delta_floor`` times the tensor's typical magnitude (the binade of the median
            ``|element|`` of its base): such an element restores to its base until its
            accumulated change reaches the floor, so a dropped element's error stays below the
            floor however long the chain. Late in a decaying schedule the changes shrink toward
            zero while ``bits`` still spends as many symbols on them; the floor stops that. 0
            to 32, or None for no floor. Default 10: on the digits CNN (three seeds, ten
            restores) it took the whole state's ratio up by 2-3.5% with the final loss within
            1.5% of the uninterrupted run. A floor is a lag: a change stays out of the checkpoint until it
            passes the floor, so a fine-tuning run, whose steps are small beside its pretrained
            weights, restores a few steps behind. On MiniLM checkpointed every step early in
            fine-tuning, 10 kept the restored test loss within 0.7% of the floorless one at
            1.6x its ratio, 8 within 4.8% at 8x (``benchmarks/results/fidelity-*-floor-*``,
            ``floor-minilm-cpu.json``).
    """

    bits: int = 3
    lossless: bool = False
    lossless_key: bool = True
    exact: tuple[str, ...] = ()
    min_numel: int = 1024
    chunk_symbols: int = 4096
    coder: str = "auto"
    moments: str = "scaled"
    first_moment: str | None = None
    moment_precision: int = 0
    scaled_precision: int = 2
    code_exact: bool = True
    delta_floor: int | None = 10

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int from 1 to 8, got {self.bits!r}")
        for name in ("lossless", "lossless_key", "code_exact"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "exact", _tuple_of(self.exact, str, "exact", "name patterns (str)"))
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {self.min_numel!r}")
        c = self.chunk_symbols
        if isinstance(c, bool) or not isinstance(c, int) or not 64 <= c <= 1 << 16 or c & (c - 1):
            raise ValueError(
                f"chunk_symbols must be a power of two from 64 to 65536, got {self.chunk_symbols!r}"
            )

        if self.coder not in CODERS:
            raise ValueError(f"coder must be one of {', '.join(CODERS)}, got {self.coder!r}")
        if self.moments not in MOMENT_MODES:
            raise ValueError(f"moments must be one of {', '.join(MOMENT_MODES)}, got {self.moments!r}")
        if self.first_moment is not None and self.first_moment not in MOMENT_MODES:
            raise ValueError(
                f"first_moment must be None or one of {', '.join(MOMENT_MODES)}, got {self.first_moment!r}"
            )
        for name in ("moment_precision", "scaled_precision"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 4:
                raise ValueError(f"{name} must be an int from 0 to 4, got {p!r}")

        f = self.delta_floor
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= MAX_DELTA_FLOOR):
            raise ValueError(f"delta_floor must be None or an int from 0 to {MAX_DELTA_FLOOR}, got {f!r}")

    def moment_mode(self, name: str) -> str:
        """The ``moments`` mode of the optimizer moment named ``name`` (dotted path)."""
        if self.first_moment is not None and any(fnmatch.fnmatchcase(name, p) for p in FIRST_MOMENT_PATTERNS):
            return self.first_moment
        return self.moments

    @property
    def exact_patterns(self) -> tuple[str, ...]:
        """All patterns of tensors stored exactly: the defaults plus ``exact``."""
        return DEFAULT_EXACT_PATTERNS + self.exact

    @classmethod
    def from_kwargs(cls, **options: object) -> CodecOptions:
        """Build options from keyword arguments, rejecting unknown names."""
        return _from_kwargs(cls, "codec", options)


#: Rounding modes of the activation quantizer.
ROUNDINGS = ("stochastic", "nearest")


@dataclasses.dataclass(frozen=True)
class ActivationConfig:
    """How :mod:`lctriton.activations` stores the tensors autograd saves for backward.

    Attributes:
        bits: Code width: 8, 4 or 2 bits per element (plus 8 bytes per group for its range).
        rounding: ``"stochastic"`` (unbiased: gradients are right on average, the choice
            for 2 and 4 bits) or ``"nearest"`` (smallest error per element).
        group_size: Elements sharing one range: a power of two from 8 to 4096. Smaller groups
            follow the data more closely and cost more range entries.
        min_numel: Saved tensors with fewer elements stay exact: too small to be worth a
            kernel launch.
        attention_bits: Code width (8, 4 or 2) of what attention saves: the queries, keys,
            values and output kept by ``F.scaled_dot_product_attention`` and
            ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``); ``None`` keeps them
            exact. Attention's backward recomputes the probabilities from the queries and keys
            against its exact log-sum-exp, so an error in ``q . k`` comes back exponentiated:
            at 4 bits the gradient of a trained transformer loses its direction (cosine 0.7),
            at 8 bits it keeps it.
        exact_modules: Module types whose saved tensors all stay exact while their forward
            runs (e.g. ``nn.MultiheadAttention`` to keep attention probabilities exact).
            Needs the module wrapper or ``compressed(module=...)`` to see module scopes.
        exact: A predicate over each saved tensor; True keeps it exact.
        compress_leaves: Also compress saved tensors that autograd did not produce (no
            ``grad_fn``): inputs, constants and the statistics and masks ops keep beside
            their outputs. Off by default: those are usually alive anyway or must be exact.
        seed: Seed of stochastic rounding, in place of ``torch.initial_seed()``. Each
            compressed tensor draws its own stream from the seed and a process-wide count of
            compressed tensors (see :func:`lctriton.activations.manual_seed`).
    """

    bits: int = 4
    rounding: str = "stochastic"
    group_size: int = 128
    min_numel: int = 2048
    attention_bits: int | None = 8
    exact_modules: tuple[type, ...] = ()
    exact: Callable[[Any], bool] | None = None
    compress_leaves: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        listed = ", ".join(str(b) for b in sorted(AQ_BITS, reverse=True))  # "8, 4, 2"
        widths = " or ".join(listed.rsplit(", ", 1))  # "8, 4 or 2"
        if isinstance(self.bits, bool) or self.bits not in AQ_BITS:
            raise ValueError(f"bits must be {widths}, got {self.bits!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        a = self.attention_bits
        if a is not None and (isinstance(a, bool) or a not in AQ_BITS):
            raise ValueError(f"attention_bits must be {listed} or None (exact), got {a!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not AQ_MIN_GROUP <= g <= AQ_MAX_GROUP or g & (g - 1):
            raise ValueError(
                f"group_size must be a power of two from {AQ_MIN_GROUP} to {AQ_MAX_GROUP}, got {g!r}"
            )
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {self.min_numel!r}")
        object.__setattr__(
            self, "exact_modules", _tuple_of(self.exact_modules, type, "exact_modules", "module classes")
        )
        if self.exact is not None and not callable(self.exact):
            raise TypeError(f"exact must be None or a callable taking a tensor, got {self.exact!r}")
        if not isinstance(self.compress_leaves, bool):
            raise TypeError(f"compress_leaves must be a bool, got {self.compress_leaves!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 63
        ):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")

    @classmethod
    def from_kwargs(cls, **options: object) -> ActivationConfig:
        """Build a config from keyword arguments, rejecting unknown names."""
        return _from_kwargs(cls, "activation", options)
