"""Moving and casting loaded tensors: the one rule that a dtype given to a loader applies to
floating-point tensors only (integer and boolean tensors keep theirs)."""

from __future__ import annotations

from typing import Any

import torch

from torchkeep._types import Device


def cast_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is stored or loaded as: ``dtype`` if it is floating point, else its
    own."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def convert(
    tensor: torch.Tensor, *, map_location: Device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Move ``tensor`` to ``map_location`` and cast it to ``dtype`` if it is floating point."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if map_location is not None:
        tensor = tensor.to(map_location)
    return tensor


def convert_tree(obj: Any, map_location: Device | None, dtype: torch.dtype | None) -> Any:
    """``convert`` every tensor of a nest of dicts, lists and tuples."""
    if map_location is None and dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return convert(obj, map_location=map_location, dtype=dtype)
    if isinstance(obj, dict):
        return type(obj)({k: convert_tree(v, map_location, dtype) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(convert_tree(v, map_location, dtype) for v in obj)
    return obj
