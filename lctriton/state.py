"""The whole training state: gathered from live objects, restored into fresh ones.

A run resumed from a checkpoint continues on the same path only if *everything* that
decides the path comes back: the model, the optimizer (every state tensor and counter), the
learning-rate scheduler, the gradient scaler, the random number generators, the step and
epoch, and the position in the data. :class:`TrainingState` gathers these from the live
objects into one state dict that :func:`lctriton.compress` and :func:`lctriton.save` can
store, and puts them back::

    sampler = ResumableSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator())
    ts = TrainingState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data=sampler)
    ...
    lctriton.save("ckpt.lct", ts.state_dict(), lossless=True)
    ...                                      # later, in a new process, with fresh objects:
    ts.load_state_dict(lctriton.load("ckpt.lct"))
    for batch in loader:                     # create the iterator *after* loading
        ...

With a lossless checkpoint the resumed run is bit-identical to one never interrupted,
given the same code, library versions and hardware, deterministic kernels, and a data
pipeline whose randomness lives in the generators captured here. Two things in torch's
``DataLoader`` need care:

* Creating a ``DataLoader`` iterator draws one number (the workers' base seed) from the
  global torch RNG unless the loader has its own ``generator=``. A run resumed mid-epoch
  creates one more iterator than the run it continues, so that draw would shift every later
  random number (dropout masks, ...). Give the loader a ``generator=torch.Generator()``.
* With ``num_workers > 0`` the loader pulls indices ahead of the batches the loop has
  consumed, so a sampler's own count runs ahead. Count consumed batches with
  :class:`DataPosition` and :meth:`ResumableSampler.seek` to it on resume, or use a loader
  that tracks this itself (torchdata's ``StatefulDataLoader``). Randomness inside worker
  processes is reseeded per iterator and cannot be resumed mid-epoch.

Nothing here pickles: every part is stored as tensors, arrays and plain values.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator, Mapping, Sized
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.utils.data

__all__ = [
    "Stateful",
    "capture_rng",
    "restore_rng",
    "ResumableSampler",
    "DataPosition",
    "TrainingState",
    "TRAINING_STATE_FORMAT",
    "TRAINING_STATE_VERSION",
]

logger = logging.getLogger(__name__)

#: The ``"format"`` entry of a :meth:`TrainingState.state_dict`.
TRAINING_STATE_FORMAT = "lctriton-training-state"
#: The newest ``"version"`` of that layout this module writes and reads.
TRAINING_STATE_VERSION = 1

_MT_WORDS = 624  # Mersenne Twister state words, in both Python's and numpy's generators
_UINT32_END = 1 << 32
_UINT64_END = 1 << 64


@runtime_checkable
class Stateful(Protocol):
    """Anything with torch's ``state_dict`` / ``load_state_dict`` pair.

    Modules, optimizers, schedulers, gradient scalers, :class:`ResumableSampler`,
    :class:`DataPosition` and torchdata's ``StatefulDataLoader`` all qualify. A user's own
    data loader qualifies by implementing the two methods; its state must be storable by
    lctriton (dicts, lists and tuples over tensors, arrays and plain values).
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        ...


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    """Return ``value`` as an int, or raise naming ``name`` when it is not one in range."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        bound = f"from {low} to {high - 1}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value}")
    return value


# --------------------------------------------------------------------------- RNG


def capture_rng(cuda: bool | None = None) -> dict[str, Any]:
    """Capture the global random number generators in a storable form.

    Args:
        cuda: Whether to capture the CUDA generators of every device. ``None`` (default):
            only when CUDA is already initialized in this process; a process that never
            touched CUDA has drawn nothing from them, and capturing would initialize CUDA
            (slow, and unsafe before forking). ``True``: whenever CUDA is available.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": uint8 tensor, "cuda": [uint8 tensor,
        ...]}`` (``"cuda"`` only when captured). Every tensor is a CPU copy.
    """
    version, internal, gauss_next = random.getstate()
    words = list(internal)
    if all(_is_int(w) and 0 <= w < _UINT32_END for w in words):
        # An array keeps the 625 words out of the file's JSON tree.
        packed: Any = np.asarray(words, dtype=np.uint32)
    else:  # not CPython's Mersenne Twister: keep whatever ints it uses
        packed = tuple(int(w) for w in words)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": packed, "gauss_next": gauss_next},
        "numpy": _capture_numpy(),
        "torch": torch.get_rng_state().clone(),
    }
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda and torch.cuda.is_available():
        state["cuda"] = [s.cpu().clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _capture_numpy() -> dict[str, Any]:
    raw = np.random.get_state(legacy=True)
    if isinstance(raw, tuple):
        name, keys, pos, has_gauss, cached = raw
        return {
            "bit_generator": str(name),
            "keys": np.array(keys, dtype=np.uint32),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    # The global RandomState was given a bit generator other than MT19937: numpy then
    # reports a dict of arrays and ints, which is storable as it is.
    return {"bit_generator_state": copy.deepcopy(raw)}


def _parse_python(value: Any) -> tuple:
    if not isinstance(value, Mapping) or not {"version", "internal", "gauss_next"} <= set(value):
        raise ValueError(
            "state['python'] must be a dict with 'version', 'internal' and 'gauss_next'"
        )
    internal = value["internal"]
    if isinstance(internal, np.ndarray):
        if internal.ndim != 1 or internal.dtype.kind not in "iu":
            raise ValueError(
                f"state['python']['internal'] must be a 1-D integer array, got {internal.dtype}"
            )
        words = tuple(internal.tolist())  # Python ints: random.setstate rejects numpy scalars
    elif isinstance(internal, (list, tuple)) and all(_is_int(w) for w in internal):
        words = tuple(int(w) for w in internal)
    else:
        raise TypeError(
            "state['python']['internal'] must be an integer array or a sequence of ints"
        )
    gauss = value["gauss_next"]
    if gauss is not None and not isinstance(gauss, float):
        raise TypeError(
            f"state['python']['gauss_next'] must be a float or None, got {type(gauss).__name__}"
        )
    version = _check_int(value["version"], "state['python']['version']")
    return (version, words, gauss)


def _parse_numpy(value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError("state['numpy'] must be a dict")
    if "bit_generator_state" in value:
        return value["bit_generator_state"]
    needed = {"bit_generator", "keys", "pos", "has_gauss", "cached_gaussian"}
    if not needed <= set(value):
        raise ValueError(
            f"state['numpy'] must have the entries {sorted(needed)}, got {sorted(value)}"
        )
    keys = value["keys"]
    if (
        not isinstance(keys, np.ndarray)
        or keys.shape != (_MT_WORDS,)
        or keys.dtype.kind not in "iu"
    ):
        raise ValueError(f"state['numpy']['keys'] must be an integer array of {_MT_WORDS} words")
    return (
        str(value["bit_generator"]),
        keys.astype(np.uint32),
        _check_int(value["pos"], "state['numpy']['pos']", 0, _MT_WORDS + 1),
        _check_int(value["has_gauss"], "state['numpy']['has_gauss']", 0, 2),
        float(value["cached_gaussian"]),
    )


def _parse_byte_tensor(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        got = (
            f"{value.dtype} tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise TypeError(f"{name} must be a 1-D uint8 tensor, got {got}")
    # The generators take their state from a CPU byte tensor only.
    return value.detach().cpu().contiguous()


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`capture_rng`.

    Every part is checked before any generator is touched, so a malformed state changes
    nothing. Parts absent from ``state`` are left alone. CUDA generators are restored only
    when this process has CUDA; a warning is logged when the state holds CUDA generators
    this process cannot take (no CUDA, or a different number of devices: those present on
    both sides are restored).

    Args:
        state: A dict returned by :func:`capture_rng` (possibly after a storage round trip).

    Raises:
        TypeError: If ``state`` or one of its parts has the wrong type (naming the part).
        ValueError: If a part is malformed (naming it).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from capture_rng(), got {type(state).__name__}")
    unknown = sorted(str(k) for k in state if k not in ("python", "numpy", "torch", "cuda"))
    if unknown:
        # Likely generators a newer lctriton captures; the ones known here still resume.
        logger.warning("ignoring unknown RNG entries %s", unknown)
    py = _parse_python(state["python"]) if "python" in state else None
    npy = _parse_numpy(state["numpy"]) if "numpy" in state else None
    cpu = _parse_byte_tensor(state["torch"], "state['torch']") if "torch" in state else None
    cuda = None
    if "cuda" in state:
        if not isinstance(state["cuda"], (list, tuple)):
            raise TypeError(
                f"state['cuda'] must be a list of uint8 tensors, got {type(state['cuda']).__name__}"
            )
        cuda = [_parse_byte_tensor(s, f"state['cuda'][{i}]") for i, s in enumerate(state["cuda"])]

    if py is not None:
        try:
            random.setstate(py)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state['python'] is not a valid Python random state: {exc}") from None
    if npy is not None:
        try:
            np.random.set_state(npy)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state['numpy'] is not a valid numpy random state: {exc}") from None
    if cpu is not None:
        torch.set_rng_state(cpu)
    if cuda is not None:
        _restore_cuda(cuda)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        logger.warning(
            "the checkpoint holds CUDA RNG states for %d device(s) but this process has no CUDA; "
            "they are not restored, so CUDA random numbers will differ from the original run",
            len(states),
        )
        return
    count = torch.cuda.device_count()
    if count != len(states):
        logger.warning(
            "the checkpoint holds CUDA RNG states for %d device(s) but this process sees %d; "
            "restoring the first %d",
            len(states),
            count,
            min(count, len(states)),
        )
    for device, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s, device)


# --------------------------------------------------------------------------- data position


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded sampler that knows its place in the epoch and can resume mid-epoch.

    A drop-in for ``RandomSampler`` (``shuffle=True``) or ``SequentialSampler``
    (``shuffle=False``). Epoch ``e`` visits every index once, in the order
    ``torch.randperm`` gives with a private generator seeded with ``seed + e`` (mod 2**64):
    the order depends on nothing else, the global RNG included. The sampler counts the
    indices it has handed out in the current epoch (:attr:`position`);
    :meth:`load_state_dict` makes the next iteration hand out the rest of the same epoch.

    Epochs: an iteration started after the current epoch was fully handed out moves on
    to the next epoch by itself, so the sampler reshuffles every epoch without help.
    :meth:`set_epoch` (as with ``DistributedSampler``) selects an epoch explicitly; setting
    the epoch the sampler is already in keeps its position, so a loop calling
    ``set_epoch(epoch)`` at the top of every epoch resumes correctly. An iteration abandoned
    part-way is *not* restarted by a new ``iter()``: the new one continues where it stopped
    (call :meth:`seek` to replay an epoch). Only the newest iterator may be advanced; an
    older one raises ``RuntimeError``.

    With a ``DataLoader``, :attr:`position` counts the indices handed to the loader. With
    ``num_workers=0`` this is exactly the indices of the batches the loop has received
    (``batches * batch_size``). With worker processes the loader prefetches, so the count
    runs ahead of what the loop consumed: track consumed batches with a
    :class:`DataPosition` and, on resume, ``sampler.seek(pos.epoch, pos.batches * batch_size)``.

    Args:
        data_source: The dataset (anything with ``len``) or its length.
        shuffle: Permute the indices every epoch; otherwise hand them out in order.
        seed: Seed of the permutations; use the same on every rank and every restart.

    Raises:
        TypeError: If ``data_source`` has no length or ``seed`` is not an int.
        ValueError: If the length or seed is out of range.
    """

    def __init__(self, data_source: Sized | int, shuffle: bool = True, seed: int = 0) -> None:
        if _is_int(data_source):
            n = _check_int(data_source, "data_source")
        elif isinstance(data_source, Sized):
            n = _check_int(len(data_source), "len(data_source)")
        else:
            raise TypeError(
                "data_source must be a dataset with a length or an int, "
                f"got {type(data_source).__name__}"
            )
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
        self.num_samples = n
        self.shuffle = shuffle
        self.seed = _check_int(seed, "seed", 0, _UINT64_END)
        self.epoch = 0
        self.position = 0
        self._generation = 0  # which iterator is current; older ones must not move position

    def __len__(self) -> int:
        """Indices in a full epoch (a resumed epoch hands out fewer)."""
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(num_samples={self.num_samples}, shuffle={self.shuffle}, "
            f"seed={self.seed}, "
            f"epoch={self.epoch}, position={self.position})"
        )

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The indices of an epoch in the order they are handed out.

        Args:
            epoch: The epoch (default: the current one).

        Returns:
            A 1-D int64 tensor, a permutation of ``range(num_samples)``.
        """
        epoch = self.epoch if epoch is None else _check_int(epoch, "epoch")
        if not self.shuffle:
            return torch.arange(self.num_samples, dtype=torch.int64)
        generator = torch.Generator()
        generator.manual_seed((self.seed + epoch) % _UINT64_END)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        # Decided now rather than at the first next(), so that state_dict() taken between
        # iter() and next() already names the epoch being handed out.
        if self.position >= self.num_samples and self.num_samples:
            self.epoch += 1
            self.position = 0
        self._generation += 1
        return self._hand_out(self.order(), self.position, self._generation)

    def _hand_out(self, order: torch.Tensor, start: int, generation: int) -> Iterator[int]:
        block = 8192  # converts the permutation to ints piecewise: no list of a whole epoch
        for lo in range(start, self.num_samples, block):
            for index in order[lo : lo + block].tolist():
                if generation != self._generation:
                    raise RuntimeError(
                        "this ResumableSampler iterator was superseded by a newer iter() or a "
                        "load_state_dict/seek/set_epoch; a sampler has one consumer at a time"
                    )
                # Counted before the yield: once the consumer holds an index it is handed out.
                self.position += 1
                yield index

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration hands out.

        A different epoch starts from its beginning; the current epoch keeps its position.

        Args:
            epoch: The epoch, an int >= 0.
        """
        epoch = _check_int(epoch, "epoch")
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._generation += 1

    def seek(self, epoch: int, position: int) -> None:
        """Make the next iteration hand out epoch ``epoch`` from its ``position``-th index.

        Args:
            epoch: The epoch, an int >= 0.
            position: Indices of that epoch already consumed, from 0 to ``num_samples``.
        """
        self.epoch = _check_int(epoch, "epoch")
        self.position = _check_int(position, "position", 0, self.num_samples + 1)
        self._generation += 1

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"epoch", "position", "seed", "shuffle", "num_samples"}``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved sampler stopped.

        The saved seed and shuffle setting replace this sampler's, since the permutation
        being resumed was made with them.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ValueError: If an entry is missing or out of range, or the saved sampler covered
                a different number of samples (the dataset changed).
            TypeError: If an entry has the wrong type.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [
            k for k in ("epoch", "position", "seed", "shuffle", "num_samples") if k not in state
        ]
        if missing:
            raise ValueError(f"sampler state lacks {missing}")
        num_samples = _check_int(state["num_samples"], "state['num_samples']")
        if num_samples != self.num_samples:
            raise ValueError(
                f"state['num_samples'] is {num_samples} but this sampler covers {self.num_samples} "
                "samples: the dataset differs from the one the state was saved with"
            )
        if not isinstance(state["shuffle"], bool):
            raise TypeError(f"state['shuffle'] must be a bool, got {state['shuffle']!r}")
        epoch = _check_int(state["epoch"], "state['epoch']")
        position = _check_int(state["position"], "state['position']", 0, num_samples + 1)
        self.seed = _check_int(state["seed"], "state['seed']", 0, _UINT64_END)
        self.shuffle = state["shuffle"]
        self.epoch, self.position = epoch, position
        self._generation += 1


class DataPosition:
    """Epoch and batches consumed in it, for loops that index their data themselves.

    Also the way to record what a multi-worker ``DataLoader`` loop has really consumed
    (see :class:`ResumableSampler`). Call :meth:`advance` after each batch the loop has
    finished with, and :meth:`next_epoch` at the end of an epoch.

    Args:
        epoch: Starting epoch, an int >= 0.
        batches: Batches already consumed in that epoch, an int >= 0.
    """

    def __init__(self, epoch: int = 0, batches: int = 0) -> None:
        self.epoch = _check_int(epoch, "epoch")
        self.batches = _check_int(batches, "batches")

    def __repr__(self) -> str:
        return f"DataPosition(epoch={self.epoch}, batches={self.batches})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataPosition):
            return NotImplemented
        return (self.epoch, self.batches) == (other.epoch, other.batches)

    __hash__ = None  # mutable: equal positions must not be dict keys that later diverge

    def advance(self, n_batches: int = 1) -> None:
        """Count ``n_batches`` (an int >= 0) more batches consumed in this epoch."""
        self.batches += _check_int(n_batches, "n_batches")

    def next_epoch(self) -> None:
        """Start the next epoch with no batches consumed."""
        self.epoch += 1
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"epoch", "batches"}``."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a dict from :meth:`state_dict`.

        Raises:
            ValueError: If an entry is missing or negative.
            TypeError: If ``state`` is not a dict or an entry is not an int.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("epoch", "batches") if k not in state]
        if missing:
            raise ValueError(f"data position state lacks {missing}")
        self.epoch = _check_int(state["epoch"], "state['epoch']")
        self.batches = _check_int(state["batches"], "state['batches']")


# --------------------------------------------------------------------------- training state

# Restore order: the scheduler after the optimizer whose learning rates it steers, and the
# RNG last so that nothing run while loading (a load_state_dict that draws a number) can
# leave the generators anywhere but where the checkpoint had them.
_OBJECT_PARTS = ("model", "optimizer", "scheduler", "scaler")
_PARTS = _OBJECT_PARTS + ("data", "extra", "rng")


def _check_stateful(obj: Any, name: str) -> None:
    if isinstance(obj, type) or not isinstance(obj, Stateful):
        hint = ""
        if isinstance(obj, torch.utils.data.DataLoader):
            hint = (
                "; a torch DataLoader keeps no state: pass its ResumableSampler, a DataPosition, "
                "or use torchdata's StatefulDataLoader"
            )
        raise TypeError(
            f"{name} must have state_dict() and load_state_dict() methods, got "
            f"{type(obj).__module__}.{type(obj).__qualname__}{hint}"
        )


class TrainingState:
    """Everything a resumed run needs, gathered from live objects.

    Keep one ``TrainingState`` over the objects of a run; update :attr:`step` and
    :attr:`epoch` as training goes (or pass them to :meth:`state_dict`).
    :meth:`state_dict` returns, like torch's, references to live tensors: store it (or copy
    it) before training goes on.

    Args:
        model: The model (``nn.Module``, or anything :class:`Stateful`).
        optimizer: The optimizer.
        scheduler: The learning-rate scheduler.
        scaler: The gradient scaler (``torch.amp.GradScaler``).
        data: The data position: one :class:`Stateful` (:class:`ResumableSampler`,
            :class:`DataPosition`, torchdata's ``StatefulDataLoader``, a user's loader), or
            a dict of them by name.
        step: The optimizer steps taken so far.
        epoch: The current epoch.
        extra: Plain storable values to get back (config, best metric, ...). They are
            restored into :attr:`extra` even when it was not given here.
        rng: Capture and restore the global generators (python, numpy, torch, CUDA).

    Raises:
        TypeError: If a part lacks ``state_dict``/``load_state_dict`` (naming it), ``extra``
            is not a dict, or ``step``/``epoch`` are not ints.
        ValueError: If ``step`` or ``epoch`` is negative.
    """

    def __init__(
        self,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        data: Any = None,
        step: int = 0,
        epoch: int = 0,
        extra: dict[str, Any] | None = None,
        rng: bool = True,
    ) -> None:
        for name, obj in (
            ("model", model),
            ("optimizer", optimizer),
            ("scheduler", scheduler),
            ("scaler", scaler),
        ):
            if obj is not None:
                _check_stateful(obj, name)
        if isinstance(data, Mapping):
            for key, obj in data.items():
                if not isinstance(key, str):
                    raise TypeError(f"data keys must be str, got {key!r}")
                _check_stateful(obj, f"data[{key!r}]")
            data = dict(data)
        elif data is not None:
            _check_stateful(data, "data")
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict of storable values, got {type(extra).__name__}")
        if not isinstance(rng, bool):
            raise TypeError(f"rng must be a bool, got {rng!r}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.data = data
        self.step = _check_int(step, "step")
        self.epoch = _check_int(epoch, "epoch")
        self.extra = extra
        self.rng = rng

    def __repr__(self) -> str:
        parts = [p for p in _PARTS if self._has(p)]
        return f"TrainingState(step={self.step}, epoch={self.epoch}, parts={parts})"

    def _has(self, part: str) -> bool:
        if part == "rng":
            return self.rng
        return getattr(self, part) is not None

    def state_dict(self, step: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Gather the state of every part.

        Args:
            step: If given, becomes :attr:`step` first.
            epoch: If given, becomes :attr:`epoch` first.

        Returns:
            ``{"format", "version", "step", "epoch", "model", "optimizer", "scheduler",
            "scaler", "data", "rng", "extra"}``, parts this state was not given left out.
        """
        if step is not None:
            self.step = _check_int(step, "step")
        if epoch is not None:
            self.epoch = _check_int(epoch, "epoch")
        state: dict[str, Any] = {
            "format": TRAINING_STATE_FORMAT,
            "version": TRAINING_STATE_VERSION,
            "step": self.step,
            "epoch": self.epoch,
        }
        for part in _OBJECT_PARTS:
            obj = getattr(self, part)
            if obj is not None:
                state[part] = obj.state_dict()
        if isinstance(self.data, dict):
            state["data"] = {name: obj.state_dict() for name, obj in self.data.items()}
        elif self.data is not None:
            state["data"] = self.data.state_dict()
        if self.rng:
            state["rng"] = capture_rng()
        if self.extra is not None:
            # A copy: the checkpoint must hold the values of now, not of when it is written.
            state["extra"] = copy.deepcopy(self.extra)
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore every part present into the live objects; the RNG last.

        Args:
            state: A dict from :meth:`state_dict` (typically after ``lctriton.load``).
            strict: Raise when a part is in the checkpoint but not in this state, or the
                other way round (``extra`` excepted: it needs no live object), and load the
                model strictly. When False such parts are skipped with a warning.

        Parts missing on either side are found before anything is restored; an error
        inside a part's own ``load_state_dict`` leaves the parts before it restored.

        Raises:
            TypeError: If ``state`` is not a dict.
            ValueError: If ``state`` is not a training state of a known version, or (strict)
                a part is missing on either side (naming it).
            Exception: Whatever a part's own ``load_state_dict`` raises, with a note naming
                the part (Python 3.11+; logged before on 3.10).
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a dict from TrainingState.state_dict(), got {type(state).__name__}"
            )
        if state.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(
                f"state['format'] is {state.get('format')!r}, expected {TRAINING_STATE_FORMAT!r}: "
                "not a TrainingState checkpoint"
            )
        version = state.get("version")
        if not _is_int(version) or not 1 <= version <= TRAINING_STATE_VERSION:
            raise ValueError(
                f"state['version'] is {version!r}; this lctriton reads versions 1 "
                f"to {TRAINING_STATE_VERSION}"
            )
        step = _check_int(state.get("step"), "state['step']")
        epoch = _check_int(state.get("epoch"), "state['epoch']")
        unknown = sorted(
            str(k) for k in state if k not in _PARTS + ("format", "version", "step", "epoch")
        )
        if unknown:
            logger.warning("ignoring unknown training-state entries %s", unknown)

        # Check both sides before touching anything, so a mismatch leaves every object as it was.
        plan = []
        for part in _PARTS:
            saved, live = part in state, self._has(part)
            if part == "extra":
                live = live or saved
            if saved and live:
                plan.append(part)
            elif saved or live:
                where = "the checkpoint has no" if live else "this TrainingState was given no"
                message = f"{where} {part!r} part"
                if strict:
                    raise ValueError(f"{message} (pass strict=False to skip it)")
                logger.warning("%s; skipping it", message)
        data_names = []
        if "data" in plan and isinstance(self.data, dict):
            saved = state["data"]
            if not isinstance(saved, Mapping):
                raise ValueError(
                    "state['data'] must be a dict of named data states, "
                    "as this TrainingState's data is"
                )
            for name in sorted(set(saved) | set(self.data)):
                if name in saved and name in self.data:
                    data_names.append(name)
                    continue
                where = (
                    "the checkpoint has no"
                    if name in self.data
                    else "this TrainingState was given no"
                )
                message = f"{where} data[{name!r}] part"
                if strict:
                    raise ValueError(f"{message} (pass strict=False to skip it)")
                logger.warning("%s; skipping it", message)

        for part in plan:
            try:
                if part == "model" and isinstance(self.model, torch.nn.Module):
                    result = self.model.load_state_dict(state["model"], strict=strict)
                    # Only non-strict loading gets here with keys left over.
                    if result.missing_keys or result.unexpected_keys:
                        logger.warning(
                            "model state: missing keys %s, unexpected keys %s",
                            result.missing_keys,
                            result.unexpected_keys,
                        )
                elif part in _OBJECT_PARTS:
                    getattr(self, part).load_state_dict(state[part])
                elif part == "data" and isinstance(self.data, dict):
                    for name in data_names:
                        self.data[name].load_state_dict(state["data"][name])
                elif part == "data":
                    self.data.load_state_dict(state["data"])
                elif part == "extra":
                    self._load_extra(state["extra"])
                else:
                    restore_rng(state["rng"])
            except Exception as exc:
                note = f"while restoring the {part!r} part of a training state"
                if hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note(note)
                else:
                    logger.error("%s", note)
                raise
        self.step, self.epoch = step, epoch

    def _load_extra(self, saved: Any) -> None:
        if not isinstance(saved, dict):
            raise ValueError(f"state['extra'] must be a dict, got {type(saved).__name__}")
        if self.extra is None:
            self.extra = dict(saved)
        else:
            # In place: the caller may hold the dict it passed in.
            self.extra.clear()
            self.extra.update(saved)
