"""Decoding a typed-JSON skeleton back into the object it describes."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import torch

from torchkeep.errors import StateMismatchError
from torchkeep.format import Tag


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
    return {k: decode(v, tensor) for k, v in tree.items()}


def _freeze(key: Any) -> Any:
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key
