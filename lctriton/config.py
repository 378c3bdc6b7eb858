"""Validated, immutable options for the codec.

``CodecOptions`` is created from the keyword arguments of :func:`lctriton.compress` and
:func:`lctriton.save`; every field is checked on creation so that a bad option fails at the
call that passed it, with a message naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

__all__ = ["CodecOptions", "DEFAULT_EXACT_PATTERNS"]

#: Name patterns (``fnmatch`` on the dotted path) that are always stored losslessly:
#: counters and statistics whose exact value matters.
DEFAULT_EXACT_PATTERNS: tuple[str, ...] = ("*num_batches_tracked", "*.step", "step")


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
    """

    bits: int = 3
    lossless: bool = False
    lossless_key: bool = True
    exact: tuple[str, ...] = ()
    min_numel: int = 1024
    chunk_symbols: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int from 1 to 8, got {self.bits!r}")
        for name in ("lossless", "lossless_key"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        exact = self.exact
        if isinstance(exact, str):
            exact = (exact,)
        if not isinstance(exact, Iterable) or not all(isinstance(p, str) for p in exact):
            raise TypeError(f"exact must be a sequence of name patterns (str), got {self.exact!r}")
        object.__setattr__(self, "exact", tuple(exact))
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {self.min_numel!r}")
        c = self.chunk_symbols
        if isinstance(c, bool) or not isinstance(c, int) or not 64 <= c <= 1 << 16 or c & (c - 1):
            raise ValueError(
                f"chunk_symbols must be a power of two from 64 to 65536, got {self.chunk_symbols!r}"
            )

    @property
    def exact_patterns(self) -> tuple[str, ...]:
        """All patterns of tensors stored exactly: the defaults plus ``exact``."""
        return DEFAULT_EXACT_PATTERNS + self.exact

    @classmethod
    def from_kwargs(cls, **options: object) -> CodecOptions:
        """Build options from keyword arguments, rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown codec option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)  # type: ignore[arg-type]
