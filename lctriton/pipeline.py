"""Encoding and decoding of whole training states, built from the codec passes.

A state is any nesting of dicts, lists and tuples over tensors and plain values: a
``model.state_dict()``, an ``optimizer.state_dict()``, or a dict of several plus extras.
Its structure is stored as a tree of typed JSON nodes; tensors are stored in sections,
each coded by the codec chosen for it (see :mod:`lctriton.codecs`). Tensors are matched to
their base by their dotted name ("model.fc.weight", "optimizer.state.0.exp_avg").

Tree nodes (``"t"`` is the type)::

    {"t": "none"} | {"t": "bool", "v": b} | {"t": "int", "v": i} | {"t": "float", "v": hex}
    {"t": "str", "v": s} | {"t": "bytes", "v": base64}
    {"t": "list" | "tuple", "v": [node, ...]} | {"t": "size", "v": [int, ...]}
    {"t": "dict" | "odict", "v": [[key node, node], ...]}
    {"t": "tensor", "i": k} | {"t": "ndarray", "i": k} | {"t": "dtype", "v": name}

A tensor that appears several times (tied weights) is stored once and restored shared.
"""

from __future__ import annotations

import base64
import collections
import fnmatch
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from lctriton import backend, codecs
from lctriton.config import MOMENT_PATTERNS, CodecOptions
from lctriton.errors import BaseMismatchError, FormatError
from lctriton.format import Container
from lctriton.kernels import reference

__all__ = [
    "EncodedState",
    "encode_state",
    "encode_states",
    "decode_state",
    "flatten_tensors",
    "iter_tensors",
    "tensor_names",
    "moment_decay",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_MAX_DEPTH = 100
#: Threads that code CPU tensors concurrently; numpy releases the GIL in its loops.
THREADS_ENV = "LCTRITON_THREADS"


def cpu_threads() -> int:
    """Threads for CPU coding: ``LCTRITON_THREADS``, else the CPU count (at most 8)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}") from None
        if n < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        return n
    return max(1, min(8, os.cpu_count() or 1))


def _balanced_groups(sizes: list[int], groups: int) -> list[list[int]]:
    """Indices split into ``groups`` lists of similar total size (largest first, greedy)."""
    bins: list[list[int]] = [[] for _ in range(groups)]
    load = [0] * groups
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += sizes[i]
    return [b for b in bins if b]


class EncodedState:
    """The output of :func:`encode_state`: an index and the sections of a container.

    Attributes:
        index: JSON-ready index without its section table.
        sections: Payload parts of each section (one section per stored tensor).
        reconstruction: The state a decoder restores, when it was asked for.
        raw_nbytes: Bytes of all tensors as stored in memory.
    """

    def __init__(self, index, sections, reconstruction, raw_nbytes, pending=()):
        self.index = index
        self.sections = sections
        self.reconstruction = reconstruction
        self.raw_nbytes = raw_nbytes
        self._pending = list(pending)

    def wait_ready(self) -> None:
        """Block until every section's bytes are on the host (GPU copies run async)."""
        for encoded in self._pending:
            encoded.wait_ready()
        self._pending = []


# --------------------------------------------------------------------------- tree


def _path_name(path: tuple) -> str:
    return ".".join(str(k) for k in path)


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.kinds: list[str] = []
        self._seen: dict[tuple, int] = {}

    def _tensor_key(self, t: torch.Tensor, kind: str) -> tuple:
        return (
            kind,
            t.device.type,
            t.device.index,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )

    def node(self, obj: Any, path: tuple, depth: int = 0) -> dict:
        if depth > _MAX_DEPTH:
            raise ValueError(f"state is nested deeper than {_MAX_DEPTH} levels at {_path_name(path)!r}")
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, (bool, np.bool_)):
            return {"t": "bool", "v": bool(obj)}
        if isinstance(obj, (int, np.integer)):
            return {"t": "int", "v": int(obj)}
        if isinstance(obj, (float, np.floating)):
            return {"t": "float", "v": float(obj).hex()}
        if isinstance(obj, str):
            return {"t": "str", "v": obj}
        if isinstance(obj, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            if obj not in codecs.DTYPE_NAMES:
                raise TypeError(f"cannot store dtype {obj} at {_path_name(path)!r}")
            return {"t": "dtype", "v": codecs.DTYPE_NAMES[obj]}
        if isinstance(obj, torch.Size):
            if any(d < 0 for d in obj):
                raise ValueError(f"torch.Size {tuple(obj)} at {_path_name(path)!r} has a negative dimension")
            return {"t": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, torch.Tensor):
            return {"t": "tensor", "i": self._add(obj, path, "tensor")}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc":
                raise TypeError(f"cannot store a numpy array of dtype {obj.dtype} at {_path_name(path)!r}")
            return {"t": "ndarray", "i": self._add(torch.from_numpy(np.ascontiguousarray(obj)), path, "ndarray")}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if not _valid_key(k):
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {_path_name(path)!r}")
                items.append([self.node(k, path, depth + 1), self.node(v, path + (k,), depth + 1)])
            return {"t": "odict" if isinstance(obj, collections.OrderedDict) else "dict", "v": items}
        if isinstance(obj, (list, tuple)):
            kind = "list" if isinstance(obj, list) else "tuple"
            return {"t": kind, "v": [self.node(v, path + (i,), depth + 1) for i, v in enumerate(obj)]}
        raise TypeError(
            f"cannot store an object of type {type(obj).__module__}.{type(obj).__qualname__} "
            f"at {_path_name(path) or '<root>'!r}: states hold tensors, numpy arrays, numbers, "
            "strings, bytes, None, and dicts, lists and tuples of them"
        )

    def _add(self, t: torch.Tensor, path: tuple, kind: str) -> int:
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"cannot store a tensor with layout {t.layout} at {_path_name(path)!r}")
        if t.dtype not in codecs.DTYPE_NAMES:
            raise TypeError(f"cannot store a tensor of dtype {t.dtype} at {_path_name(path)!r}")
        if t.device.type == "meta":
            raise ValueError(f"tensor at {_path_name(path)!r} is on the meta device and has no data")
        key = self._tensor_key(t, kind)
        if t.numel() and key in self._seen:  # empty tensors share no data: never merged
            return self._seen[key]
        self._seen[key] = len(self.tensors)
        self.tensors.append((_path_name(path), t))
        self.kinds.append(kind)
        return len(self.tensors) - 1


def _valid_key(key: Any) -> bool:
    """Dict keys a file can hold: None, bool, int, float, str, and tuples of these."""
    if isinstance(key, tuple):  # plain tuples only: a torch.Size key would become a "size" node
        return type(key) is tuple and all(_valid_key(k) for k in key)
    return isinstance(key, (str, int, float, bool, type(None)))


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a state (dicts, lists and tuples walked depth first)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def flatten_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a state by dotted name (first occurrence of shared tensors)."""
    flat = _Flattener()
    flat.node(obj, ())
    return dict(flat.tensors)


def tensor_names(index: dict) -> list[str]:
    """Names of the tensors recorded in a container's index."""
    return [rec.get("name", "?") for rec in index.get("tensors", [])]


# --------------------------------------------------------------------------- encode


def _is_exact(name: str, tensor: torch.Tensor, options: CodecOptions) -> bool:
    if options.lossless or tensor.dtype not in reference.LOSSY_DTYPES:
        return True
    if tensor.numel() < options.min_numel:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in options.exact_patterns)


def _is_moment(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MOMENT_PATTERNS)


#: ``sq/1`` and ``sq/2`` code ``<parameter>.exp_avg`` in units of ``<parameter>.exp_avg_sq``.
_FIRST_MOMENT_SUFFIX = ".exp_avg"
_SECOND_MOMENT_SUFFIX = "_sq"

#: Per moment name: which Adam-style beta decays it when its gradient is zero.
_DECAY_BETA = {"exp_avg": 0, "exp_avg_sq": 1}


def _step_value(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().cpu())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _optimizer_states(obj: Any, path: tuple = (), depth: int = 0) -> Iterator[tuple[tuple, Mapping]]:
    """Every optimizer state dict (``{"state": ..., "param_groups": [...]}``) in a state."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(obj, Mapping):
        if isinstance(obj.get("state"), Mapping) and isinstance(obj.get("param_groups"), (list, tuple)):
            yield path, obj
            return
        for k, v in obj.items():
            yield from _optimizer_states(v, path + (k,), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _optimizer_states(v, path + (i,), depth + 1)


def _lookup(obj: Any, path: tuple) -> Any:
    for key in path:
        if isinstance(obj, Mapping) and key in obj:
            obj = obj[key]
        elif isinstance(obj, (list, tuple)) and isinstance(key, int) and 0 <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def moment_decay(obj: Any, base: Any) -> dict[str, float]:
    """Decay of each Adam moment between ``base`` and ``obj``: ``beta ** K``.

    ``K`` is the difference of the parameter's ``step`` counters and ``beta`` comes from its
    param group's ``betas``: with a zero gradient, Adam's update is exactly that decay, so
    it predicts every element whose parameter was not touched (embedding rows of unseen
    tokens, frozen parts). Moments without the information (other optimizers, missing
    counters) are not listed, which means no decay.

    Args:
        obj: The state being saved.
        base: The state its delta is coded against.

    Returns:
        Dotted tensor name to decay factor.
    """
    scales: dict[str, float] = {}
    if base is None:
        return scales
    for path, opt in _optimizer_states(obj):
        base_opt = _lookup(base, path)
        if not isinstance(base_opt, Mapping) or not isinstance(base_opt.get("state"), Mapping):
            continue
        for group in opt["param_groups"]:
            if not isinstance(group, Mapping):
                continue
            betas = group.get("betas")
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
                continue
            for pid in group.get("params", ()):
                now, before = opt["state"].get(pid), base_opt["state"].get(pid)
                if not isinstance(now, Mapping) or not isinstance(before, Mapping):
                    continue
                k_now, k_before = _step_value(now.get("step")), _step_value(before.get("step"))
                if k_now is None or k_before is None or k_now < k_before:
                    continue
                steps = int(round(k_now - k_before))
                for moment, which in _DECAY_BETA.items():
                    beta = betas[which]
                    if isinstance(beta, torch.Tensor):
                        beta = float(beta)
                    if isinstance(beta, (int, float)) and 0.0 < beta <= 1.0:
                        scales[_path_name(path + ("state", pid, moment))] = float(beta) ** steps
    return scales


#: Names of the buffers torch's own modules keep beside parameters of the same shape
#: (normalization statistics): never matched to a parameter's moments.
_BUFFER_NAMES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def parameter_moments(state: Any) -> dict[str, tuple[str, str]]:
    """Dotted name of each model parameter -> the dotted names of its Adam moments
    (``exp_avg``, ``exp_avg_sq``) in the same state.

    An optimizer state dict numbers its parameters in ``param_groups`` order; they are the
    parameters of the model state dict beside it (its one sibling mapping of tensors, such as
    ``state["model"]`` beside ``state["optimizer"]``), in order, with buffers in between. A
    floating tensor of the model takes the next number whose ``exp_avg`` has its shape; one
    that does not fit, or is named like a normalization layer's statistics
    (``running_mean``, ``running_var``), is a buffer and is passed over. Matching stops at a number without
    moments (a parameter the optimizer has not stepped yet), whose shape says nothing. A
    wrong match costs only compression: ``lc/3`` is chosen by measured size, and its record
    names the tensors it used.
    """
    found: dict[str, tuple[str, str]] = {}
    for path, opt in _optimizer_states(state):
        if not path:
            continue
        parent = _lookup(state, path[:-1])
        models = [
            (key, value) for key, value in parent.items()
            if key != path[-1] and isinstance(value, Mapping) and value
            and all(isinstance(t, torch.Tensor) for t in value.values())
        ] if isinstance(parent, Mapping) else []
        if len(models) != 1:
            continue
        model_key, model = models[0]
        numbers = [pid for group in opt["param_groups"] if isinstance(group, Mapping) for pid in group.get("params", ())]
        j = 0
        for key, tensor in model.items():
            if j >= len(numbers):
                break
            moments = opt["state"].get(numbers[j])
            if not isinstance(moments, Mapping):
                break
            first, second = moments.get("exp_avg"), moments.get("exp_avg_sq")
            if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
                break
            if (
                not tensor.is_floating_point()
                or tuple(tensor.shape) != tuple(first.shape)
                or str(key).rsplit(".", 1)[-1] in _BUFFER_NAMES
            ):
                continue
            found[_path_name(path[:-1] + (model_key, key))] = (
                _path_name(path + ("state", numbers[j], "exp_avg")),
                _path_name(path + ("state", numbers[j], "exp_avg_sq")),
            )
            j += 1
    return found


def _encode_exact(
    tensor: torch.Tensor,
    base: torch.Tensor | None,
    options: CodecOptions,
    fingerprint: Callable[[torch.Tensor], str] = codecs.base_fingerprint,
) -> codecs.EncodedTensor:
    if options.code_exact and tensor.numel() >= options.min_numel:
        return codecs.encode_bp(tensor, base, options.chunk_symbols, fingerprint)
    return codecs.encode_raw(tensor)


def encode_state(
    obj: Any,
    base: Any,
    options: CodecOptions,
    reconstruct: bool = False,
    progress: Progress | None = None,
) -> EncodedState:
    """Encode a state, each floating tensor against the same-named tensor of ``base``.

    Args:
        obj: The state.
        base: The state the previous checkpoint restores to, or None for a key checkpoint.
        options: Codec options.
        reconstruct: Also return the state a decoder will restore (the next base).
        progress: Called with (bytes done, bytes total) as tensors are encoded.

    Returns:
        The encoded state.

    Raises:
        TypeError: If the state holds something that cannot be stored (naming where).
    """
    return encode_states([(obj, base)], options, reconstruct, progress)[0]


def encode_states(
    items: list[tuple[Any, Any]],
    options: CodecOptions,
    reconstruct: bool = False,
    progress: Progress | None = None,
) -> list[EncodedState]:
    """Encode several independent states at once, as :func:`encode_state` does each.

    The tensors of all states share one pool of threads, largest first, so many small
    states (the chunks of a distributed checkpoint) code as fast as one large state.

    Args:
        items: ``(state, base)`` pairs; each base may be None.
        options: Codec options.
        reconstruct: Also return the state a decoder will restore, per state.
        progress: Called with (bytes done, bytes total) over all states.

    Returns:
        One encoded state per item, in order.

    Raises:
        TypeError: If a state holds something that cannot be stored (naming where).
    """
    flats, trees, bases = [], [], []
    for obj, base in items:
        flat = _Flattener()
        trees.append(flat.node(obj, ()))
        flats.append(flat)
        bases.append(flatten_tensors(base) if base is not None else {})
    jobs = [(k, i) for k, flat in enumerate(flats) for i in range(len(flat.tensors))]
    total = sum(t.numel() * t.element_size() for flat in flats for _, t in flat.tensors)
    done = 0

    decays = [moment_decay(obj, base) for obj, base in items]
    moment_names = [parameter_moments(obj) if base is not None else {} for obj, base in items]
    fingerprint = codecs.FingerprintCache()

    def context_of(k: int, name: str, tensor: torch.Tensor):
        """The base's moments of parameter ``name``, for lc/3; None when the base lacks them."""
        names = moment_names[k].get(name)
        if names is None:
            return None
        pair = tuple((n, bases[k].get(n)) for n in names)
        if all(t is not None and t.is_floating_point() and t.numel() == tensor.numel() for _, t in pair):
            return pair
        return None

    def scaled_context(k: int, name: str, b: torch.Tensor):
        """The base's moments of the parameter whose first moment ``name`` is (its base ``b``
        and the base's second moment beside it), for sq/2; None when the base lacks them."""
        second_name = name + _SECOND_MOMENT_SUFFIX
        second = bases[k].get(second_name)
        if second is None or not second.is_floating_point() or second.numel() != b.numel():
            return None
        return (name, b), (second_name, second)

    positions = [{name: i for i, (name, _) in enumerate(flat.tensors)} for flat in flats]

    def norm_job(job: tuple[int, int]) -> tuple[int, int] | None:
        """For a first moment that sq/1 or sq/2 codes, the job of its second moment (Adam's
        ``exp_avg_sq`` beside it in the same state), whose reconstruction it is coded against;
        None for every other tensor. A first moment without a float32 second moment beside it
        (SGD's momentum, other dtypes) or without a base is coded as ``"log"`` says."""
        k, i = job
        name, tensor = flats[k].tensors[i]
        if not (_is_moment(name) and options.moment_mode(name) == "scaled" and name.endswith(_FIRST_MOMENT_SUFFIX)):
            return None
        b = bases[k].get(name)
        if tensor.dtype != torch.float32 or b is None or b.shape != tensor.shape or b.dtype != tensor.dtype:
            return None
        j = positions[k].get(name + _SECOND_MOMENT_SUFFIX)
        if j is None or _is_exact(name, tensor, options):
            return None
        norm = flats[k].tensors[j][1]
        return (k, j) if norm.dtype == torch.float32 and norm.numel() == tensor.numel() else None

    norms = {job: found for job in jobs if (found := norm_job(job)) is not None}

    def encode_one(job: tuple[int, int], norm: tuple[str, torch.Tensor] | None = None) -> codecs.EncodedTensor:
        """Code one tensor; its reconstruction is always set (``encode_unit`` drops it).
        ``norm``: for an sq/1 or sq/2 first moment, its second moment's name and reconstruction."""
        k, i = job
        name, tensor = flats[k].tensors[i]
        b = bases[k].get(name)
        if b is not None and (b.shape != tensor.shape or b.dtype != tensor.dtype):
            logger.info("base tensor %r differs in shape or dtype; storing a key for it", name)
            b = None
        mode = options.moment_mode(name) if _is_moment(name) else None
        moment = mode is not None and mode != "lossy"
        exact = _is_exact(name, tensor, options) or mode == "exact"
        if not exact and b is None and options.lossless_key:
            exact = True
        if exact:
            encoded = _encode_exact(tensor, b, options, fingerprint)
            encoded.reconstruction = tensor.detach().clone() if reconstruct else tensor.detach()
            return encoded
        if norm is not None:
            encoded = codecs.encode_sq(
                tensor, b, norm, decays[k].get(name, 1.0), options.scaled_precision, options.chunk_symbols,
                fingerprint, scaled_context(k, name, b), options.coder,
            )
        elif moment:
            encoded = codecs.encode_lq(
                tensor, b, decays[k].get(name, 1.0), options.moment_precision, options.chunk_symbols,
                predict_only=mode == "predict" and b is not None,
                coder=options.coder,
                fingerprint=fingerprint,
            )
        else:
            context = context_of(k, name, tensor) if b is not None else None
            encoded = codecs.encode_lc(
                tensor, b, options.bits, options.chunk_symbols, options.coder, context, fingerprint,
                options.delta_floor,
            )
        encoded.reconstruction = encoded.reconstruction.to(tensor.device)
        return encoded

    def numel(job: tuple[int, int]) -> int:
        return flats[job[0]].tensors[job[1]][1].numel()

    # An sq/1 or sq/2 first moment needs its second moment's reconstruction: the two are one
    # unit of work, coded in that order by one thread (so the reconstruction is dropped at once).
    units = [[job] for job in jobs if job not in norms]
    unit_of = {unit[0]: unit for unit in units}
    for job in jobs:
        if job in norms:
            unit_of[norms[job]].append(job)
    units.sort(key=lambda unit: -sum(numel(job) for job in unit))

    def encode_unit(unit: list[tuple[int, int]]) -> list[codecs.EncodedTensor]:
        first = encode_one(unit[0])
        norm = flats[unit[0][0]].tensors[unit[0][1]][0], first.reconstruction
        coded = [first] + [encode_one(job, norm) for job in unit[1:]]
        if not reconstruct:
            for encoded in coded:
                encoded.reconstruction = None
        return coded

    on_cpu = all(t.device.type == "cpu" for flat in flats for _, t in flat.tensors)
    threads = min(cpu_threads(), len(units)) if on_cpu and backend.threads_allowed("cpu") else 1
    results: dict[tuple[int, int], codecs.EncodedTensor] = {}
    with ThreadPoolExecutor(threads) if threads > 1 else _Inline() as pool:
        for unit, encoded in zip(units, pool.map(encode_unit, units), strict=True):
            for job, one in zip(unit, encoded, strict=True):
                results[job] = one
                tensor = flats[job[0]].tensors[job[1]][1]
                done += tensor.numel() * tensor.element_size()
                if progress is not None:
                    progress(done, total)
    out = []
    for k, flat in enumerate(flats):
        records, sections, recon_tensors, pending = [], [], [], []
        for i, ((name, _), kind) in enumerate(zip(flat.tensors, flat.kinds, strict=True)):
            encoded = results[(k, i)]
            encoded.record["name"] = name
            encoded.record["kind"] = kind
            encoded.record["section"] = len(sections)
            records.append(encoded.record)
            sections.append(encoded.parts)
            recon_tensors.append(encoded.reconstruction)
            if encoded.ready is not None:
                pending.append(encoded)
        index = {"format": "lctriton", "tree": trees[k], "tensors": records}
        reconstruction = (
            _rebuild(trees[k], [_as_kind(t, kd) for t, kd in zip(recon_tensors, flat.kinds, strict=True)])
            if reconstruct
            else None
        )
        raw = sum(t.numel() * t.element_size() for _, t in flat.tensors)
        out.append(EncodedState(index, sections, reconstruction, raw, pending))
    return out


class _Inline:
    """A stand-in for a thread pool that runs everything in the calling thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, items):
        return map(fn, items)


def _as_kind(t: torch.Tensor | None, kind: str) -> Any:
    if t is None or kind == "tensor":
        return t
    return t.cpu().numpy()


# --------------------------------------------------------------------------- decode


def _rebuild(node: Any, tensors: list[Any], depth: int = 0) -> Any:
    """Rebuild the state from a validated tree."""
    t = node["t"]
    if t == "none":
        return None
    if t in ("bool", "int", "str"):
        return node["v"]
    if t == "float":
        return float.fromhex(node["v"])
    if t == "bytes":
        return base64.b64decode(node["v"])
    if t == "dtype":
        return codecs.DTYPES[node["v"]]
    if t == "size":
        return torch.Size(node["v"])
    if t in ("tensor", "ndarray"):
        return tensors[node["i"]]
    if t in ("list", "tuple"):
        items = [_rebuild(v, tensors, depth + 1) for v in node["v"]]
        return items if t == "list" else tuple(items)
    out = collections.OrderedDict() if t == "odict" else {}
    for k, v in node["v"]:
        out[_rebuild(k, tensors, depth + 1)] = _rebuild(v, tensors, depth + 1)
    return out


_SCALARS = {"bool": bool, "int": int, "str": str}


def _validate_tree(node: Any, ntensors: int, kinds: list[str], depth: int = 0, key: bool = False) -> None:
    """Check a tree read from a file so that :func:`_rebuild` cannot fail or misbehave."""
    if depth > _MAX_DEPTH:
        raise FormatError(f"state tree is nested deeper than {_MAX_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise FormatError(f"state tree node {str(node)[:60]!r} is not a typed object")
    t = node["t"]
    v = node.get("v")
    if t == "none":
        return
    if t in _SCALARS:
        ok = isinstance(v, _SCALARS[t]) and (t == "bool" or not isinstance(v, bool))
        if not ok:
            raise FormatError(f"state tree node of type {t!r} holds {v!r}")
        return
    if t == "float":
        try:
            float.fromhex(v)
        except (TypeError, ValueError, OverflowError):
            raise FormatError(f"state tree float {v!r} is not a hexadecimal float") from None
        return
    if key:
        if t == "tuple" and isinstance(v, list):
            for item in v:
                _validate_tree(item, ntensors, kinds, depth + 1, key=True)
            return
        raise FormatError(f"state tree dict key of type {t!r} is not allowed")
    if t == "bytes":
        try:
            base64.b64decode(v, validate=True)
        except (TypeError, ValueError):
            raise FormatError("state tree bytes node is not base64") from None
    elif t == "dtype":
        if not isinstance(v, str) or v not in codecs.DTYPES:
            raise FormatError(f"state tree dtype {v!r} is unknown")
    elif t == "size":
        if not isinstance(v, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in v
        ):
            raise FormatError("state tree size node is not a list of int64 dimensions")
    elif t in ("tensor", "ndarray"):
        i = node.get("i")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < ntensors:
            raise FormatError(f"state tree refers to tensor {i!r}, but {ntensors} are stored")
        if kinds[i] != t:
            raise FormatError(f"state tree node {t!r} refers to a stored {kinds[i]!r}")
    elif t in ("list", "tuple"):
        if not isinstance(v, list):
            raise FormatError(f"state tree {t} node does not hold a list")
        for item in v:
            _validate_tree(item, ntensors, kinds, depth + 1)
    elif t in ("dict", "odict"):
        if not isinstance(v, list):
            raise FormatError(f"state tree {t} node does not hold a list of pairs")
        for pair in v:
            if not isinstance(pair, list) or len(pair) != 2:
                raise FormatError(f"state tree {t} entry is not a [key, value] pair")
            _validate_tree(pair[0], ntensors, kinds, depth + 1, key=True)
            _validate_tree(pair[1], ntensors, kinds, depth + 1)
    else:
        raise FormatError(f"state tree node type {t!r} is unknown")


def validate_index(index: dict) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
    """Check the state parts of an index; return dtype, shape and size of each tensor.

    Raises:
        FormatError: Naming what is wrong.
    """
    if index.get("format") != "lctriton":
        raise FormatError("the index does not describe an lctriton state")
    records = index.get("tensors")
    if not isinstance(records, list):
        raise FormatError("the index has no tensor list")
    nsections = len(index["sections"])
    shapes, kinds, used = [], [], set()
    for i, rec in enumerate(records):
        name = rec.get("name") if isinstance(rec, dict) else None
        if not isinstance(name, str):
            raise FormatError(f"tensor record {i} has no name")
        shapes.append(codecs.validate_record(rec, name))
        section = rec.get("section")
        if isinstance(section, bool) or not isinstance(section, int) or not 0 <= section < nsections:
            raise FormatError(f"tensor {name!r} refers to section {section!r}, but {nsections} exist")
        if section in used:
            raise FormatError(f"tensor {name!r} refers to section {section}, which another tensor uses")
        used.add(section)
        if rec.get("kind") not in ("tensor", "ndarray"):
            raise FormatError(f"tensor {name!r} has unknown kind {rec.get('kind')!r}")
        if rec["kind"] == "ndarray" and rec["dtype"] == "bfloat16":
            raise FormatError(f"tensor {name!r}: numpy has no bfloat16, so it cannot be an ndarray")
        kinds.append(rec["kind"])
    if len(used) != nsections:
        raise FormatError(f"{nsections - len(used)} section(s) belong to no tensor")
    _validate_tree(index.get("tree"), len(records), kinds)
    return shapes


def _part(view: memoryview, layout: list, name: str, part: str, dtype: np.dtype) -> np.ndarray:
    for pname, offset, size in layout:
        if pname == part:
            return np.frombuffer(view, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    raise AssertionError(part)  # layout always lists every part of its codec


def _checked_base(
    rec: dict,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    base_tensors: dict[str, torch.Tensor],
    fingerprint: Callable[[torch.Tensor], str],
) -> torch.Tensor | None:
    """The base a record was coded against, checked by its fingerprint."""
    if rec["base"] is None:
        return None
    b = base_tensors.get(name)
    if b is None:
        raise BaseMismatchError(
            f"tensor {name!r} is a delta against base {rec['base']}; pass the state the "
            "previous checkpoint restores to as base="
        )
    if tuple(b.shape) != shape or b.dtype != dtype:
        raise BaseMismatchError(
            f"tensor {name!r}: the base given is {tuple(b.shape)} {b.dtype}, the delta needs {shape} {dtype}"
        )
    found = fingerprint(b)
    if found != rec["base"]:
        raise BaseMismatchError(
            f"tensor {name!r} was coded against base {rec['base']} but the base given is {found}: "
            "it is not the state the previous checkpoint restores to"
        )
    return b


def _apply_exceptions(out: torch.Tensor, exc_index: np.ndarray, exc_values: np.ndarray, dtype: torch.dtype) -> None:
    if exc_index.size:
        values = torch.frombuffer(bytearray(exc_values.tobytes()), dtype=dtype)
        out[torch.from_numpy(exc_index.copy()).to(out.device)] = values.to(out.device)


def _reconstruct(rec, sym, reps, b, dtype, device, norm):
    """A lossy record's values from its symbols, before exceptions, on ``device``: ``sq``
    levels in units of the decoded ``norm()``, ``lq`` bins against the decayed base, ``lc``
    representatives added to the base (or alone without one)."""
    flat_base = None if b is None else b.reshape(-1)
    if rec["codec"] in codecs.SCALED_CODECS:
        scale = float(np.uint32(rec["scale"]).view(np.float32))
        out = backend.sq_reconstruct(sym, rec["reach"], rec["precision"], flat_base.to(device), scale, norm())
    elif rec["codec"] in (codecs.LQ, codecs.LQ2):
        scale = float(np.uint32(rec["scale"]).view(np.float32))
        out = backend.lq_reconstruct(sym, reps.to(device), flat_base, scale, dtype)
    else:
        out = backend.lc_reconstruct(sym, reps.to(device), flat_base, dtype)
    return out.to(device)


def _symbol_finisher(rec, numel, dtype, reps, b, dev, exc_index, exc_values, norm=None):
    """What turns an lc/2, lq/1 or sq/1 record's symbols into its tensor (``norm``: for sq/1,
    returns its second moment, decoded before it)."""

    def finish(symbols: list[torch.Tensor]) -> torch.Tensor:
        device = torch.device(dev)
        if symbols:
            sym = symbols[0].to(device)
        else:
            sym = torch.full((numel,), rec["fill"], dtype=torch.uint8, device=device)
        out = _reconstruct(rec, sym, reps, b, dtype, device, norm)
        _apply_exceptions(out, exc_index, exc_values, dtype)
        return out

    return finish


def _context_of(
    rec: dict,
    name: str,
    numel: int,
    base_tensors: dict[str, torch.Tensor],
    b: torch.Tensor,
    dev: str,
    fingerprint: Callable[[torch.Tensor], str],
    computed: tuple[torch.Tensor, list[int]] | None = None,
) -> torch.Tensor:
    """The contexts of an lc/3 or sq/2 record's elements, from the base's moments it names
    (checked against their fingerprints), or of an lq/2 record's, from its own base ``b`` (checked
    already); then checked against the record's context counts. ``computed``: the contexts
    and their counts, computed ahead from the same tensors (:func:`_prefetch_base_work`); the
    checks run all the same."""
    if rec["codec"] == codecs.LQ2:
        contexts = computed[0] if computed else backend.binade_contexts(b, rec["offset"])
    else:
        moments = _context_moments(rec, name, numel, base_tensors, dev, fingerprint)
        contexts = computed[0] if computed else backend.moment_contexts(*moments)
    counts = computed[1] if computed else backend.context_counts(contexts).cpu().tolist()
    tables = rec["tables"]
    if counts[: len(tables)] != [table["count"] for table in tables] or any(counts[len(tables) :]):
        raise FormatError(f"tensor {name!r}: its context tables do not count the base's contexts")
    return contexts


def _context_moments(
    rec: dict,
    name: str,
    numel: int,
    base_tensors: dict[str, torch.Tensor],
    dev: str,
    fingerprint: Callable[[torch.Tensor], str],
) -> list[torch.Tensor]:
    """The base's moments an lc/3 or sq/2 record names, checked against their fingerprints."""
    moments = []
    for ref in rec["context"]:
        t = base_tensors.get(ref["name"])
        if t is None:
            raise BaseMismatchError(
                f"tensor {name!r} is coded by the base's optimizer moment {ref['name']!r}, which the base given lacks"
            )
        found = fingerprint(t)
        if found != ref["base"]:
            raise BaseMismatchError(
                f"tensor {name!r} was coded by base moment {ref['name']!r} {ref['base']} but the base given has {found}"
            )
        if not t.is_floating_point() or t.numel() != numel:
            raise FormatError(f"tensor {name!r}: its context {ref['name']!r} is not a floating tensor of {numel} elements")
        moments.append(t.to(dev))
    return moments


def _norm_index(
    rec: dict, name: str, numel: int, records: list[dict], shapes: list[tuple], positions: dict[str, int]
) -> int:
    """The index of the record an sq/1 or sq/2 record names as its second moment: another
    float32 tensor of as many elements, itself neither (so that every norm is decoded first)."""
    j = positions.get(rec["norm"])
    if j is None:
        raise FormatError(f"tensor {name!r} is coded against tensor {rec['norm']!r}, which the file lacks")
    dtype, _, count = shapes[j]
    if dtype != torch.float32 or count != numel or records[j]["codec"] in codecs.SCALED_CODECS:
        raise FormatError(
            f"tensor {name!r}: its norm {rec['norm']!r} is not a float32 tensor of {numel} elements coded before it"
        )
    return j


def _context_finisher(rec, numel, dtype, reps, b, dev, contexts, exc_index, exc_values, norm=None):
    """What turns an lc/3, lq/2 or sq/2 record's per-context symbols into its tensor
    (``norm``: for sq/2, returns its second moment, decoded before it)."""

    def finish(symbols: list[torch.Tensor]) -> torch.Tensor:
        device = torch.device(dev)
        coded = iter(symbols)
        pieces = []
        for table in rec["tables"]:
            if "fill" in table:
                pieces.append(torch.full((table["count"],), table["fill"], dtype=torch.uint8, device=device))
            elif "freqs" in table:
                pieces.append(next(coded).to(device))
        grouped = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=device)
        sym = backend.ungroup_by_context(contexts.to(device), grouped)
        out = _reconstruct(rec, sym, reps, b, dtype, device, norm)
        _apply_exceptions(out, exc_index, exc_values, dtype)
        return out

    return finish


def _plane_finisher(rec, view, layout, name, numel, dtype, b, dev):
    """What turns a bp/1 record's decoded planes into its tensor."""
    raw_planes = {
        j: _part(view, layout, name, f"plane{j}", np.dtype(np.uint8))
        for j, plane in enumerate(rec["planes"]) if "raw" in plane
    }

    def finish(symbols: list[torch.Tensor]) -> torch.Tensor:
        device = torch.device(dev)
        itemsize = len(rec["planes"])
        out = torch.empty((numel, itemsize), dtype=torch.uint8, device=device)
        coded = iter(symbols)
        for j, plane in enumerate(rec["planes"]):
            if "fill" in plane:
                out[:, j] = plane["fill"]
            elif "raw" in plane:
                out[:, j] = torch.from_numpy(raw_planes[j].copy()).to(device)
            else:
                out[:, j] = next(coded).to(device)
        if b is not None:
            out ^= b.reshape(-1).view(torch.uint8).view(numel, itemsize).to(device)
        flat = out.view(-1).view(dtype) if numel else torch.empty(0, dtype=dtype, device=device)
        if dtype == torch.bool and bool((out > 1).any()):
            raise FormatError(f"tensor {name!r}: a bool tensor holds bytes other than 0 and 1")
        return flat

    return finish


def _decode_rans(rans_items, records, finishers) -> list[torch.Tensor]:
    """Decode every rANS stream, grouped by chunk size and device, on a pool of threads."""
    groups: dict[tuple[int, str], list[int]] = {}
    for k, (chunk, _, dev) in enumerate(rans_items):
        groups.setdefault((chunk, dev), []).append(k)
    work = []
    for (chunk, dev), members in groups.items():
        threads = cpu_threads() if dev == "cpu" and backend.threads_allowed(dev) else 1
        parts = _balanced_groups([rans_items[k][1].numel for k in members], threads)
        work.extend((chunk, dev, [members[j] for j in part]) for part in parts)
    owner = {k: i for i, streams, _, _ in finishers for k in streams}

    def decode_group(job):
        chunk, dev, members = job
        try:
            return backend.rans_decode([rans_items[k][1] for k in members], chunk, torch.device(dev))
        except ValueError as exc:
            names = ", ".join(repr(records[owner[k]]["name"]) for k in members[:3])
            raise FormatError(f"corrupt stream among tensors {names}: {exc}") from None

    symbols: list[torch.Tensor | None] = [None] * len(rans_items)
    with ThreadPoolExecutor(len(work)) if len(work) > 1 else _Inline() as pool:
        for (_, _, members), outs in zip(work, pool.map(decode_group, work), strict=True):
            for k, out in zip(members, outs, strict=True):
                symbols[k] = out
    return symbols  # type: ignore[return-value]


def _prefetch_base_work(
    records: list[dict],
    shapes: list[tuple[torch.dtype, tuple[int, ...], int]],
    base_tensors: dict[str, torch.Tensor],
    fingerprint: codecs.FingerprintCache,
) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """Compute, on the CPU coding threads, what the checks in index order need from CPU base
    tensors: the fingerprint of every base tensor the records name (into ``fingerprint``'s
    cache) and the contexts and context counts of every ``lc/3``, ``lq/2`` and ``sq/2`` record.

    The checks stay in the calling thread, in index order, and still raise; they only find
    the work done. Records whose base tensors are missing or do not fit are left to them.

    Returns:
        Record index -> (contexts, counts per context).
    """
    if not (cpu_threads() > 1 and backend.threads_allowed("cpu")):
        return {}

    def on_cpu(t: torch.Tensor | None) -> bool:
        return t is not None and t.device.type == "cpu"

    found: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def contexts_of(i: int, compute: Callable[..., torch.Tensor], *args: Any) -> None:
        contexts = compute(*args)
        found[i] = (contexts, backend.context_counts(contexts).tolist())

    names = {rec["name"] for rec in records if rec.get("base") is not None}
    names |= {ref["name"] for rec in records for ref in rec.get("context") or ()}
    # (elements, job): fingerprints first, then the contexts of lq/2, lc/3 and sq/2 records.
    jobs: list[tuple[int, Callable[[], object]]] = [
        (base_tensors[n].numel(), functools.partial(fingerprint, base_tensors[n]))
        for n in sorted(names) if on_cpu(base_tensors.get(n))
    ]
    for i, (rec, (dtype, shape, numel)) in enumerate(zip(records, shapes, strict=True)):
        if rec["codec"] == codecs.LQ2 and rec["base"] is not None:
            b = base_tensors.get(rec["name"])
            if on_cpu(b) and tuple(b.shape) == shape and b.dtype == dtype:
                jobs.append((numel, functools.partial(contexts_of, i, backend.binade_contexts, b, rec["offset"])))
        elif rec["codec"] in codecs.MOMENT_CONTEXT_CODECS:
            # Decoded where the record's own base lives: only CPU records are computed here.
            own = base_tensors.get(rec["name"]) if rec["base"] is not None else None
            moments = [base_tensors.get(ref["name"]) for ref in rec["context"]]
            if (own is None or on_cpu(own)) and all(
                on_cpu(t) and t.is_floating_point() and t.numel() == numel for t in moments
            ):
                jobs.append((numel, functools.partial(contexts_of, i, backend.moment_contexts, *moments)))

    def run(job: tuple[int, Callable[[], object]]) -> None:
        try:
            job[1]()
        except (TypeError, ValueError, RuntimeError):
            pass  # the check in index order does this again and raises in its turn

    threads = min(cpu_threads(), len(jobs))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            # Largest first, so that the threads finish together.
            list(pool.map(run, sorted(jobs, key=lambda job: -job[0])))
    return found


def decode_state(
    container: Container,
    base: Any = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Any:
    """Decode a container's state.

    Args:
        container: A parsed container.
        base: The state the container's deltas were coded against (its restored form).
        device: Where to put the tensors; by default the base tensor's device for deltas,
            else CPU.
        progress: Called with (bytes done, bytes total).

    Returns:
        The state, with the structure it was saved with.

    Raises:
        BaseMismatchError: If a delta needs a base that is missing or different.
        FormatError: If the container is corrupt (naming the tensor).
    """
    index = container.index
    shapes = validate_index(index)
    records = index["tensors"]
    positions = {rec["name"]: i for i, rec in enumerate(records)}
    base_tensors = flatten_tensors(base) if base is not None else {}
    # A base moment is checked twice: as its own record's base and as a context of its
    # parameter's lc/3 and sq/2 records.
    fingerprint = codecs.FingerprintCache()
    computed_contexts = _prefetch_base_work(records, shapes, base_tensors, fingerprint)
    target = torch.device(device) if device is not None else None
    tensors: list[Any] = [None] * len(records)
    pending: list[tuple[int, reference.LcStream, np.ndarray, np.ndarray]] = []
    total = sum(n * torch.empty(0, dtype=d).element_size() for d, _, n in shapes)
    done = 0
    # rANS streams of every record, decoded together per (chunk size, device), and what
    # turns each record's decoded symbols into its tensor.
    rans_items: list[tuple[int, reference.RansStream, str]] = []
    # (record index, its streams, what turns their symbols into the tensor, its device)
    finishers: list[tuple[int, list[int], Callable[[list[torch.Tensor]], torch.Tensor], str]] = []

    def add_stream(rec: dict, chunk_words: np.ndarray, words: np.ndarray, numel: int, freqs: list[int], dev: str) -> int:
        rans_items.append(
            (rec["chunk"], reference.RansStream(
                torch.from_numpy(words.copy()).view(torch.int16), torch.from_numpy(chunk_words.astype(np.int64)),
                numel, np.array(freqs, dtype=np.int64)), dev)
        )
        return len(rans_items) - 1

    for i, (rec, (dtype, shape, numel)) in enumerate(zip(records, shapes, strict=True)):
        name = rec["name"]
        view = container.section(rec["section"])
        layout = codecs.payload_layout(rec, numel)
        needed = sum(((size + 7) & ~7) for _, _, size in layout)
        if view.nbytes != needed:
            raise FormatError(f"tensor {name!r}: section holds {view.nbytes} bytes, its record needs {needed}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if rec["codec"] == codecs.RAW:
            data = bytearray(view[: numel * itemsize])
            if dtype == torch.bool and data.translate(None, b"\x00\x01"):
                raise FormatError(f"tensor {name!r}: a bool tensor holds bytes other than 0 and 1")
            t = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            tensors[i] = t.reshape(shape)
            done += numel * itemsize
            if progress is not None:
                progress(done, total)
            continue
        b = _checked_base(rec, name, shape, dtype, base_tensors, fingerprint)
        dev = b.device.type if b is not None else "cpu"
        if rec["codec"] == codecs.BP:
            streams = []
            for j, plane in enumerate(rec["planes"]):
                if "freqs" in plane:
                    cw = _part(view, layout, name, f"plane{j}_chunk_words", np.dtype(np.uint32))
                    words = _part(view, layout, name, f"plane{j}_stream", np.dtype(np.uint16))
                    streams.append(add_stream(rec, cw, words, numel, plane["freqs"], dev))
            finishers.append((i, streams, _plane_finisher(rec, view, layout, name, numel, dtype, b, dev), dev))
            continue
        exc_index = _part(view, layout, name, "exc_index", np.dtype(np.int64))
        exc_values = _part(view, layout, name, "exc_values", np.dtype(np.uint8))
        if exc_index.size and (exc_index.min() < 0 or exc_index.max() >= numel):
            raise FormatError(f"tensor {name!r}: exception index out of range")
        if exc_index.size > 1 and not bool((exc_index[1:] > exc_index[:-1]).all()):
            raise FormatError(f"tensor {name!r}: exception indices are not strictly increasing")
        norm = reps = None
        if rec["codec"] in codecs.SCALED_CODECS:
            # The decoded second moment, read when sq records finish (last).
            norm = functools.partial(tensors.__getitem__, _norm_index(rec, name, numel, records, shapes, positions))
        else:
            reps = torch.from_numpy(np.array(rec["reps"], dtype=np.uint32).view(np.float32))
        if rec["codec"] in codecs.CONTEXT_CODECS:
            contexts = _context_of(rec, name, numel, base_tensors, b, dev, fingerprint, computed_contexts.get(i))
            streams = []
            for c, table in enumerate(rec["tables"]):
                if "freqs" in table:
                    cw = _part(view, layout, name, f"context{c}_chunk_words", np.dtype(np.uint32))
                    words = _part(view, layout, name, f"context{c}_stream", np.dtype(np.uint16))
                    streams.append(add_stream(rec, cw, words, table["count"], table["freqs"], dev))
            finishers.append(
                (i, streams, _context_finisher(rec, numel, dtype, reps, b, dev, contexts, exc_index, exc_values, norm),
                 dev)
            )
            continue
        if rec["codec"] in codecs.RANS_CODECS:
            cw = _part(view, layout, name, "chunk_words", np.dtype(np.uint32))
            words = _part(view, layout, name, "stream", np.dtype(np.uint16))
            if rec["fill"] is not None and cw.any():
                raise FormatError(f"tensor {name!r}: a fill must not have a stream")
            streams = [] if rec["fill"] is not None else [add_stream(rec, cw, words, numel, rec["freqs"], dev)]
            finishers.append(
                (i, streams, _symbol_finisher(rec, numel, dtype, reps, b, dev, exc_index, exc_values, norm), dev)
            )
            continue
        chunk_bits = _part(view, layout, name, "chunk_bits", np.dtype(np.uint32)).astype(np.int64)
        stream = _part(view, layout, name, "stream", np.dtype(np.int64))
        lengths = np.array(rec["lengths"], dtype=np.uint8)
        if not lengths.any() and (stream.size or chunk_bits.any()):
            raise FormatError(f"tensor {name!r}: a fill must not have a stream")
        if lengths.any() and int(((chunk_bits + 63) // 64).sum()) != stream.size:
            raise FormatError(f"tensor {name!r}: stream length does not match its chunk table")
        item = reference.LcStream(
            torch.from_numpy(stream.copy()),
            torch.from_numpy(chunk_bits),
            numel,
            lengths,
            rec["fill"],
            reps,
            None if b is None else b.reshape(-1),
            dtype,
        )
        pending.append((i, item, exc_index, exc_values))

    def finished(i: int, out: torch.Tensor) -> None:
        nonlocal done
        dtype, shape, numel = shapes[i]
        tensors[i] = out.reshape(shape)
        done += numel * out.element_size()
        if progress is not None:
            progress(done, total)

    if pending:
        groups: dict[tuple[int, str], list] = {}
        for entry in pending:
            item = entry[1]
            dev = item.base.device.type if item.base is not None else "cpu"
            groups.setdefault((records[entry[0]]["chunk"], dev), []).append(entry)
        work = []
        for (chunk, dev), entries in groups.items():
            threads = cpu_threads() if dev == "cpu" and backend.threads_allowed(dev) else 1
            parts = _balanced_groups([e[1].numel for e in entries], threads)
            work.extend((chunk, dev, [entries[j] for j in part]) for part in parts)

        def decode_group(job):
            chunk, dev, entries = job
            try:
                return backend.lc_decode([e[1] for e in entries], chunk, torch.device(dev))
            except ValueError as exc:
                names = ", ".join(repr(records[e[0]]["name"]) for e in entries[:3])
                raise FormatError(f"corrupt stream among tensors {names}: {exc}") from None

        with ThreadPoolExecutor(len(work)) if len(work) > 1 else _Inline() as pool:
            for (_, _, entries), outs in zip(work, pool.map(decode_group, work), strict=True):
                for (i, _, exc_index, exc_values), out in zip(entries, outs, strict=True):
                    dtype = shapes[i][0]
                    _apply_exceptions(out, exc_index, exc_values, dtype)
                    finished(i, out)
    if finishers:
        symbols = _decode_rans(rans_items, records, finishers)
        # The finishers' passes (ungrouping, reconstruction) run on the CPU threads, largest
        # first; the sq records after all others, since each reads the second moment another
        # record decodes. finished() stays in this thread, in that order.
        on_cpu = all(dev == "cpu" for *_, dev in finishers)
        threads = cpu_threads() if on_cpu and backend.threads_allowed("cpu") else 1

        def finish_one(entry):
            return entry[2]([symbols[k] for k in entry[1]])

        for scaled in (False, True):
            batch = [f for f in finishers if (records[f[0]]["codec"] in codecs.SCALED_CODECS) == scaled]
            batch.sort(key=lambda f: -shapes[f[0]][2])
            with ThreadPoolExecutor(threads) if threads > 1 and len(batch) > 1 else _Inline() as pool:
                for entry, out in zip(batch, pool.map(finish_one, batch), strict=True):
                    finished(entry[0], out)
    for i, rec in enumerate(records):
        t = tensors[i]
        if rec["kind"] == "ndarray":
            tensors[i] = t.cpu().numpy()
            continue
        if target is not None:
            t = t.to(target)
        elif rec["codec"] in codecs.DELTA_CODECS and rec["base"] is not None:
            t = t.to(base_tensors[rec["name"]].device)
        tensors[i] = t
    return _rebuild(index["tree"], tensors)
