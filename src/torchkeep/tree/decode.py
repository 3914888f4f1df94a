"""Decoding a typed-JSON skeleton back into the object it describes."""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, StateMismatchError
from torchkeep.format import Tag
from torchkeep.tree.flatten import METADATA


def decode(tree: Any, tensor: Callable[[str], Any]) -> Any:
    """Rebuild the object a skeleton describes; Stateful objects come back as their state.

    ``tensor`` maps each tensor name to what stands at its place (the tensor, when loading).
    """
    if isinstance(tree, list):
        return [decode(v, tensor) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, value),) = tree.items()
        if tag == Tag.TENSOR:
            return tensor(value)
        if tag == Tag.FLOAT:
            return float(value)
        if tag == Tag.BYTES:
            return base64.b64decode(value)
        if tag == Tag.DTYPE:
            dtype = getattr(torch, str(value), None)
            if not isinstance(dtype, torch.dtype):
                raise StateMismatchError(f"unknown dtype {value!r} in the saved state")
            return dtype
        if tag == Tag.DEVICE:
            return torch.device(value)
        if tag == Tag.SIZE:
            return torch.Size(value)
        if tag == Tag.TUPLE:
            return tuple(decode(v, tensor) for v in value)
        if tag == Tag.DICT:
            return {_freeze(decode(k, tensor)): decode(v, tensor) for k, v in value}
    if Tag.STATEFUL in tree and set(tree) == {Tag.STATEFUL, "state"}:
        return decode(tree["state"], tensor)
    if METADATA in tree:
        return _with_metadata(tree, tensor)
    return {k: decode(v, tensor) for k, v in tree.items()}


def _with_metadata(tree: dict[str, Any], tensor: Callable[[str], Any]) -> OrderedDict[Any, Any]:
    """A module state dict: an OrderedDict of its items, with its ``_metadata`` as saved."""
    items = decode({k: v for k, v in tree.items() if k != METADATA}, tensor)
    versions = decode(tree[METADATA], tensor)
    if not isinstance(items, dict) or not isinstance(versions, dict):
        raise CorruptCheckpointError(
            f"the saved state holds a malformed {METADATA} entry (the version records of a "
            "module state dict); the manifest is corrupt"
        )
    result: OrderedDict[Any, Any] = OrderedDict(items)
    setattr(result, "_metadata", OrderedDict(versions))  # noqa: B010
    return result


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key
