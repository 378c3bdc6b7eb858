"""Helpers shared by the tests and the benchmarks: bit-exact comparison and special values."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["bits", "assert_bit_exact", "special_values", "ulp", "status_kib", "ResidentPeak", "time_torch_save"]

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as signed integers of its width (flat, CPU)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(_INT[t.element_size()])


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Assert equal dtype, shape and bits (``torch.equal`` says -0.0 == 0.0 and NaN != NaN).

    Raises:
        AssertionError: Naming the first differing element.
    """
    if actual.dtype != expected.dtype or tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"{what}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}"
        )
    a, e = bits(actual), bits(expected)
    diff = torch.nonzero(a != e).reshape(-1)
    if diff.numel():
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.numel()} of {a.numel()} elements differ; first at flat index {i}: "
            f"{actual.reshape(-1)[i].item()!r} (bits {int(a[i])}) != {expected.reshape(-1)[i].item()!r} "
            f"(bits {int(e[i])})"
        )


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Signed zeros, infinities, NaNs with payloads, subnormals, extremes, ordinary values."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, float("inf"), float("-inf"), info.max, -info.max, info.tiny, -info.tiny,
              info.tiny / 4, -info.tiny / 2, info.eps, 1.0, -1.0, 3.0, -1e-3, 0.5]
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    nan_bits = {
        torch.float32: [0x7FC00001, 0xFFC00123, 0x7F800001],
        torch.float64: [0x7FF8000000000001, 0x7FF0000000000F00],
        torch.float16: [0x7E01, 0x7C02],
        torch.bfloat16: [0x7FC1, 0x7F81],
    }[dtype]
    width = _INT[t.element_size()]
    nans = torch.tensor([b - (1 << (8 * t.element_size())) if b >= 1 << (8 * t.element_size() - 1) else b
                         for b in nan_bits], dtype=width).view(dtype)
    return torch.cat([t, nans])


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of floating values at each element of ``t`` (in float64)."""
    mantissa = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[t.dtype]
    info = torch.finfo(t.dtype)
    t64 = t.detach().cpu().to(torch.float64).abs()
    exp = torch.floor(torch.log2(torch.clamp(t64, min=info.tiny)))
    return torch.exp2(exp - mantissa)


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``...), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class ResidentPeak:
    """Growth of the resident set's peak (bytes) over a ``with`` block.

    The high-water mark is reset by writing 5 to ``/proc/self/clear_refs`` when the kernel
    allows it (``source`` is then ``"VmHWM after clear_refs"``); otherwise the growth of
    ``ru_maxrss``, which never resets and can read 0 (``source`` says so). It counts every
    resident page of the process, allocator caches included.
    """

    def __enter__(self) -> ResidentPeak:
        self.source = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.source = "ru_maxrss growth"
        self.rss0 = status_kib("VmRSS")
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.source.startswith("VmHWM") and (self.rss0 is None or status_kib("VmHWM") is None):
            self.source = "ru_maxrss growth"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.source.startswith("VmHWM"):
            self.bytes = max(0, (status_kib("VmHWM") or 0) - (self.rss0 or 0)) * 1024
        else:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0
            self.bytes = max(0, grown) * 1024


def time_torch_save(directory: str | os.PathLike[str], state: Any, reps: int = 3) -> list[float]:
    """Seconds of each of ``reps`` synchronous ``torch.save`` + flush + fsync of ``state`` to a
    new file in ``directory``: the baseline a checkpoint's stall is compared with."""
    times = []
    for i in range(reps):
        path = Path(directory) / f"torch-save-reference-{i}.pt"
        try:
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
        finally:
            path.unlink(missing_ok=True)
    return times
