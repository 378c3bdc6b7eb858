"""Multi-rank tests of lctriton.dcp: gloo, a file store, CPU DTensors, mp.spawn."""

from __future__ import annotations

import os
import pickle
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import dcp_worker  # noqa: E402

from lctriton import dcp as ldcp  # noqa: E402
from lctriton.dcp import CompressedStorageInfo, IncompleteCheckpointError  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed unavailable"
)


def _md(path):
    with open(os.path.join(path, ".metadata"), "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dcp"))
    mp.spawn(dcp_worker.save_chain, args=(4, tmp), nprocs=4, join=True)
    return tmp


def test_chain_metadata(chain):
    root = os.path.join(chain, "ckpt")
    for step in (1, 2, 3):
        assert ldcp.is_complete(f"{root}/step-{step}")
    infos = [v for v in _md(f"{root}/step-1").storage_data.values()]
    assert all(isinstance(i, CompressedStorageInfo) and i.base is None for i in infos)
    for step in (2, 3):
        sd = _md(f"{root}/step-{step}").storage_data
        lct = [(k, v) for k, v in sd.items() if v.codec == "lct"]
        floats = [v for k, v in lct if not k.fqn.endswith("step")]
        # every float chunk is a delta against the previous step, same fqn and offsets
        assert floats and all(
            v.base == f"../step-{step - 1}" and v.depth == step - 1 for v in floats
        )
        assert any(v.codec == "raw" for v in sd.values())  # param_groups: DCP's own bytes
    # one file per rank
    assert sorted(f for f in os.listdir(f"{root}/step-2") if f.endswith(".distcp")) == [
        f"__{r}_0.distcp" for r in range(4)
    ]


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_load_resharded(chain, ws):
    mp.spawn(dcp_worker.load_check, args=(ws, chain), nprocs=ws, join=True)


def test_relayout_key_and_crash_leaves_previous(chain):
    root = os.path.join(chain, "ckpt")
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(dcp_worker.relayout_then_crash, args=(2, chain), nprocs=2, join=True)
    # step-4 (saved at world size 2 against a world-size-4 step-3): sharded chunks changed
    # layout and became key chunks; the replicated tensor kept its chunk and is a delta.
    sd = _md(f"{root}/step-4").storage_data
    by_fqn = {}
    for k, v in sd.items():
        by_fqn.setdefault(k.fqn, []).append(v)
    assert all(v.base is None for v in by_fqn["model.w"])
    assert all(v.base == "../step-3" for v in by_fqn["model.emb"])
    # the killed save is not complete and refuses to load; step-4 still loads
    assert os.path.isdir(f"{root}/step-5") and not ldcp.is_complete(f"{root}/step-5")
    target = {"t": torch.zeros(32, 320)}
    with pytest.raises(IncompleteCheckpointError):
        ldcp.load(f"{root}/step-5", target)
    state = {"model": {"emb": torch.zeros(32, 320), "w": torch.zeros(64, 160)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.distributed.checkpoint.load(
            state, storage_reader=ldcp.CompressedStorageReader(f"{root}/step-4")
        )
    want = dcp_worker.full(4)
    assert torch.equal(state["model"]["w"], want["w"])  # key chunk, lossless_key
    assert (state["model"]["emb"] - want["emb"]).abs().max() < 0.05


def test_convenience_save_load_module_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ldcp.save(tmp_path / "step-1", {"model": model, "optimizer": opt}, lossless=True)
        model2 = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)
        )
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        model2(torch.randn(8, 64)).sum().backward()
        opt2.step()
        ldcp.load(tmp_path / "step-1", {"model": model2, "optimizer": opt2})
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][n], s2["state"][k][n])
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]


def test_missing_metadata_is_clear(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="metadata is missing"):
        ldcp.load(tmp_path / "x", {"t": torch.zeros(1)})


def test_bad_options_rejected(tmp_path):
    with pytest.raises((ValueError, TypeError)):
        ldcp.CompressedStorageWriter(tmp_path, bits=99)
