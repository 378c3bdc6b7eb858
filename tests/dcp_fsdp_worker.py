"""Rank bodies for tests/test_dcp_fsdp.py: FSDP2 (``fully_shard``) on CPU with gloo.

Run under torch.multiprocessing.spawn with a file store. The saver trains a tiny language
model sharded with ``fully_shard`` and AdamW, saves a lossless key checkpoint (A) and, one
step later, a lossy delta against it (B) through ``lctriton.dcp.save``, and stores the full
(gathered) model and optimizer state at both steps as references. Loaders rebuild the model
at another world size, load through ``lctriton.dcp.load`` and compare the gathered state.
"""

from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lctriton import dcp as ldcp

# VOCAB is prime so the embedding and head rows shard unevenly at every world size > 1
# (25/25/25/22 at 4, 33/33/31 at 3, 49/48 at 2): resharding must cut across saved chunks.
# Every weight's saved chunks (1408 to 4096 elements) exceed the codec's min_numel (1024),
# so B codes them lossily; biases and norms are small enough to be stored exactly.
VOCAB, DIM, HIDDEN, SEQ = 97, 64, 256, 16
BATCH = 12  # global batch, divisible by every world size used (1 to 4)
STEPS_A = 3  # training steps before checkpoint A; B is one step later
LR = 1e-2
# Summation order differs across world sizes (seen: up to ~2.4e-7); updates are ~LR.
RESUME_ATOL = 1e-6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(mesh, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model, identically initialized on every rank from ``seed``, sharded per layer."""
    torch.manual_seed(seed)
    model = TinyLM()
    fully_shard(model.emb, mesh=mesh)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)  # root: the final norm
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, ws: int) -> None:
    """One step on global batch ``step``; this rank takes its equal share of the rows.

    Each rank's loss is the mean over its share and FSDP2 averages gradients over ranks, so
    the gradient is the mean over the global batch at any world size (up to summation order).
    """
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    per = BATCH // ws
    rows = tokens[dist.get_rank() * per : (dist.get_rank() + 1) * per]
    logits = model(rows[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()


def _clone(obj):
    # Optimizer "step" tensors are the live state objects (not gathered copies) and AdamW
    # increments them in place, so references must be detached copies.
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The unsharded model and optimizer state (collective; complete on rank 0 only)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _clone(
        {
            "model": get_model_state_dict(model, options=opts),
            "optim": get_optimizer_state_dict(model, opt, options=opts),
        }
    )


def _init(rank: int, ws: int, tmp: str, tag: str):
    # The model does no in-place op on module outputs, which is all this warning is about;
    # silenced so a failing rank's output stays readable.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    # A bounded timeout: a rank left waiting in a collective by a failed peer errors out
    # instead of hanging the test run for gloo's default 30 minutes.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store-{tag}",
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=120),
    )
    return init_device_mesh("cpu", (ws,))


def unsupported_path(tmp: str) -> str:
    return os.path.join(tmp, "fsdp-unsupported.txt")


def _fsdp_runs_on_cpu(mesh, tmp: str) -> bool:
    """Whether fully_shard can do forward, backward and an optimizer step here.

    Only torch-level failures count (no lctriton code runs here); the reason goes to a file
    so the test can skip with it.
    """
    try:
        torch.manual_seed(0)
        probe = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        fully_shard(probe[0], mesh=mesh)
        fully_shard(probe, mesh=mesh)
        opt = torch.optim.AdamW(probe.parameters())
        probe(torch.ones(2, 8)).sum().backward()
        opt.step()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        if dist.get_rank() == 0:
            with open(unsupported_path(tmp), "w") as f:
                f.write(f"fully_shard cannot run on a CPU/gloo mesh here: {exc!r}")
        return False
    return True


def save_run(rank: int, ws: int, tmp: str) -> None:
    """Train, save A (lossless key) and B (lossy delta against A), store full references."""
    mesh = _init(rank, ws, tmp, "save")
    if not _fsdp_runs_on_cpu(mesh, tmp):
        dist.destroy_process_group()
        return
    model, opt = build(mesh, seed=0)
    for step in range(1, STEPS_A + 1):
        train_step(model, opt, step, ws)
    ref_a = full_state(model, opt)
    ldcp.save(f"{tmp}/A", {"model": model, "optimizer": opt}, lossless=True)
    train_step(model, opt, STEPS_A + 1, ws)
    ref_b = full_state(model, opt)
    ldcp.save(f"{tmp}/B", {"model": model, "optimizer": opt}, previous=f"{tmp}/A")
    if rank == 0:
        torch.save({"A": ref_a, "B": ref_b}, f"{tmp}/reference.pt")
    dist.barrier()
    dist.destroy_process_group()


def _bits_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.is_floating_point():  # compare bit patterns: -0.0 vs 0.0 and NaNs count
        return torch.equal(got.view(torch.int32), want.view(torch.int32))
    return torch.equal(got, want)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a full state, by a flat name ("model/<fqn>", "optim/<fqn>/exp_avg")."""
    out = {f"model/{k}": v for k, v in state["model"].items()}
    for fqn, per_param in state["optim"]["state"].items():
        for name, value in per_param.items():
            out[f"optim/{fqn}/{name}"] = value
    return out


def _check_loaded(got: dict, refs: dict, tag: str, ws: int) -> None:
    want, have, at_a = _tensors(refs[tag]), _tensors(got), _tensors(refs["A"])
    assert sorted(have) == sorted(want), (ws, tag, sorted(set(have) ^ set(want)))
    # param_groups carry the hyperparameters; the loader built AdamW with a different lr,
    # so equality shows they came from the checkpoint.
    assert got["optim"]["param_groups"] == refs[tag]["optim"]["param_groups"], (ws, tag)
    for name, w in want.items():
        g = have[name]
        if tag == "A" or name.endswith("/step"):  # A is lossless; step counters are exact
            assert _bits_equal(g, w), (ws, tag, name)
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (ws, tag, name)
        # B is a lossy delta against A: the error is bounded by a fraction of the A->B change
        err = (g - w).abs().max().item()
        change = (w - at_a[name]).abs().max().item()
        assert torch.equal(g, w) or err < 0.6 * change, (ws, tag, name, err, change)


def load_check(rank: int, ws: int, tmp: str) -> None:
    """Load A and B at world size ``ws``, compare with the references, resume from A."""
    mesh = _init(rank, ws, tmp, f"load{ws}")
    refs = torch.load(f"{tmp}/reference.pt", weights_only=True) if rank == 0 else None
    for tag in ("A", "B"):
        # A different init seed and lr, and a fresh optimizer without state (lctriton.dcp.load
        # creates it through get_optimizer_state_dict's zero-lr step): everything compared
        # below must come from the checkpoint.
        model, opt = build(mesh, seed=100 + ws)
        opt.param_groups[0]["lr"] = 0.5
        ldcp.load(f"{tmp}/{tag}", {"model": model, "optimizer": opt})
        got = full_state(model, opt)
        if rank == 0:
            _check_loaded(got, refs, tag, ws)
        if tag == "A":
            # Resume: the step after A at this world size lands where the saver's
            # uninterrupted run did (B's reference), up to summation order.
            train_step(model, opt, STEPS_A + 1, ws)
            got = full_state(model, opt)
            if rank == 0:
                _check_resumed(got, refs, ws)
    dist.barrier()
    dist.destroy_process_group()


def _check_resumed(got: dict, refs: dict, ws: int) -> None:
    moved = 0.0
    for fqn, w in refs["B"]["model"].items():
        g = got["model"][fqn]
        err = (g - w).abs().max().item()
        assert err <= RESUME_ATOL, (ws, fqn, err)
        moved = max(moved, (w - refs["A"]["model"][fqn]).abs().max().item())
    # the step moved parameters far more than the tolerance, so staying at A would fail
    assert moved > 100 * RESUME_ATOL, moved
    for fqn, per_param in refs["B"]["optim"]["state"].items():
        assert _bits_equal(got["optim"]["state"][fqn]["step"], per_param["step"]), (ws, fqn)
