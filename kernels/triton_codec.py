"""The Triton backend: the codec passes as GPU kernels, one launcher per reference twin.

``lctriton.backend`` dispatches CUDA tensors here. Every launcher has the name and signature
of its twin in :mod:`lctriton.kernels.reference` and returns identical bytes.
"""

from __future__ import annotations

from lctriton.kernels.decode import lc_decode, lc_reconstruct
from lctriton.kernels.encode import lc_encode, lc_symbols
from lctriton.kernels.groupquant import dequantize_groups, quantize_groups
from lctriton.kernels.histogram import lc_histogram
from lctriton.kernels.logquant import lq_reconstruct, lq_symbols
from lctriton.kernels.rans import rans_decode, rans_encode, rans_encode_streams
from lctriton.kernels.reference import LcStream, RansStream, fingerprint, lc_exceptions

__all__ = [
    "lc_histogram",
    "lc_encode",
    "lc_decode",
    "lc_symbols",
    "lc_reconstruct",
    "lq_symbols",
    "lq_reconstruct",
    "lc_exceptions",
    "fingerprint",
    "LcStream",
    "rans_encode",
    "rans_encode_streams",
    "rans_decode",
    "RansStream",
    "quantize_groups",
    "dequantize_groups",
]
