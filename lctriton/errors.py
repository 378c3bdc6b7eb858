"""Every failure a user of lctriton can meet, as one exception hierarchy.

``LctError`` is the root. ``FormatError`` (a ``ValueError``) covers any file or byte string
that is not a valid lctriton container: its subclasses say whether it was truncated, failed a
checksum, or came from an unknown version or codec. ``BaseMismatchError`` is raised when a
delta checkpoint is decoded against a base other than the one it was written against.
"""

from __future__ import annotations

__all__ = [
    "LctError",
    "FormatError",
    "TruncatedError",
    "ChecksumError",
    "VersionError",
    "UnknownCodecError",
    "BaseMismatchError",
]


class LctError(Exception):
    """Base class of every error raised by lctriton."""


class FormatError(LctError, ValueError):
    """The input is not a valid lctriton container (corrupt, truncated or foreign)."""


class TruncatedError(FormatError):
    """The input ends before a structure it declares."""


class ChecksumError(FormatError):
    """A section's bytes do not match the checksum recorded for them."""


class VersionError(FormatError):
    """The container was written by a format version this reader does not know."""


class UnknownCodecError(FormatError):
    """A tensor record names a codec this reader does not know."""


class BaseMismatchError(LctError, ValueError):
    """A delta checkpoint was decoded without its base, or against a different base."""
