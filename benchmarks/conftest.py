"""Benchmark configuration: results carry the commit, versions and device they came from."""

import os
import platform
import subprocess

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(__file__))
        # The results being written are themselves tracked files: they do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True,
                               cwd=os.path.dirname(__file__)).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import numpy

    import lctriton

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    output_json["lctriton"] = {
        "commit": _commit(),
        "lctriton": lctriton.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {platform.processor() or platform.machine()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "lctriton_threads": os.environ.get("LCTRITON_THREADS", "default"),
    }
