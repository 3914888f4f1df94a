"""Flattening a state tree into named tensors plus a typed-JSON skeleton.

A tree is any nesting of dict, list and tuple over tensors, Python scalars (int, float including
inf and nan, bool, str, bytes, None), ``torch.dtype``, ``torch.device``, ``torch.Size`` and
Stateful objects (anything with ``state_dict()``/``load_state_dict()``). Tensors are named by
their dotted path (``optimizer_state_dict.state.0.exp_avg``); everything else is kept as typed
JSON, so ints stay ints, dict keys keep their types and tuples stay tuples, and a module state
dict keeps its ``_metadata`` (``$metadata`` beside its items). Sparse and quantized tensors are
stored as their parts, each named ``<path>:<part>`` (``emb.weight:indices``), with a recipe in
the skeleton (``tree.composite``). Nothing is pickled.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from torchkeep.errors import UnsupportedObjectError
from torchkeep.format import Tag, dtype_name
from torchkeep.format.sections import PART_SEPARATOR
from torchkeep.tree.composite import is_composite, take_apart
from torchkeep.tree.dtensor import is_dtensor

TENSOR = Tag.TENSOR
STATEFUL = Tag.STATEFUL
METADATA = Tag.METADATA  # written only for a mapping that has version records
_PLAIN_TENSOR_TYPES = (
    torch.Tensor,
    torch.nn.Parameter,
    getattr(torch.nn.parameter, "Buffer", torch.Tensor),
)


@runtime_checkable
class Stateful(Protocol):
    """torch's own shape for objects that can be saved and restored."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class Flat:
    """A flattened tree: the JSON skeleton, each distinct tensor by name, and tensor aliases."""

    tree: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # Called with each distinct tensor as it is found (an async save starts its copy there).
    on_tensor: Callable[[str, torch.Tensor], None] | None = None
    # Keep DTensors as they are (a distributed save writes their local parts).
    dtensors: bool = False
    # Store sparse and quantized tensors as parts plus a recipe (a flat dict of tensors then
    # has a tree, ``dedupe``'s, naming them).
    composites: bool = True
    # The stored tensors a dtype= never casts (the parts of quantized tensors).
    kept_dtype: set[str] = field(default_factory=set)
    # Each sparse or quantized tensor object stored, with its node: stored once.
    stored: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)


def path_name(path: tuple[str, ...]) -> str:
    """Return the dotted name of a path inside a tree (``obj`` for the root)."""
    return ".".join(path) if path else "obj"


def flatten(
    obj: Any,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
    *,
    dtensors: bool = False,
) -> Flat:
    """Flatten ``obj`` into a skeleton and named tensors; identical tensor views become aliases.
    ``on_tensor(name, tensor)``, if given, is called as each distinct tensor is found; with
    ``dtensors``, DTensors are kept as they are (for a distributed save).

    Raises:
        UnsupportedObjectError: a value has no safe representation; the message names its path.
    """
    flat = Flat(tree=None, on_tensor=on_tensor, dtensors=dtensors)
    seen: dict[tuple[Any, ...], str] = {}
    flat.tree = _encode(obj, (), flat, seen)
    return flat


def _tensor_identity(t: torch.Tensor) -> tuple[Any, ...]:
    storage = t.untyped_storage()
    # Storages without memory all have address 0: told apart by the storage object itself
    # (two names of one tensor share it, two empty tensors do not).
    address = storage.data_ptr() or ("empty", storage._cdata)
    return (
        address,
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
        str(t.device),
        t.is_conj(),
        t.is_neg(),
    )


def _unique_name(base: str, flat: Flat) -> str:
    name = base or "tensor"
    n = 1
    # "__metadata__" is the safetensors header's own entry, never a tensor name.
    while name in flat.tensors or name in flat.aliases or name == "__metadata__":
        name = f"{base}#{n}"
        n += 1
    return name


def _encode(obj: Any, path: tuple[str, ...], flat: Flat, seen: dict[tuple[Any, ...], str]) -> Any:
    if isinstance(obj, torch.Tensor):
        return _encode_tensor(obj, path, flat, seen)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {Tag.FLOAT: repr(float(obj))}
    if isinstance(obj, bytes):
        return {Tag.BYTES: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {Tag.DTYPE: str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {Tag.DEVICE: str(obj)}
    if isinstance(obj, torch.Size):
        return {Tag.SIZE: list(obj)}
    if isinstance(obj, tuple):
        return {Tag.TUPLE: [_encode(v, (*path, str(i)), flat, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, (*path, str(i)), flat, seen) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return _encode_mapping(obj, path, flat, seen)
    if isinstance(obj, Stateful) and not isinstance(obj, type):
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return {STATEFUL: kind, "state": _encode(obj.state_dict(), path, flat, seen)}
    raise UnsupportedObjectError(_unsupported_message(obj, path))


def _encode_mapping(
    obj: Mapping[Any, Any], path: tuple[str, ...], flat: Flat, seen: dict[tuple[Any, ...], str]
) -> Any:
    encoded = _encode_items(obj, path, flat, seen)
    versions = vars(obj).get("_metadata") if hasattr(obj, "__dict__") else None
    if versions is None:
        return encoded
    return {**encoded, METADATA: _encode(versions, (*path, "_metadata"), flat, seen)}


def _encode_items(
    obj: Mapping[Any, Any], path: tuple[str, ...], flat: Flat, seen: dict[tuple[Any, ...], str]
) -> dict[str, Any]:
    plain = all(isinstance(k, str) and not k.startswith("$") for k in obj)
    if plain:
        return {k: _encode(v, (*path, k), flat, seen) for k, v in obj.items()}
    pairs = []
    for key, value in obj.items():
        if not _is_key(key):
            raise UnsupportedObjectError(
                f"{path_name(path)}: dict key {key!r} of type {type(key).__name__} cannot be "
                "stored; use str, int, float, bool, None or tuples of those as keys"
            )
        pairs.append(
            [_encode(key, path, flat, seen), _encode(value, (*path, str(key)), flat, seen)]
        )
    return {Tag.DICT: pairs}


def _is_key(key: Any) -> bool:
    if key is None or isinstance(key, (str, int, float, bool)):
        return True
    return isinstance(key, tuple) and all(_is_key(k) for k in key)


def _encode_tensor(
    t: torch.Tensor, path: tuple[str, ...], flat: Flat, seen: dict[tuple[Any, ...], str]
) -> Any:
    """The node of tensor ``t``: ``{"$tensor": name}``, or a sparse or quantized tensor's
    recipe naming its parts."""
    if t.is_nested:
        raise UnsupportedObjectError(
            f"{path_name(path)}: a nested tensor cannot be stored; store its tensors as a list: "
            "list(t.unbind())"
        )
    plain = type(t) in _PLAIN_TENSOR_TYPES and not is_dtensor(t)
    if not (plain and flat.composites and is_composite(t)):
        return {TENSOR: _add_tensor(t, path, flat, seen)}
    where = path_name(path)
    if t.device.type == "meta":
        raise UnsupportedObjectError(f"{where}: a meta tensor has no data to save")
    if id(t) in flat.stored:
        return flat.stored[id(t)][1]
    tag, recipe, parts = take_apart(t, where)
    last = path[-1] if path else "tensor"
    node = dict(recipe)
    for key, part in parts.items():
        name = _add_tensor(part, (*path[:-1], f"{last}{PART_SEPARATOR}{key}"), flat, seen)
        node[key] = {TENSOR: name}
        if tag in (Tag.QUANTIZED, Tag.COMPLEX):
            flat.kept_dtype.add(name)
    flat.stored[id(t)] = (t, {tag: node})  # the tensor held: its id stays its own
    return {tag: node}


def _add_tensor(
    t: torch.Tensor, path: tuple[str, ...], flat: Flat, seen: dict[tuple[Any, ...], str]
) -> str:
    where = path_name(path)
    if flat.dtensors and is_dtensor(t):
        local: Any = t
        key = (*_tensor_identity(local.to_local()), tuple(t.shape), str(local.placements))
        if key in seen:
            alias = _unique_name(".".join(path), flat)
            flat.aliases[alias] = seen[key]
            return alias
        name = _unique_name(".".join(path), flat)
        flat.tensors[name] = t.detach()
        seen[key] = name
        return name
    if is_dtensor(t):
        raise UnsupportedObjectError(
            f"{where}: a DTensor; DTensor state is saved under an initialized process group, "
            "every rank writing its part (not by asynchronous saves: use async_save=False), or "
            "as a whole tensor: .full_tensor()"
        )
    if type(t) not in _PLAIN_TENSOR_TYPES:
        raise UnsupportedObjectError(
            f"{where}: tensors of type {type(t).__name__} are not supported yet; "
            "convert to a plain tensor"
        )
    if t.layout != torch.strided or t.is_quantized:
        raise UnsupportedObjectError(
            f"{where}: {t.layout} tensors cannot be stored; convert with .to_dense() first"
        )
    if t.device.type == "meta":
        raise UnsupportedObjectError(f"{where}: a meta tensor has no data to save")
    dtype_name(t.dtype, where=where, shape=tuple(t.shape))  # refuses what safetensors cannot hold
    identity = _tensor_identity(t) if t.numel() else None
    if identity is not None and identity in seen:
        original = seen[identity]
        alias = _unique_name(".".join(path), flat)
        flat.aliases[alias] = original
        return alias
    name = _unique_name(".".join(path), flat)
    flat.tensors[name] = t.detach()
    if identity is not None:
        seen[identity] = name
    if flat.on_tensor is not None:
        flat.on_tensor(name, flat.tensors[name])
    return name


def _unsupported_message(obj: Any, path: tuple[str, ...]) -> str:
    where = path_name(path)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if type(obj).__module__ == "numpy":
        hint = "convert numpy arrays with torch.from_numpy(x) and numpy scalars with x.item()"
    elif isinstance(obj, (set, frozenset)):
        hint = "store it as a sorted list"
    else:
        hint = (
            "store its fields as plain values (dicts, lists, numbers, strings, tensors), or give "
            "it state_dict()/load_state_dict() methods"
        )
    return f"{where}: cannot store a {kind} without pickle; {hint}"


def dedupe(named: Mapping[str, torch.Tensor], *, composites: bool = False) -> Flat:
    """Return a flat dict of tensors with identical views (tied weights) stored once. With
    ``composites``, sparse and quantized tensors are stored as parts, and the result's tree
    maps every key to its node (else the tree is None: each key is a stored name or alias)."""
    flat = Flat(tree=None, composites=composites)
    seen: dict[tuple[Any, ...], str] = {}
    nodes: dict[str, Any] = {}
    for key, value in named.items():
        if not isinstance(key, str):
            raise UnsupportedObjectError(f"state dict key {key!r} is not a string")
        if key == "__metadata__":
            raise UnsupportedObjectError(
                "__metadata__: safetensors reserves this name for the file's metadata; "
                "rename the tensor (a state dict key cannot be '__metadata__')"
            )
        if not isinstance(value, torch.Tensor):
            raise UnsupportedObjectError(
                f"{key}: a weights file holds tensors only, this is a {type(value).__name__}; "
                "use tk.save for mixed state"
            )
        nodes[key] = _encode_tensor(value, (key,), flat, seen)
    if flat.stored:
        plain = not any(k.startswith("$") for k in nodes)
        flat.tree = nodes if plain else {Tag.DICT: [[k, v] for k, v in nodes.items()]}
    return flat
