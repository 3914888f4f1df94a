"""Decoding a typed-JSON skeleton back into the object it describes."""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, StateMismatchError
from torchkeep.format import Tag
from torchkeep.tree.composite import rebuild
from torchkeep.tree.flatten import METADATA


def decode(tree: Any, tensor: Callable[[str], Any]) -> Any:
    """Rebuild the object a skeleton describes; Stateful objects come back as their state.

    ``tensor`` maps each tensor name to what stands at its place (the tensor, when loading).
    A sparse or quantized tensor is rebuilt from its parts once, however often the tree names
    it (as one saved object named twice is).

    Raises:
        CorruptCheckpointError: a sparse or quantized tensor's parts do not make it.
    """
    made: dict[str, Any] = {}

    def composite(tag: str, recipe: dict[str, Any]) -> Any:
        key = json.dumps([tag, recipe], sort_keys=True)
        if key not in made:
            made[key] = rebuild(tag, recipe, tensor)
        return made[key]

    return _decode(tree, tensor, composite)


def _decode(
    tree: Any, tensor: Callable[[str], Any], composite: Callable[[str, dict[str, Any]], Any]
) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensor, composite) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, value),) = tree.items()
        if tag == Tag.TENSOR:
            return tensor(value)
        if tag in (Tag.SPARSE, Tag.QUANTIZED, Tag.COMPLEX):
            return composite(tag, value)
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
            return tuple(_decode(v, tensor, composite) for v in value)
        if tag == Tag.DICT:
            return {
                _freeze(_decode(k, tensor, composite)): _decode(v, tensor, composite)
                for k, v in value
            }
    if Tag.STATEFUL in tree and set(tree) == {Tag.STATEFUL, "state"}:
        return _decode(tree["state"], tensor, composite)
    if METADATA in tree:
        return _with_metadata(tree, tensor, composite)
    return {k: _decode(v, tensor, composite) for k, v in tree.items()}


def _with_metadata(
    tree: dict[str, Any],
    tensor: Callable[[str], Any],
    composite: Callable[[str, dict[str, Any]], Any],
) -> OrderedDict[Any, Any]:
    """A module state dict: an OrderedDict of its items, with its ``_metadata`` as saved."""
    items = _decode({k: v for k, v in tree.items() if k != METADATA}, tensor, composite)
    versions = _decode(tree[METADATA], tensor, composite)
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
