"""FSDP2 models and their AdamW optimizers through lctriton.dcp, resharded at load time.

A tiny language model is sharded with ``fully_shard`` (per layer and at the root) on a CPU
device mesh of 4 gloo ranks and trained; ``lctriton.dcp.save`` writes a lossless key
checkpoint A and, one step later, a lossy delta B against A. These tests prove that:

- B's tensor chunks are coded as deltas against A's same-named, same-offset chunks (FSDP2
  keeps its shard layout between saves at one world size);
- ``lctriton.dcp.load`` at world sizes 1, 2 and 3 into a freshly built, differently
  initialized model and a fresh optimizer restores A bit for bit (parameters, both Adam
  moments, step counters, param_groups) and B within the codec's bound, the uneven
  shards cutting across the saved chunks;
- training resumes: one step after loading A at another world size reaches the parameters
  of the uninterrupted 4-rank run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError as exc:
    pytest.skip(f"FSDP2 fully_shard unavailable: {exc}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import dcp_fsdp_worker  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from lctriton.config import CodecOptions  # noqa: E402
from lctriton.dcp import CompressedStorageReader  # noqa: E402

SAVE_WS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dcp_fsdp"))
    mp.spawn(dcp_fsdp_worker.save_run, args=(SAVE_WS, tmp), nprocs=SAVE_WS, join=True)
    reason = dcp_fsdp_worker.unsupported_path(tmp)
    if os.path.exists(reason):
        with open(reason) as f:
            pytest.skip(f.read())
    return tmp


def test_b_chunks_are_deltas_against_a_shards(saved):
    md_a = CompressedStorageReader(f"{saved}/A").read_metadata()
    md_b = CompressedStorageReader(f"{saved}/B").read_metadata()
    # FSDP2 keeps its shard layout between saves at one world size: same names and offsets,
    # so every chunk of B finds its base chunk in A.
    assert set(md_b.storage_data) == set(md_a.storage_data)
    assert all(info.base is None for info in md_a.storage_data.values())
    lossy = 0
    for index, info in md_b.storage_data.items():
        meta = md_b.state_dict_metadata[index.fqn]
        if not isinstance(meta, TensorStorageMetadata):
            continue  # param_groups: objects, never deltas
        if not meta.properties.dtype.is_floating_point:
            continue  # integer tensors are stored as keys
        assert info.base == "../A" and info.depth == 1, (index, info)
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
        lossy += chunk.sizes.numel() >= CodecOptions().min_numel
    assert lossy  # some chunks are big enough to be coded lossily, so B really is lossy
    # The model and both Adam moments were saved as the ranks' own dim-0 shards, not
    # gathered: every parameter-shaped tensor has one chunk per rank.
    sharded = {
        fqn: meta
        for fqn, meta in md_b.state_dict_metadata.items()
        if fqn.startswith("model.") or fqn.endswith((".exp_avg", ".exp_avg_sq"))
    }
    assert len(sharded) == 3 * sum(1 for fqn in sharded if fqn.startswith("model."))
    for fqn, meta in sharded.items():
        starts = sorted(c.offsets[0] for c in meta.chunks)
        rows = -(-meta.size[0] // SAVE_WS)  # FSDP2 splits dim 0 like torch.chunk
        assert starts == [r * rows for r in range(SAVE_WS)], (fqn, starts)


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_load_resharded_and_resume(saved, ws):
    mp.spawn(dcp_fsdp_worker.load_check, args=(ws, saved), nprocs=ws, join=True)
