"""Run the benchmark suite and record its results under benchmarks/results/.

Usage: ``python benchmarks/run.py cpu`` (what ``make bench`` runs). Writes
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
SUITES = {"cpu": ["bench_codec.py", "bench_state.py", "bench_manager.py", "bench_dcp.py", "bench_activations.py"], "gpu": ["bench_gpu.py", "bench_manager.py", "bench_activations.py"]}


def _summary(data: dict) -> str:
    meta = data.get("lctriton", {})
    lines = [
        f"# Benchmark results: {meta.get('device', '?')}",
        "",
        f"commit {meta.get('commit')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"python {meta.get('python')}, {meta.get('cpu_count')} CPUs, "
        f"machine {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', platform.processor())}",
        "",
        "| benchmark | workload | MB/s | mean s | ratio | max abs error | rel L2 error | accuracy (restored vs original) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for b in data["benchmarks"]:
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
    return "\n".join(lines) + "\n"


def _machine_tag(suite: str) -> str:
    """A file-name tag for the machine: the GPU's name, or the CPU count for CPU runs."""
    if suite == "gpu":
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
    rc = subprocess.call(cmd, cwd=HERE.parent, env=dict(os.environ))
    if out.exists():
        data = json.loads(out.read_text())
        out.with_suffix(".md").write_text(_summary(data))
        print(f"results: {out} and {out.with_suffix('.md')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
