"""Looking inside saves without loading them: ``describe`` and ``verify``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from torchkeep.container import open_container
from torchkeep.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format import DTYPE_NAMES, DTYPES
from torchkeep.format.detect import Kind, readable
from torchkeep.legacy import MODEL_KEYS, carries_crcs, load_dcp, load_pickle_file, weights_files
from torchkeep.legacy.sparse_quantized import stored_bytes, tensor_parts
from torchkeep.model import model_summary
from torchkeep.storage import Storage, is_url, storage_for
from torchkeep.tree import decode
from torchkeep.weights import WeightsSource


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor.

    Attributes:
        name: the tensor's dotted name (``model_state_dict.fc.weight``).
        dtype: the stored dtype's name, such as ``F32`` or ``BF16``.
        shape: the tensor's shape.
        nbytes: bytes of data.
        file: where the data lives, for saves of several files: the file's name, or how many
            chunks a tensor saved by several ranks is split into; None for a single file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str | None = None


@dataclass(frozen=True)
class Description:
    """What a save holds.

    Attributes:
        path: the save described.
        format: ``torchkeep file``, ``torchkeep directory`` or ``safetensors`` (foreign file);
            for other sources, what they are, such as ``Hugging Face directory``.
        kind: ``weights``, ``state`` or ``""`` for foreign files.
        format_version: the version of torchkeep's file format, or None for foreign files.
        tensors: every stored tensor, in file order.
        aliases: tied names and the tensor each one shares.
        metadata: the user metadata stored with the save.
        tree: the saved object's skeleton (typed JSON), or None.
        tensor_bytes: bytes of tensor data.
        file_bytes: bytes on disk, headers included.
        created: when the save was written (UTC, ISO 8601), or ``""`` if unknown.
        torch_version: the torch version that wrote the save, or ``""`` if unknown.
        torchkeep_version: the torchkeep version that wrote the save, or ``""`` if unknown.
        checksummed: True when the tensors carry checksums (a torchkeep manifest, or the
            CRC-32s of a ``torch.save`` zip file).
        modules: parameters (elements) per top-level module of the model's weights.
        optimizer: a one-line summary of the optimizer state, if the save holds one.
        model: for a whole model (``save_model``): its class, the recipe that rebuilds it as a
            call, the exported program's inputs, and its architecture (each module's class and
            parameter count); for a converted model, what the conversion changed.
    """

    path: str
    format: str
    kind: str
    format_version: int | None
    tensors: tuple[TensorInfo, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tree: Any = None
    tensor_bytes: int = 0
    file_bytes: int = 0
    created: str = ""
    torch_version: str = ""
    torchkeep_version: str = ""
    checksummed: bool = False
    modules: dict[str, int] = field(default_factory=dict)
    optimizer: str = ""
    model: dict[str, Any] | None = None


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of ``verify``: ``ok`` when every size and checksum matched.

    Attributes:
        path: the save that was checked.
        ok: True when nothing is damaged.
        problems: one message per problem found, each naming the file or tensor.
        tensors: how many tensors were checked (a tensor sharded over ranks counts once).
        tensor_bytes: bytes of tensor data checked.
        checksummed: True when the data was checked against checksums (those of torchkeep
            saves, the CRC-32s of ``torch.save`` files); False when a safetensors file
            without a torchkeep manifest could only be checked for structure and sizes.
        incomplete: True when files of the save are missing rather than damaged: a save
            that never committed, or one that lost a file it shares with an earlier save.
    """

    path: str
    ok: bool
    problems: tuple[str, ...]
    tensors: int = 0
    tensor_bytes: int = 0
    checksummed: bool = False
    incomplete: bool = False


def describe(
    source: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Description:
    """Describe a save: format, tensors, dtypes, shapes, bytes and metadata. Reads headers only.

    ``source`` may be an fsspec URL (``s3://…``), with its file system's ``storage_options``.

    Example:
        ```python
        info = tk.describe("model.safetensors")
        print(info.tensor_bytes, [t.name for t in info.tensors])
        ```
    """
    storage, path = storage_for(source, storage_options)
    with readable(storage, path) as (storage, path, kind):
        return _describe(storage, path, kind)


def _describe(storage: Storage, path: str, kind: Kind) -> Description:
    if kind.pickled:
        return _describe_pickle(path, kind)
    if kind is Kind.DCP:
        return _describe_object(path, load_dcp(path), "torch.distributed.checkpoint directory")
    if kind is Kind.HUGGINGFACE:
        return _describe_weights_directory(storage, path)
    return _describe_container(storage, path)


def _describe_container(storage: Storage, path: str) -> Description:
    with open_container(path, storage=storage) as c:
        m = c.manifest
        entries = sorted(c.entries.items(), key=lambda kv: (kv[1].file or "", kv[1].begin))
        sharded = (m.distributed if m is not None else None) or {}
        chunks = {chunk.tensor for spec in sharded.values() for chunk in spec.chunks}
        # A distributed save: its tensors whole, each in chunks across the ranks' files.
        tensors = tuple(
            TensorInfo(n, e.dtype, e.shape, e.nbytes, e.file)
            for n, e in entries
            if n not in chunks
        ) + tuple(
            TensorInfo(n, t.dtype, t.shape, t.nbytes, f"{len(t.chunks)} chunks")
            for n, t in sorted(sharded.items())
        )
        fmt = (
            "safetensors"
            if m is None
            else ("torchkeep directory" if c.directory else "torchkeep file")
        )
        if sharded:
            fmt = "torchkeep distributed directory"
        skeleton = decode(m.tree, lambda name: name) if m is not None and m.tree else None
        return Description(
            path=c.path,
            format=fmt,
            kind=m.kind if m else "",
            format_version=m.format_version if m else None,
            tensors=tensors,
            aliases=dict(c.aliases),
            metadata=dict(m.metadata) if m else {},
            tree=m.tree if m else None,
            tensor_bytes=sum(t.nbytes for t in tensors),
            file_bytes=c.file_bytes(),
            created=m.created if m else "",
            torch_version=m.torch_version if m else "",
            torchkeep_version=m.torchkeep_version if m else "",
            checksummed=m is not None,
            modules=_modules(tensors),
            optimizer=_optimizer_summary(skeleton),
            model=model_summary(c),
        )


def _describe_weights_directory(storage: Storage, path: str) -> Description:
    tensors: list[TensorInfo] = []
    aliases: dict[str, str] = {}
    with WeightsSource(path, verify=False) as weights:
        for part in weights.parts:
            if part.container is not None:
                entries = part.container.entries
                for key, name in part.names.items():
                    if key != name:  # a tied name its shard's manifest records
                        aliases[key] = name
                        continue
                    e = entries[name]
                    tensors.append(TensorInfo(key, e.dtype, e.shape, e.nbytes, e.file))
            else:
                for key, t in part.loaded.items():
                    dtype = DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
                    nbytes = stored_bytes(t)
                    tensors.append(TensorInfo(key, dtype, tuple(t.shape), nbytes))
    return Description(
        path=path,
        format="Hugging Face directory",
        kind="weights",
        format_version=None,
        tensors=tuple(tensors),
        aliases=aliases,
        tensor_bytes=sum(t.nbytes for t in tensors),
        file_bytes=sum(os.path.getsize(f.path) for f in weights_files(storage, path)),
        modules=_modules(tensors),
    )


def _describe_pickle(path: str, kind: Kind) -> Description:
    described = _describe_object(
        path, load_pickle_file(path, meta=True), f"{kind.value} (pickle)"
    )
    return replace(described, checksummed=carries_crcs(path))


def _size_on_disk(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


def _describe_object(path: str, obj: Any, kind: str) -> Description:
    tensors: list[TensorInfo] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, torch.Tensor):
            nbytes = stored_bytes(node)  # of a sparse tensor, its indices and values
            dtype = DTYPE_NAMES.get(node.dtype, str(node.dtype).removeprefix("torch."))
            tensors.append(TensorInfo(name, dtype, tuple(node.shape), nbytes))
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(obj, "")
    extras = {"modules": _modules(tensors), "optimizer": _optimizer_summary(obj)}
    return Description(
        path=path,
        format=kind,
        kind="",
        format_version=None,
        tensors=tuple(tensors),
        tensor_bytes=sum(t.nbytes for t in tensors),
        file_bytes=_size_on_disk(path),
        **extras,  # type: ignore[arg-type]
    )


_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")


def _modules(tensors: tuple[TensorInfo, ...] | list[TensorInfo]) -> dict[str, int]:
    names = [t.name for t in tensors]
    prefix = next((k + "." for k in MODEL_KEYS if any(n.startswith(k + ".") for n in names)), "")
    counts: dict[str, int] = {}
    for t in tensors:
        if t.name.startswith(prefix):
            top = t.name[len(prefix) :].split(".")[0]
            counts[top] = counts.get(top, 0) + math.prod(t.shape)
    return counts


def _optimizer_summary(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return ""
    for key in _OPTIMIZER_KEYS:
        state = obj.get(key)
        if isinstance(state, list) and state:
            state = state[0]
        if isinstance(state, Mapping) and "state" in state and "param_groups" in state:
            slots = state["state"]
            groups = state["param_groups"]
            names: set[str] = set()
            if isinstance(slots, Mapping):
                for value in slots.values():
                    if isinstance(value, Mapping):
                        names.update(map(str, value))
            lrs = [g.get("lr") for g in groups if isinstance(g, Mapping)]
            return (
                f"{key}: state for {len(slots)} parameters ({', '.join(sorted(names)) or 'none'}), "
                f"{len(groups)} param group(s), lr {', '.join(map(str, lrs))}"
            )
    return ""


def verify(
    source: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> VerifyReport:
    """Check every header, size and checksum of a save against its manifest.

    Returns a report rather than raising for damage found; a missing path still raises
    ``CheckpointNotFoundError``. ``source`` may be an fsspec URL (``s3://…``), with its file
    system's ``storage_options``.

    Example:
        ```python
        report = tk.verify("ckpt.safetensors")
        if not report.ok:
            print(*report.problems, sep="\\n")
        ```
    """
    storage, where = storage_for(source, storage_options)
    with readable(storage, where) as (storage, path, kind):
        return _verify(storage, path, kind)


def _verify(storage: Storage, path: str, kind: Kind) -> VerifyReport:
    try:
        if kind is Kind.DCP or kind.pickled:
            # Read whole, every CRC-32 checked (a DCP directory's describe reads it so).
            if kind is Kind.DCP:
                described = _describe(storage, path, kind)
                checksummed = True
            else:
                obj = load_pickle_file(path, verify=True)
                described = _describe_object(path, obj, "torch pickle")
                checksummed = carries_crcs(path)  # else there was nothing to check the bytes by
            tensors, nbytes = len(described.tensors), described.tensor_bytes
            return VerifyReport(path, True, (), tensors, nbytes, checksummed=checksummed)
        if kind is Kind.HUGGINGFACE:
            return _verify_weights_directory(path)
        with open_container(path, storage=storage) as c:
            problems = c.verify()
            entries = c.entries
            checksummed = c.manifest is not None
            sharded = (c.manifest.distributed if c.manifest else None) or {}
    except _DAMAGE as e:
        missing = isinstance(e, IncompleteCheckpointError)
        return VerifyReport(path, False, (str(e),), incomplete=missing)
    chunks = sum(len(spec.chunks) for spec in sharded.values())
    return VerifyReport(
        path,
        not problems,
        tuple(problems),
        tensors=len(entries) - chunks + len(sharded),  # a sharded tensor counts once, whole
        tensor_bytes=sum(e.nbytes for e in entries.values()),
        checksummed=checksummed,
    )


_DAMAGE: tuple[type[Exception], ...] = (CorruptCheckpointError, IncompleteCheckpointError)
_DAMAGE += (UnsupportedFormatError, UnsafeFileError, StorageError)


def _verify_weights_directory(path: str) -> VerifyReport:
    """A Hugging Face directory: every file's structure, checksums where the files have them."""
    problems: list[str] = []
    checksummed = True
    nbytes = 0
    with WeightsSource(path, verify=True) as weights:  # pickle shards: CRC-32s checked here
        for part in weights.parts:
            if part.container is not None:
                problems += part.container.verify()
                checksummed = checksummed and part.container.manifest is not None
                nbytes += sum(part.container.entries[n].nbytes for n in set(part.names.values()))
            else:
                nbytes += sum(t.numel() * t.element_size() for t in part.loaded.values())
        count = len(weights.shapes())
    return VerifyReport(path, not problems, tuple(problems), count, nbytes, checksummed)


@dataclass(frozen=True)
class Change:
    """One entry present in both saves that differs.

    Attributes:
        name: the entry's dotted name.
        what: how it differs: ``dtype float32 → bfloat16``, ``shape [4] → [8]``, ``values``
            for tensors of the same dtype and shape, or a description of the two values.
        max_abs_diff: for tensors whose values differ, the largest absolute difference of
            their elements (infinite where a NaN is involved); None otherwise.
    """

    name: str
    what: str
    max_abs_diff: float | None = None


@dataclass(frozen=True)
class Diff:
    """How two saves differ: entries only in ``b`` (added), only in ``a`` (removed), changed.

    ``same`` is True when nothing differs. Tensors compare by dtype, shape and value (the largest
    absolute difference is reported); other values by equality.

    Attributes:
        a: the first save, as given.
        b: the second save, as given.
        added: names of the entries only in ``b``.
        removed: names of the entries only in ``a``.
        changed: the entries in both that differ.
        unchanged: how many entries are equal in both.
        plain: the added and removed entries that are plain values (numbers, strings, …),
            not tensors.
    """

    a: str
    b: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[Change, ...]
    unchanged: int
    plain: tuple[str, ...] = ()

    @property
    def same(self) -> bool:
        """True when nothing was added, removed or changed."""
        return not (self.added or self.removed or self.changed)


def _leaves(obj: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            _leaves(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)) and obj and not isinstance(obj, torch.Size):
        for i, v in enumerate(obj):
            _leaves(v, f"{prefix}.{i}" if prefix else str(i), out)
    else:
        out[prefix or "obj"] = obj
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _compare(name: str, x: Any, y: Any) -> Change | None:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        if x.dtype != y.dtype:
            return Change(name, f"dtype {x.dtype} → {y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            return Change(name, f"shape {list(x.shape)} → {list(y.shape)}")
        if x.layout != torch.strided or y.layout != torch.strided or x.is_quantized:
            px, py = tensor_parts(x), tensor_parts(y)  # sparse or quantized: part by part
            parts = {k: _compare(k, px.get(k), py.get(k)) for k in px.keys() | py.keys()}
            changed = sorted(k for k, c in parts.items() if c is not None)
            only_values = parts["values"] if changed == ["values"] else None
            worst = getattr(only_values, "max_abs_diff", None)  # of the values' elements
            return Change(name, ", ".join(changed), worst) if changed else None
        # The same bytes are the same values (NaNs included); torch computes nothing in float4.
        if torch.equal(_bytes(x), _bytes(y)):
            return None
        if x.dtype == DTYPES.get("F4"):
            return Change(name, "values")
        if torch.equal(x, y):
            return None
        if x.is_floating_point() or x.is_complex():
            wide = torch.complex128 if x.is_complex() else torch.float64
            worst = float((x.to(wide) - y.to(wide)).abs().nan_to_num(nan=float("inf")).max())
        else:
            worst = float((x.long() - y.long()).abs().max()) if x.dtype != torch.bool else 1.0
        return Change(name, "values", worst)
    if type(x) is not type(y):
        return Change(name, f"type {type(x).__name__} → {type(y).__name__}")
    if isinstance(x, float) and isinstance(y, float) and x != x and y != y:
        return None  # both nan
    return None if x == y else Change(name, f"{x!r} → {y!r}"[:200])


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Diff:
    """Compare two saves entry by entry: added, removed and changed keys, with the largest
    absolute difference of each changed tensor. ``storage_options`` apply to whichever of
    ``a`` and ``b`` is a URL (``s3://…``).

    Example:
        ```python
        d = tk.diff("epoch_1.safetensors", "epoch_2.safetensors")
        print(d.same, [c.name for c in d.changed])
        ```
    """
    from torchkeep.checkpoint import load

    def options(path: str | os.PathLike[str]) -> Mapping[str, Any] | None:
        return storage_options if is_url(os.fspath(path)) else None

    left = _leaves(load(a, storage_options=options(a)), "", {})
    right = _leaves(load(b, storage_options=options(b)), "", {})
    changed = []
    for name in left.keys() & right.keys():
        change = _compare(name, left[name], right[name])
        if change is not None:
            changed.append(change)
    return Diff(
        a=os.fspath(a),
        b=os.fspath(b),
        added=tuple(sorted(right.keys() - left.keys())),
        removed=tuple(sorted(left.keys() - right.keys())),
        changed=tuple(sorted(changed, key=lambda c: c.name)),
        unchanged=len(left.keys() & right.keys()) - len(changed),
        plain=tuple(sorted(n for n, v in (right | left).items() if not isinstance(v, torch.Tensor)
                           and (n in left) != (n in right))),
    )  # fmt: skip
