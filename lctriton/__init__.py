"""lctriton: small, cheap PyTorch training checkpoints.

Closed-loop LC-Checkpoint delta compression (exponent bucketing, priority promotion,
chunked canonical Huffman coding) with Triton kernels on the GPU, a pure-torch reference
on the CPU, and a container format that never unpickles.
"""

from lctriton import activations
from lctriton.api import Compressed, compress, compress_each, decompress, inspect, load, save
from lctriton.config import ActivationConfig, CodecOptions
from lctriton.errors import (
    BaseMismatchError,
    ChecksumError,
    FormatError,
    LctError,
    TruncatedError,
    UnknownCodecError,
    VersionError,
)
from lctriton.manager import CheckpointInfo, CheckpointManager, ManifestError, Restored, SaveHandle
from lctriton.state import (
    DataPosition,
    ResumableSampler,
    Stateful,
    TrainingState,
    capture_rng,
    restore_rng,
)

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "compress",
    "compress_each",
    "decompress",
    "save",
    "load",
    "inspect",
    "CodecOptions",
    "ActivationConfig",
    "activations",
    "CheckpointManager",
    "CheckpointInfo",
    "SaveHandle",
    "Restored",
    "ManifestError",
    "TrainingState",
    "ResumableSampler",
    "DataPosition",
    "Stateful",
    "capture_rng",
    "restore_rng",
    "LctError",
    "FormatError",
    "TruncatedError",
    "ChecksumError",
    "VersionError",
    "UnknownCodecError",
    "BaseMismatchError",
    "__version__",
]
