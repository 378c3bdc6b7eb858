"""Rank body for benchmarks/bench_dcp.py, run under torch.multiprocessing.spawn.

Each rank joins a gloo group through a file store, builds a CPU device mesh of the world
size, loads the two full training states (t1, t2) the parent saved, shards every tensor of
at least one dimension with ``Shard(0)`` (0-dim tensors such as Adam's ``step`` stay plain,
replicated tensors) and saves / loads them through each storage method. Rank 0 writes the
gathered per-rank measurements to ``<tmp>/result.json``.

Peak host memory: the growth of this process's resident-set high-water mark (``VmHWM``)
across the save, after resetting the mark by writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0). Where the reset is refused the figure is the growth of
``getrusage(RUSAGE_SELF).ru_maxrss``, which only shows memory above the process's earlier
peak and can read 0 (``mem_source`` says which was used). Both count resident pages only,
touched memory of the whole process (torch's allocator caches included), not Python
allocations alone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lctriton.dcp import CompressedStorageReader, CompressedStorageWriter, ReconstructionCache
from lctriton.testing import ResidentPeak


def _shard(full: dict[str, torch.Tensor], mesh) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in full.items():
        out[k] = distribute_tensor(v, mesh, [Shard(0)]) if v.dim() >= 1 else v.clone()
    return out


def _fresh(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            out[k] = DTensor.from_local(
                torch.zeros_like(v.to_local()), v.device_mesh, v.placements,
                shape=v.shape, stride=v.stride(),
            )
        else:
            out[k] = torch.zeros_like(v)
    return out


def _max_err(a: dict[str, Any], b: dict[str, Any], skip_scalars: bool = False) -> float:
    err = 0.0
    for k, v in a.items():
        if skip_scalars and v.dim() == 0:
            continue
        x = v.to_local() if isinstance(v, DTensor) else v
        y = b[k].to_local() if isinstance(b[k], DTensor) else b[k]
        if x.is_floating_point() and x.numel():
            err = max(err, float((x.float() - y.float()).abs().max()))
        elif not torch.equal(x, y):
            err = float("inf")
    return err


def _timed(fn, *args: Any, **kwargs: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    dist.barrier()
    return dt


def _zstd_ext():
    try:
        from torch.distributed.checkpoint._extension import ZStandard

        ext = ZStandard()
        return ext, None
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
        return None, f"{type(exc).__name__}: {exc}"


def run(rank: int, ws: int, tmp: str, state_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=ws
    )
    mesh = init_device_mesh("cpu", (ws,))
    fulls = torch.load(state_file, mmap=True, weights_only=True)
    t1, t2 = _shard(fulls["t1"], mesh), _shard(fulls["t2"], mesh)
    del fulls
    root = os.path.join(tmp, "ckpt")
    stats: dict[str, Any] = {"step_max_abs_delta": _max_err(t2, t1, skip_scalars=True)}

    ext, zstd_error = _zstd_ext()
    methods: list[tuple[str, Any, Any]] = [
        ("dcp", lambda p, prev: FileSystemWriter(p), FileSystemReader),
    ]
    if ext is not None:
        from torch.distributed.checkpoint._extension import ZStandard

        methods.append(
            ("dcp_zstd", lambda p, prev: FileSystemWriter(p, _extensions=[ZStandard()]),
             FileSystemReader)
        )
    methods.append(
        ("lctriton", lambda p, prev: CompressedStorageWriter(p, previous=prev),
         CompressedStorageReader)
    )
    # What DistributedCheckpointManager does: t1's reconstruction stays in memory, so the
    # t2 delta does not decode t1 from storage.
    cache = ReconstructionCache()
    methods.append(
        ("lctriton_cache", lambda p, prev: CompressedStorageWriter(p, previous=prev, cache=cache),
         CompressedStorageReader)
    )

    for name, writer, reader in methods:
        d1, d2 = f"{root}/{name}/t1", f"{root}/{name}/t2"
        try:
            # t1 first (also a warm-up of the code path); lctriton writes it as its key.
            s1 = _timed(dcp.save, t1, storage_writer=writer(d1, None))
            with ResidentPeak() as peak:
                s2 = _timed(dcp.save, t2, storage_writer=writer(d2, d1))
            target = _fresh(t2)
            ld = _timed(dcp.load, target, storage_reader=reader(d2))
            err = _max_err(target, t2)
            stats[name] = {"save_t1_s": s1, "save_s": s2, "load_s": ld,
                           "peak_bytes": peak.bytes, "mem_source": peak.source,
                           "max_abs_err": err}
        except Exception as exc:  # noqa: BLE001 - record, keep the other methods
            stats[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            dist.barrier()
    if zstd_error is not None:
        stats["dcp_zstd"] = {"error": zstd_error}

    gathered: list[Any] = [None] * ws
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
