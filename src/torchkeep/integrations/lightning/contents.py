"""What a checkpoint may hold: objects refused, and module state dicts' ``_metadata`` kept."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.errors import UnsupportedObjectError
from torchkeep.format import MAX_TREE_DEPTH
from torchkeep.tree import Stateful, path_name


def refuse_objects(obj: Any, path: tuple[str, ...]) -> None:
    """Refuse Stateful objects, which torchkeep would store as their state dicts: Lightning
    would get a dict back where it saved an object."""
    if isinstance(obj, torch.Tensor) or len(path) > MAX_TREE_DEPTH:
        return  # too deep: torchkeep's own walk refuses it
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            refuse_objects(value, (*path, str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            refuse_objects(value, (*path, str(i)))
    elif isinstance(obj, Stateful) and not isinstance(obj, type):
        raise UnsupportedObjectError(
            f"{path_name(path)}: an object of type {type_name(obj)} would be stored as its state "
            "dict and come back as a dict, not as the object; keep plain values in a Lightning "
            "checkpoint"
        )


def lightning_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What the tree cannot hold: the ``_metadata`` attribute of each module state dict (each
    module's version, read by ``load_state_dict`` to upgrade old states), by its place."""
    found: list[dict[str, Any]] = []
    _find_module_metadata(checkpoint, [], found)
    return {"module_metadata": found} if found else {}


def _find_module_metadata(obj: Any, at: list[str | int], found: list[dict[str, Any]]) -> None:
    if isinstance(obj, torch.Tensor) or len(at) > MAX_TREE_DEPTH:
        return
    if isinstance(obj, Mapping):
        versions = getattr(obj, "_metadata", None)
        if isinstance(versions, Mapping):
            entries = {
                str(k): {n: x for n, x in v.items() if isinstance(n, str) and _json_scalar(x)}
                for k, v in versions.items()
                if isinstance(v, Mapping)
            }
            found.append({"at": list(at), "versions": entries})
        for key, value in obj.items():
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                _find_module_metadata(value, [*at, key], found)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _find_module_metadata(value, [*at, i], found)


def _json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int))


def restore_module_metadata(checkpoint: dict[str, Any], saved: Any) -> dict[str, Any]:
    """Make each module state dict recorded in ``saved`` an ``OrderedDict`` with its
    ``_metadata`` again; return the checkpoint (itself one, when it was saved as one)."""
    root: Any = {"": checkpoint}  # so that the checkpoint has a parent like every other value
    found = saved.get("module_metadata") if isinstance(saved, dict) else None
    for entry in found if isinstance(found, list) else []:
        at = entry.get("at") if isinstance(entry, dict) else None
        versions = entry.get("versions") if isinstance(entry, dict) else None
        if not (isinstance(at, list) and isinstance(versions, dict)):
            continue
        at = ["", *at]
        parent = root
        for key in at[:-1]:
            parent = _child(parent, key)
        value = _child(parent, at[-1])
        if not isinstance(value, dict):
            continue  # the checkpoint does not have the saved shape: leave it as it is
        state_dict: Any = OrderedDict(value)
        state_dict._metadata = OrderedDict(versions)
        parent[at[-1]] = state_dict
    result: dict[str, Any] = root[""]
    return result


def _child(obj: Any, key: Any) -> Any:
    if isinstance(obj, dict) and key in obj:
        return obj[key]
    if isinstance(obj, list) and isinstance(key, int) and 0 <= key < len(obj):
        return obj[key]
    return None


def type_name(obj: Any) -> str:
    """The name of ``obj``'s type as messages give it: a builtin's bare, others with the module."""
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
