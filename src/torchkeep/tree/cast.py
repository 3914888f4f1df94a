"""Moving and casting loaded tensors: the one rule that a dtype given to a loader or a save
applies to the ordinary floating-point tensors only (float16, bfloat16, float32, float64)."""

from __future__ import annotations

from typing import Any

import torch

from torchkeep._types import Device

# What a ``dtype=`` casts. Integer and boolean tensors keep their dtype (indices, counts,
# masks); complex ones too (a real dtype would drop the imaginary part). Float8 and float4
# tensors are quantized weights whose values mean something only with the scales stored
# beside them: casting them would change what the model computes, so they keep theirs.
CAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def cast_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``tensor`` is stored or loaded as: ``dtype`` if the tensor's own is in
    ``CAST_DTYPES``, else its own."""
    return dtype if dtype is not None and tensor.dtype in CAST_DTYPES else tensor.dtype


def convert(
    tensor: torch.Tensor, *, map_location: Device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Move ``tensor`` to ``map_location`` and cast it to ``dtype`` if its own dtype is in
    ``CAST_DTYPES``. What it was stays as it was: a parameter, ``requires_grad``, its Python
    attributes; a meta tensor, which has no data to move, stays on the meta device."""
    cast = dtype if dtype is not None and tensor.dtype in CAST_DTYPES else None
    device = map_location if tensor.device.type != "meta" else None
    if cast is None and device is None:
        return tensor
    with torch.no_grad():  # a leaf stays a leaf
        result = tensor.to(device=device, dtype=cast)
    if result is tensor:
        return tensor
    if isinstance(tensor, torch.nn.Parameter):
        result = torch.nn.Parameter(result, requires_grad=tensor.requires_grad)
    elif tensor.requires_grad:
        result.requires_grad_(True)
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) and vars(tensor):
        vars(result).update(vars(tensor))
    return result


def convert_tree(obj: Any, map_location: Device | None, dtype: torch.dtype | None) -> Any:
    """``convert`` every tensor of a nest of dicts, lists and tuples; a module state dict
    keeps its ``_metadata``."""
    if map_location is None and dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return convert(obj, map_location=map_location, dtype=dtype)
    if isinstance(obj, dict):
        result = type(obj)({k: convert_tree(v, map_location, dtype) for k, v in obj.items()})
        if hasattr(obj, "__dict__") and "_metadata" in vars(obj):
            setattr(result, "_metadata", vars(obj)["_metadata"])  # noqa: B010
        return result
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(convert_tree(v, map_location, dtype) for v in obj)
    return obj
