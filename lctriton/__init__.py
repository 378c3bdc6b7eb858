"""lctriton: small, cheap PyTorch training checkpoints.

Closed-loop LC-Checkpoint delta compression (exponent bucketing, priority promotion,
chunked canonical Huffman coding) with Triton kernels on the GPU, a pure-torch reference
on the CPU, and a container format that never unpickles.
"""

from lctriton.api import Compressed, compress, decompress, inspect, load, save
from lctriton.config import CodecOptions
from lctriton.errors import (
    BaseMismatchError,
    ChecksumError,
    FormatError,
    LctError,
    TruncatedError,
    UnknownCodecError,
    VersionError,
)

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "compress",
    "decompress",
    "save",
    "load",
    "inspect",
    "CodecOptions",
    "LctError",
    "FormatError",
    "TruncatedError",
    "ChecksumError",
    "VersionError",
    "UnknownCodecError",
    "BaseMismatchError",
    "__version__",
]
