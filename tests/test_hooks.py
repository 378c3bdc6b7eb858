"""Training-loop hooks: the optimizer step hook, the COCI-style step wrapper, and the Hugging
Face and Lightning callbacks run inside real, tiny ``Trainer`` runs.

transformers and lightning are not in the ``dev`` extra, so that CI stays light: their tests
skip where the library is not installed (``pip install "lctriton[integrations]"`` runs them).
"""

import importlib
import logging
import subprocess
import sys

import pytest
import torch

from lctriton.hooks import CheckpointedOptimizerStep, StepHook, checkpoint_every
from lctriton.manager import CheckpointManager
from lctriton.state import TrainingState


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    return model(torch.randn(8, 16, generator=g)).pow(2).mean()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- plain loops


def test_checkpoint_every_saves_at_multiples_and_restores_exact_weights(tmp_path):
    model, opt = _model()
    ts = TrainingState(model=model, optimizer=opt, rng=False)
    weights = {}
    with CheckpointManager(tmp_path, keep_last=100, lossless=True) as mgr:
        hook = checkpoint_every(opt, mgr, lambda: ts, every=3)
        assert isinstance(hook, StepHook)
        for i in range(1, 11):
            _loss(model, i).backward()
            opt.step()
            opt.zero_grad()
            weights[i] = _weights(model)
        assert hook.step == 10 and hook.saved_steps == [3, 6, 9]
        hook.remove()
        for i in range(11, 14):  # detached: neither counted nor saved
            _loss(model, i).backward()
            opt.step()
            opt.zero_grad()
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [3, 6, 9]
        assert hook.step == 10 and hook.last_save.result().step == 9

        fresh, fresh_opt = _model(seed=1)
        restored = mgr.restore(6, into=TrainingState(model=fresh, optimizer=fresh_opt, rng=False))
    assert restored.state["step"] == 6  # the TrainingState got the step it was saved at
    assert _same(_weights(fresh), weights[6])
    assert fresh_opt.state_dict()["state"][0]["step"].item() == 6


def test_checkpoint_every_none_follows_the_managers_every_and_start_step(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, keep_last=100, every=4) as mgr:
        state_fn = lambda: {"model": model.state_dict()}  # noqa: E731
        with checkpoint_every(opt, mgr, state_fn, start_step=5) as hook:
            for i in range(10):
                _loss(model, i).backward()
                opt.step()
        mgr.wait()
        assert hook.saved_steps == [8, 12] and hook.step == 15
        assert [c.step for c in mgr.checkpoints()] == [8, 12]


def test_coci_style_step_saves_when_the_manager_says(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path, keep_last=100, every=3, lossless=True) as mgr:
        ckpt = CheckpointedOptimizerStep(opt, mgr, lambda: {"model": model.state_dict()})
        handles, losses, weights = [], [], {}
        for i in range(1, 8):
            loss = _loss(model, i)
            loss.backward()
            handles.append(ckpt.step(loss) if i % 2 else ckpt.optimizer_step(loss.item()))
            ckpt.zero_grad()
            losses.append(loss.item())
            weights[i] = _weights(model)
        assert [h is not None for h in handles] == [i % 3 == 0 for i in range(1, 8)]
        assert ckpt.step_count == 7 and all(p.grad is None for p in model.parameters())
        mgr.wait()
        infos = mgr.checkpoints()
        assert [c.step for c in infos] == [3, 6]
        assert [c.metadata["loss"] for c in infos] == pytest.approx([losses[2], losses[5]])
        assert _same(mgr.restore(3).state["model"], weights[3])


class _RecordingSchedule:
    """A schedule (the manager's ``schedule=`` protocol) that keeps what it was asked."""

    def __init__(self, save_at):
        self.save_at = set(save_at)
        self.calls = []

    def should_save(self, step, loss, manager):
        self.calls.append((step, loss))
        return step in self.save_at


def test_coci_style_step_hands_each_loss_to_the_schedule(tmp_path):
    model, opt = _model()
    schedule = _RecordingSchedule(save_at={2, 5})
    with CheckpointManager(tmp_path, keep_last=100, schedule=schedule) as mgr:
        state_fn = lambda: {"model": model.state_dict()}  # noqa: E731
        ckpt = CheckpointedOptimizerStep(opt, mgr, state_fn, start_step=1)
        given = []
        for i in range(5):
            loss = _loss(model, i)
            loss.backward()
            given.append(loss.item())
            ckpt(loss)  # __call__ is step()
            ckpt.zero_grad()
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [2, 5]
    assert [s for s, _ in schedule.calls] == [2, 3, 4, 5, 6]
    assert [v for _, v in schedule.calls] == given
    assert all(type(v) is float for _, v in schedule.calls)


def test_loop_helpers_reject_bad_arguments(tmp_path):
    model, opt = _model()
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="every"):
            checkpoint_every(opt, mgr, dict, every=0)
        with pytest.raises(ValueError, match="start_step"):
            checkpoint_every(opt, mgr, dict, every=2, start_step=-1)
        with pytest.raises(TypeError, match="optimizer"):
            checkpoint_every(model, mgr, dict, every=2)
        with pytest.raises(TypeError, match="state_fn"):
            CheckpointedOptimizerStep(opt, mgr, {"model": 1})
        with pytest.raises(TypeError, match="manager"):
            CheckpointedOptimizerStep(opt, object(), dict)
        ckpt = CheckpointedOptimizerStep(opt, mgr, dict)
        with pytest.raises(TypeError, match="one-element"):
            ckpt.step(torch.ones(2))
        with pytest.raises(TypeError, match="loss"):
            ckpt.step("0.5")
        assert ckpt.step_count == 0  # a rejected loss takes no step


def test_importing_lctriton_hooks_imports_no_framework():
    code = (
        "import sys, lctriton, lctriton.hooks, lctriton.hooks.loop\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "module, blocked, hint",
    [
        ("lctriton.hooks.huggingface", ("transformers",), "pip install transformers"),
        ("lctriton.hooks.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"),
         "pip install lightning"),
    ],
)
def test_framework_modules_name_the_missing_package(monkeypatch, module, blocked, hint):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=hint):
        importlib.import_module(module)


# ---------------------------------------------------------------------- Hugging Face


class _TinyTextDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def _hf_run(tmp_path, callback, max_steps, seed):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it; transformers alone does not pull it
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=1e-3, optim="adamw_torch", report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=seed,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TinyTextDataset(),
                                   callbacks=[callback])
    trainer.train()
    return trainer


def test_huggingface_callback_in_a_real_trainer(tmp_path):
    pytest.importorskip("transformers")
    from lctriton.hooks.huggingface import LctritonCallback

    with CheckpointManager(tmp_path / "ckpt", keep_last=100, lossless=True) as mgr:
        callback = LctritonCallback(mgr, every=2)
        trainer = _hf_run(tmp_path, callback, max_steps=6, seed=0)
        assert callback.saved_steps == [2, 4, 6]
        # on_train_end waited: every save is durable already.
        assert [c.step for c in mgr.checkpoints()] == [2, 4, 6]
        state = mgr.restore("latest").state
        assert state["extra"]["trainer_state"]["global_step"] == 6
        assert state["scheduler"]["last_epoch"] == 6

        transformers = pytest.importorskip("transformers")
        fresh = transformers.BertForSequenceClassification(trainer.model.config)
        callback.restore(fresh)  # a model-only restore of a checkpoint with optimizer state
    assert _same(_weights(fresh), _weights(trainer.model))


def test_huggingface_callback_resumes_model_optimizer_and_counters(tmp_path):
    pytest.importorskip("transformers")
    from lctriton.hooks.huggingface import LctritonCallback

    with CheckpointManager(tmp_path / "ckpt", keep_last=100, lossless=True) as mgr:
        first = _hf_run(tmp_path, LctritonCallback(mgr, every=2), max_steps=4, seed=0)
        at_four = _weights(first.model)
    with CheckpointManager(tmp_path / "ckpt", keep_last=100, lossless=True) as mgr:
        callback = LctritonCallback(mgr, every=2, resume=True)
        second = _hf_run(tmp_path, callback, max_steps=6, seed=1)
        assert callback.restored.step == 4 and _same(callback.restored.state["model"], at_four)
        assert second.state.global_step == 6 and callback.saved_steps == [6]
        assert [c.step for c in mgr.checkpoints()] == [2, 4, 6]
        # Two more optimizer steps on top of the restored four.
        assert all(s["step"].item() == 6 for s in second.optimizer.state_dict()["state"].values())
        assert second.lr_scheduler.last_epoch == 6


def test_huggingface_callback_without_optimizer_follows_the_manager(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lctriton.hooks.huggingface import LctritonCallback

    model, opt = _model()
    args, control = None, transformers.TrainerControl()
    with CheckpointManager(tmp_path, keep_last=100, every=3, lossless=True) as mgr:
        callback = LctritonCallback(mgr, save_optimizer=False)
        state = transformers.TrainerState()
        callback.on_train_begin(args, state, control, model=model, optimizer=opt)
        for step in range(1, 8):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
            state.global_step, state.epoch = step, step / 4
            callback.on_step_end(args, state, control, model=model, optimizer=opt)
        callback.on_train_end(args, state, control)
        assert callback.saved_steps == [3, 6] and [c.step for c in mgr.checkpoints()] == [3, 6]
        saved = mgr.restore(6).state
        assert "optimizer" not in saved and saved["epoch"] == 1
        assert saved["extra"]["trainer_state"]["epoch"] == 1.5

        fresh, fresh_opt = _model(seed=1)
        resumed = transformers.TrainerState()
        callback.restore(fresh, fresh_opt, trainer_state=resumed, which=6)
    assert _same(_weights(fresh), _weights(model)) is False  # model moved on after step 6
    assert _same(_weights(fresh), saved["model"])
    assert resumed.global_step == 6 and resumed.epoch == 1.5
    assert fresh_opt.state_dict()["state"] == {}  # no optimizer state saved: it starts fresh


def test_huggingface_callback_rejects_bad_arguments(tmp_path):
    pytest.importorskip("transformers")
    from lctriton.hooks.huggingface import LctritonCallback

    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="every"):
            LctritonCallback(mgr, every=0)
        with pytest.raises(TypeError, match="save_optimizer"):
            LctritonCallback(mgr, save_optimizer="yes")
        with pytest.raises(TypeError, match="manager"):
            LctritonCallback(object())


# ---------------------------------------------------------------------- Lightning


def _lightning_net():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _lightning_parts(max_steps, seed, callbacks, checkpointing=False):
    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _lightning_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, 2), "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.randn(40, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(seed)
    module = Tiny()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )
    return trainer, module, torch.utils.data.DataLoader(data, batch_size=4)


def _lightning_run(callback, max_steps, seed):
    trainer, module, loader = _lightning_parts(max_steps, seed, [callback])
    trainer.fit(module, loader)
    return trainer, module


def _lightning_noise(test):
    """Ignore the warnings a tiny CPU run makes Lightning give, and only those."""
    for message in (
        ".*does not have many workers",  # the in-process DataLoader
        ".*resuming from a checkpoint that ended before the epoch ended",  # also with ckpt_path
        ".*callbacks used to create the checkpoint",  # the ckpt_path run of the comparison
        ".*LeafSpec",  # Lightning's own use of a torch API deprecated in newer torch
    ):
        test = pytest.mark.filterwarnings(f"ignore:{message}")(test)
    return test


@pytest.fixture
def _quiet_lightning():
    # Lightning logs its device summary on every run; keep the test output readable.
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@_lightning_noise
def test_lightning_callback_in_a_real_trainer(tmp_path, _quiet_lightning):
    pytest.importorskip("lightning")
    from lctriton.hooks.lightning import LctritonCheckpoint

    with CheckpointManager(tmp_path, keep_last=100, lossless=True) as mgr:
        callback = LctritonCheckpoint(mgr, every_n_train_steps=2)
        trainer, module = _lightning_run(callback, max_steps=6, seed=0)
        assert trainer.global_step == 6 and callback.saved_steps == [2, 4, 6]
        assert [c.step for c in mgr.checkpoints()] == [2, 4, 6]
        state = mgr.restore("latest").state
        assert state["step"] == 6 and len(state["optimizers"]) == 1
        assert state["lr_schedulers"][0]["last_epoch"] == 6
        # The weights alone load without a Trainer.
        fresh = torch.nn.Module()
        fresh.net = _lightning_net()
        mgr.restore(model=fresh)
    assert _same(_weights(fresh), _weights(module))


@_lightning_noise
def test_lightning_callback_resumes_model_optimizer_and_loop(tmp_path, _quiet_lightning):
    pytest.importorskip("lightning")
    from lctriton.hooks.lightning import LctritonCheckpoint

    with CheckpointManager(tmp_path, keep_last=100, lossless=True) as mgr:
        _, first = _lightning_run(LctritonCheckpoint(mgr, 2), max_steps=4, seed=0)
        at_four = _weights(first)
    with CheckpointManager(tmp_path, keep_last=100, lossless=True) as mgr:
        callback = LctritonCheckpoint(mgr, every_n_train_steps=2, resume=True)
        trainer, _ = _lightning_run(callback, max_steps=6, seed=1)
        assert callback.restored.step == 4 and _same(callback.restored.state["model"], at_four)
        assert trainer.global_step == 6 and callback.saved_steps == [6]
        assert [c.step for c in mgr.checkpoints()] == [2, 4, 6]
        opt_state = trainer.optimizers[0].state_dict()["state"]
        assert all(s["step"].item() == 6 for s in opt_state.values())
        assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6


@_lightning_noise
def test_lightning_resume_matches_lightnings_own_ckpt_path_resume(tmp_path, _quiet_lightning):
    L = pytest.importorskip("lightning")
    from lctriton.hooks.lightning import LctritonCheckpoint

    # One run checkpointed both ways at step 4, then resumed both ways to step 6.
    own = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "own", every_n_train_steps=4,
                                              save_top_k=-1)
    with CheckpointManager(tmp_path / "lct", lossless=True) as mgr:
        trainer, module, loader = _lightning_parts(4, 0, [own, LctritonCheckpoint(mgr, 4)],
                                                   checkpointing=True)
        trainer.fit(module, loader)
    (ckpt_path,) = (tmp_path / "own").iterdir()
    trainer, by_lightning, loader = _lightning_parts(6, 1, [])
    trainer.fit(by_lightning, loader, ckpt_path=ckpt_path)
    with CheckpointManager(tmp_path / "lct", lossless=True) as mgr:
        trainer_lct, by_lctriton = _lightning_run(LctritonCheckpoint(mgr, 100, resume=True), 6, 1)
    assert trainer_lct.global_step == trainer.global_step == 6
    assert _same(_weights(by_lctriton), _weights(by_lightning))
    progress = trainer.fit_loop.epoch_loop.batch_progress
    assert trainer_lct.fit_loop.epoch_loop.batch_progress.total == progress.total


def test_lightning_callback_rejects_bad_arguments(tmp_path):
    pytest.importorskip("lightning")
    from lctriton.hooks.lightning import LctritonCheckpoint

    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="every_n_train_steps"):
            LctritonCheckpoint(mgr, every_n_train_steps=-1)
        with pytest.raises(TypeError, match="resume"):
            LctritonCheckpoint(mgr, resume=1)
