"""Multi-rank tests of lctriton.dcp: gloo, a file store, CPU DTensors, mp.spawn."""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import dcp_worker  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

from lctriton import dcp as ldcp  # noqa: E402
from lctriton.dcp import CompressedStorageInfo, IncompleteCheckpointError  # noqa: E402
from lctriton.errors import FormatError  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed unavailable"
)


def _md(path):
    return ldcp.read_metadata(path)


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
        assert any(v.codec == "obj" for v in sd.values())  # param_groups: a value tree
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


# ----------------------------------------------------------------------- the manager


@pytest.fixture(scope="module")
def managed_run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dcp-run"))
    mp.spawn(dcp_worker.manager_run, args=(3, tmp), nprocs=3, join=True)
    return tmp


def test_manager_chains_retention_and_manifest(managed_run):
    run = os.path.join(managed_run, "run")
    manifest = json.loads(open(os.path.join(run, "manifest.json")).read())
    assert manifest["layout"] == "dcp"
    points = {c["step"]: c for c in manifest["checkpoints"]}
    # key_every=3: 1 key, 2-3 deltas, 4 key; the reopened run continues the chain: 5, 6
    # deltas. keep_last=2 keeps 5 and 6 (5 also tagged) and 4, which they need; 1-3 are
    # deleted, directories included.
    assert sorted(points) == [4, 5, 6]
    assert [(points[s]["kind"], points[s]["base_step"]) for s in (4, 5, 6)] == [
        ("key", None), ("delta", 4), ("delta", 5)
    ]
    assert points[5]["tags"] == ["five"] and points[4]["metadata"] == {"loss": 0.25}
    assert sorted(n for n in os.listdir(run) if n.startswith("step-")) == [
        f"step-{s:012d}" for s in (4, 5, 6)
    ]
    md = ldcp.read_metadata(os.path.join(run, f"step-{6:012d}"))
    deltas = [i for k, i in md.storage_data.items() if i.codec == "lct" and not k.fqn.endswith("step")]
    assert deltas and all(i.base == f"../step-{5:012d}" and i.depth == 2 for i in deltas)
    # nbytes counts the stored chunks: deltas are far smaller than the key
    assert points[5]["nbytes"] * 3 < points[4]["nbytes"]


@pytest.mark.parametrize("ws", [1, 2])
def test_manager_restores_at_another_world_size(managed_run, ws):
    mp.spawn(dcp_worker.manager_restore, args=(ws, managed_run), nprocs=ws, join=True)


def test_manager_rank_killed_mid_save_leaves_last_point(managed_run, tmp_path):
    import shutil

    run = shutil.copytree(os.path.join(managed_run, "run"), tmp_path / "run")
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(dcp_worker.manager_crash, args=(2, str(tmp_path)), nprocs=2, join=True)
    partial = run / f"step-{7:012d}"
    assert partial.is_dir() and not ldcp.is_complete(partial)
    # A new manager (one process here) removes the partial save and restores step 6.
    mgr = ldcp.DistributedCheckpointManager(run, **dcp_worker.MANAGER_OPTIONS)
    assert not partial.exists()
    assert mgr.latest_step == 6
    state = {"model": {"emb": torch.zeros(32, 320), "w": torch.zeros(64, 160)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.restore("latest", state).step == 6
    want = dcp_worker.full(6)
    assert (state["model"]["w"] - want["w"]).abs().max() < 0.05
    # and the run goes on: step 7 again (a key: the chain 4-5-6 is key_every long), then
    # step 8, a delta against it; retention now drops step 6 but keeps the tagged step 5.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state["model"]["w"] += 0.01
        assert mgr.save(7, state).result().kind == "key"
        state["model"]["w"] += 0.01
        info = mgr.save(8, state).result()
    assert (info.kind, info.base_step) == ("delta", 7)
    assert [c.step for c in mgr.checkpoints()] == [4, 5, 7, 8]
    assert not (run / f"step-{6:012d}").exists()


# ----------------------------------------------------------------------- one process


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _states(steps: int = 3):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 130, generator=g)
    out = []
    for s in range(steps):
        w = w + 0.01 * torch.randn(96, 130, generator=g)
        out.append({"w": w.clone(), "b": torch.full((7,), float(s)), "n": torch.tensor(s),
                    "groups": [{"lr": 0.1 * (s + 1), "betas": (0.9, 0.99), "name": "all"}]})
    return out


def test_fsspec_memory_filesystem_chain():
    fsspec = pytest.importorskip("fsspec")
    import torch.distributed.checkpoint as dcp

    root = f"memory://lct-{os.getpid()}"
    states = _states()
    cache = ldcp.ReconstructionCache()
    prev = None
    for s, st in enumerate(states):
        path = f"{root}/step-{s}"
        _quiet(dcp.save, st, storage_writer=ldcp.CompressedStorageWriter(path, previous=prev, cache=cache))
        assert ldcp.is_complete(path)
        prev = path
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/lct-{os.getpid()}/step-2/__0_0.distcp")
    md = ldcp.read_metadata(f"{root}/step-2")
    w_info = next(i for k, i in md.storage_data.items() if k.fqn == "w")
    assert (w_info.base, w_info.depth) == ("../step-1", 2)
    target = {"w": torch.zeros(96, 130), "b": torch.zeros(7), "n": torch.tensor(0),
              "groups": [{"lr": None, "betas": None, "name": None}]}
    _quiet(dcp.load, target, storage_reader=ldcp.CompressedStorageReader(f"{root}/step-2"))
    step = (states[2]["w"] - states[1]["w"]).abs().max()
    assert (target["w"] - states[2]["w"]).abs().max() < 0.6 * step
    assert torch.equal(target["b"], states[2]["b"]) and int(target["n"]) == 2
    assert target["groups"] == [{"lr": 0.30000000000000004, "betas": (0.9, 0.99), "name": "all"}]
    fs.rm(f"/lct-{os.getpid()}", recursive=True)


def test_fsspec_manager_run():
    pytest.importorskip("fsspec")
    run = f"memory://lct-run-{os.getpid()}"
    mgr = ldcp.DistributedCheckpointManager(run, key_every=2, keep_last=1)
    for s, st in enumerate(_states(4), start=1):
        _quiet(mgr.save, s, st)
    assert [(c.step, c.kind) for c in mgr.checkpoints()] == [(3, "key"), (4, "delta")]
    target = {"w": torch.zeros(96, 130), "b": torch.zeros(7), "n": torch.tensor(0),
              "groups": [{"lr": None, "betas": None, "name": None}]}
    assert _quiet(mgr.restore, 3, target).step == 3
    assert int(target["n"]) == 2
    reopened = ldcp.DistributedCheckpointManager(run, key_every=2, keep_last=1)
    assert reopened.latest_step == 4


def test_cache_gives_the_same_bytes_as_decoding_the_base(tmp_path):
    import torch.distributed.checkpoint as dcp

    states = _states(2)
    cache = ldcp.ReconstructionCache()
    _quiet(dcp.save, states[0], storage_writer=ldcp.CompressedStorageWriter(tmp_path / "k", cache=cache))
    assert cache.nbytes == 96 * 130 * 4 + 7 * 4  # the floating chunks
    for name, c in (("cached", cache), ("decoded", None)):
        w = ldcp.CompressedStorageWriter(tmp_path / name, previous=tmp_path / "k", cache=c)
        _quiet(dcp.save, states[1], storage_writer=w)
        assert w.delta_chunks == 2
    assert (tmp_path / "cached/__0_0.distcp").read_bytes() == (tmp_path / "decoded/__0_0.distcp").read_bytes()


def test_metadata_is_never_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    # A plain DCP checkpoint's .metadata is a pickle: refused unread, with a clear error.
    _quiet(dcp.save, {"w": torch.zeros(4)}, storage_writer=FileSystemWriter(tmp_path / "plain"))
    with pytest.raises(FormatError, match="not written by lctriton"):
        ldcp.read_metadata(tmp_path / "plain")
    # A pickle that would run code when loaded does not run.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointException, match="not written by lctriton"):  # DCP wraps it
        _quiet(dcp.load, {"w": torch.zeros(4)}, storage_reader=ldcp.CompressedStorageReader(tmp_path / "evil"))
    assert not marker.exists()


def _rewrite_metadata(path, edit):
    data = (path / ".metadata").read_bytes()
    doc = json.loads(data[len(ldcp.MAGIC):])
    edit(doc)
    (path / ".metadata").write_bytes(ldcp.MAGIC + json.dumps(doc).encode())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(format="x"), "lctriton-dcp"),
        (lambda d: d["tensors"]["w"].update(dtype="float128"), "dtype"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(sizes=[97, 130]), "outside"),
        (lambda d: d["storage"][0].update(file="../../etc/passwd.distcp"), "rank file"),
        (lambda d: d["storage"][0].update(codec="pickle"), "codec"),
        (lambda d: d["storage"][0].update(length=-1), "length"),
        (lambda d: d["storage"][0].update(depth=1), "depth"),
        (lambda d: d["storage"][0].update(fqn="nope"), "names no stored"),
        (lambda d: d.update(tensors=[]), "storage table"),
    ],
)
def test_corrupt_metadata_is_refused(tmp_path, edit, message):
    import torch.distributed.checkpoint as dcp

    _quiet(dcp.save, _states(1)[0], storage_writer=ldcp.CompressedStorageWriter(tmp_path / "c"))
    _rewrite_metadata(tmp_path / "c", lambda d: d["storage"].sort(key=lambda s: s["fqn"] != "w"))
    _rewrite_metadata(tmp_path / "c", edit)
    with pytest.raises(FormatError, match=message):
        ldcp.read_metadata(tmp_path / "c")


def test_truncated_rank_file_and_missing_base(tmp_path):
    import torch.distributed.checkpoint as dcp

    states = _states(2)
    _quiet(dcp.save, states[0], storage_writer=ldcp.CompressedStorageWriter(tmp_path / "k"))
    _quiet(dcp.save, states[1], storage_writer=ldcp.CompressedStorageWriter(tmp_path / "d", previous=tmp_path / "k"))
    target = {"w": torch.zeros(96, 130), "b": torch.zeros(7), "n": torch.tensor(0),
              "groups": [{"lr": None, "betas": None, "name": None}]}
    (tmp_path / "k" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointException, match="truncated"):
        _quiet(dcp.load, target, storage_reader=ldcp.CompressedStorageReader(tmp_path / "d"))
    import shutil

    shutil.rmtree(tmp_path / "k")
    with pytest.raises(CheckpointException, match="complete checkpoint"):
        _quiet(dcp.load, target, storage_reader=ldcp.CompressedStorageReader(tmp_path / "d"))


def test_manager_validates_and_fallback(tmp_path):
    with pytest.raises(ValueError, match="key_every"):
        ldcp.DistributedCheckpointManager(tmp_path / "r", key_every=0)
    mgr = ldcp.DistributedCheckpointManager(tmp_path / "r", key_every=5)
    states = _states(3)
    for s, st in enumerate(states, start=1):
        _quiet(mgr.save, s, st)
    with pytest.raises(ValueError, match="not after"):
        mgr.save(2, states[0])
    mgr.tag(1, "first")
    target = {"w": torch.zeros(96, 130), "b": torch.zeros(7), "n": torch.tensor(0),
              "groups": [{"lr": None, "betas": None, "name": None}]}
    # break step 3's chunk file: restore raises, or falls back to step 2
    (tmp_path / "r" / f"step-{3:012d}" / "__0_0.distcp").write_bytes(b"junk")
    with pytest.raises(FormatError, match="cannot restore step 3"):
        _quiet(mgr.restore, "latest", target)
    restored = _quiet(mgr.restore, "latest", target, fallback=True)
    assert (restored.step, restored.requested) == (2, 3)
    assert int(target["n"]) == 1
    rolled = _quiet(mgr.rollback, "first", target)
    assert rolled.step == 1 and [c.step for c in mgr.checkpoints()] == [1]
    assert not (tmp_path / "r" / f"step-{2:012d}").exists()
    with pytest.raises(LookupError):
        mgr.restore("nope", target)
