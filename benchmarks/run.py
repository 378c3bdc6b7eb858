"""Run the benchmark suite and record its results under benchmarks/results/.

Usage: ``python benchmarks/run.py cpu`` (what ``make bench`` runs), ``gpu`` (``make bench-gpu``),
or one half of it, ``gpu-codec`` or ``gpu-training``. Writes
``benchmarks/results/<suite>-<host>.json`` (pytest-benchmark's JSON with the commit, versions
and device added) and ``<suite>-<host>.md``, a table of the figures the targets are about.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = {
    "cpu": ["bench_codec.py", "bench_state.py", "bench_manager.py", "bench_dcp.py", "bench_activations.py"],
    "gpu": ["bench_gpu.py", "bench_manager.py", "bench_activations.py"],
    # The GPU suite in two halves, each short enough for one call on a lent machine.
    "gpu-codec": ["bench_gpu.py"],
    "gpu-training": ["bench_manager.py", "bench_activations.py"],
}


def _num(info: dict, key: str, spec: str) -> str:
    """``info[key]`` formatted by ``spec``, or an empty cell when the run did not record it."""
    value = info.get(key)
    return "" if value is None else format(value, spec)


def _summary(data: dict) -> str:
    meta = data.get("lctriton", {})
    lines = [
        f"# Benchmark results: {meta.get('device', '?')}",
        "",
        f"commit {meta.get('commit')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"python {meta.get('python')}, {meta.get('cpu_count')} CPUs, "
        f"machine {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', platform.processor())}",
    ]
    # GPU kernel runs record do_bench's median as "ms" and get their own table.
    kernel_runs = [b for b in data["benchmarks"] if "ms" in b.get("extra_info", {})]
    codec_runs = [b for b in data["benchmarks"] if "ms" not in b.get("extra_info", {})]
    if codec_runs:
        lines += [
            "",
            "| benchmark | workload | MB/s | mean s | ratio | max abs error | rel L2 error | "
            "accuracy (restored vs original) |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
    for b in codec_runs:
        info = b.get("extra_info", {})
        acc = ""
        if "restored_accuracy" in info:
            pairs = zip(info["restored_accuracy"], info["original_accuracy"], strict=True)
            acc = ", ".join(f"{r:.2f}/{o:.2f}" for r, o in pairs)
        lines.append(
            f"| {b['name']} | {info.get('workload', '')} | {info.get('MB_per_s', float('nan')):.1f} | "
            f"{b['stats']['mean']:.4f} | {info.get('ratio_mean', float('nan')):.2f} | "
            f"{info.get('max_abs_error', float('nan')):.3g} | {info.get('rel_l2_error_mean', float('nan')):.3g} | {acc} |"
        )
    if kernel_runs:
        lines += [
            "",
            "GPU runs: `ms` is triton.testing.do_bench's median; GB/s counts float32 input (4 bytes per "
            "element) or, for the rANS coder, symbols (1 byte each); `of copy` is the run's counted "
            "bytes per second over the device's copy bandwidth, measured in the same process (pass 1 "
            "counts the 8 bytes per element it reads; the other runs count the 4-byte input only, "
            "not everything they move).",
            "",
            "| benchmark | elements | ms | GB/s | of copy | ratio | codec | bits/symbol |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
    for b in kernel_runs:
        info = b["extra_info"]
        gbps = info.get("input_GB_per_s", info.get("symbol_GB_per_s"))
        lines.append(
            f"| {b['name']} | {info.get('numel', '')} | {info['ms']:.2f} | {'' if gbps is None else f'{gbps:.1f}'} | "
            f"{_num(info, 'fraction_of_copy', '.4f')} | {_num(info, 'ratio', '.2f')} | {info.get('codec', '')} | "
            f"{_num(info, 'bits_per_symbol', '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def _machine_tag(suite: str) -> str:
    """A file-name tag for the machine: the GPU's name, or the CPU count for CPU runs."""
    if suite.startswith("gpu"):
        try:
            import torch

            name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
        except ImportError:
            name = "no-torch"
    else:
        name = f"{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k minilm)")
    args = parser.parse_args()
    out = HERE / "results" / f"{args.suite}-{_machine_tag(args.suite)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}", "--benchmark-sort=name", *[str(HERE / f) for f in SUITES[args.suite]],
           *args.pytest_args]
    print(" ".join(cmd), flush=True)
    # An earlier run's file must not pass for this run's when this one records nothing.
    out.unlink(missing_ok=True)
    out.with_suffix(".md").unlink(missing_ok=True)
    rc = subprocess.call(cmd, cwd=HERE.parent, env=dict(os.environ))
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        data = None  # pytest stopped before writing, or every benchmark was skipped
    if not data or not data.get("benchmarks"):
        out.unlink(missing_ok=True)
        print(f"no benchmark ran: nothing recorded at {out}")
        return rc
    out.with_suffix(".md").write_text(_summary(data))
    print(f"results: {out} and {out.with_suffix('.md')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
