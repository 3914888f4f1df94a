"""Sparse and quantized tensors as plain component tensors plus a typed-JSON recipe: taken
apart for a save (``take_apart``) and rebuilt with torch's own constructors once every part has
been checked (``rebuild``), so that a file that lies is CorruptCheckpointError, never a crash.

A sparse tensor (COO, CSR, CSC, BSR, BSC) is stored as the tensors torch builds it from
(``indices`` and ``values``; ``crow_indices``, ``col_indices`` and ``values``; …) and a
``$sparse`` recipe (layout, size, whether a COO tensor is coalesced); a quantized tensor
(per-tensor or per-channel affine, qint8, quint8 or qint32) as its integer representation,
per channel its scales and zero points too, and a ``$quantized`` recipe (qscheme, dtype, and
per tensor its scale and zero point, per channel its axis); a complex tensor of a dtype
safetensors has no name for (complex128, complex32) as the pairs of floats
``torch.view_as_real`` makes, and a ``$complex`` recipe (its dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, UnsupportedObjectError
from torchkeep.format import Tag
from torchkeep.format.sections import (
    COMPLEX_DTYPES,
    QUANTIZED_DTYPES,
    QUANTIZED_PARTS,
    SPARSE_PARTS,
)

LAYOUTS = {
    "coo": torch.sparse_coo,
    "csr": torch.sparse_csr,
    "csc": torch.sparse_csc,
    "bsr": torch.sparse_bsr,
    "bsc": torch.sparse_bsc,
}
_LAYOUT_NAMES = {layout: name for name, layout in LAYOUTS.items()}
_COMPLEX = {getattr(torch, name): name for name in COMPLEX_DTYPES}


def is_composite(t: torch.Tensor) -> bool:
    """Whether ``t`` is stored as parts plus a recipe (sparse, quantized, or complex of a
    dtype safetensors has no name for)."""
    return t.layout != torch.strided or t.is_quantized or t.dtype in _COMPLEX


def take_apart(t: torch.Tensor, where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """The tag, the recipe's scalars and the part tensors (by their keys) that store ``t``.

    Raises:
        UnsupportedObjectError: a layout or quantization scheme that has no stored form.
    """
    if t.is_quantized:
        return _quantized_parts(t, where)
    if t.layout == torch.strided and t.dtype in _COMPLEX:
        real = torch.view_as_real(t.resolve_conj().resolve_neg()).contiguous()
        return Tag.COMPLEX, {"dtype": _COMPLEX[t.dtype]}, {"real": real}
    layout = _LAYOUT_NAMES.get(t.layout)
    if layout is None:
        raise UnsupportedObjectError(
            f"{where}: {t.layout} tensors cannot be stored; convert with .to_dense() first"
        )
    if layout == "coo":
        recipe: dict[str, Any] = {
            "layout": layout,
            "size": list(t.shape),
            "coalesced": t.is_coalesced(),
        }
        return Tag.SPARSE, recipe, {"indices": t._indices(), "values": t._values()}
    compressed, plain = (
        (t.crow_indices(), t.col_indices())
        if layout in ("csr", "bsr")
        else (t.ccol_indices(), t.row_indices())
    )
    first, second, _ = SPARSE_PARTS[layout]
    parts = {first: compressed, second: plain, "values": t.values()}
    return Tag.SPARSE, {"layout": layout, "size": list(t.shape)}, parts


def _quantized_parts(
    t: torch.Tensor, where: str
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    qscheme = str(t.qscheme()).removeprefix("torch.")
    dtype = str(t.dtype).removeprefix("torch.")
    if qscheme not in QUANTIZED_PARTS or dtype not in QUANTIZED_DTYPES:
        raise UnsupportedObjectError(
            f"{where}: a quantized tensor of dtype {dtype} and qscheme {qscheme} cannot be "
            f"stored (torchkeep stores {', '.join(QUANTIZED_DTYPES)} tensors quantized "
            f"{', '.join(QUANTIZED_PARTS)}); store t.int_repr() and its parameters, or "
            "t.dequantize()"
        )
    scales = (
        torch.tensor([t.q_scale()]) if qscheme == "per_tensor_affine" else t.q_per_channel_scales()
    )
    float_params = qscheme == "per_channel_affine_float_qparams"
    if not bool(torch.isfinite(scales).all() and (scales > 0).all()) or (
        float_params and dtype != "quint8"
    ):
        raise UnsupportedObjectError(
            f"{where}: a {dtype} tensor quantized {qscheme} with scales "
            f"{scales.tolist()!r:.60} cannot be stored (torchkeep stores finite scales above 0, "
            "and float zero points with quint8 only); store t.int_repr() and its parameters, "
            "or t.dequantize()"
        )
    recipe: dict[str, Any] = {"qscheme": qscheme, "dtype": dtype}
    if qscheme == "per_tensor_affine":
        recipe |= {"scale": float(t.q_scale()), "zero_point": int(t.q_zero_point())}
        return Tag.QUANTIZED, recipe, {"int_repr": t.int_repr()}
    recipe["axis"] = int(t.q_per_channel_axis())
    parts = {
        "int_repr": t.int_repr(),
        "scales": t.q_per_channel_scales(),
        "zero_points": t.q_per_channel_zero_points(),
    }
    return Tag.QUANTIZED, recipe, parts


def parts_of(node: Any) -> dict[str, str] | None:
    """The part tensors' names of a stored sparse or quantized tensor, by their keys; None
    for any other node of a tree."""
    if not isinstance(node, dict) or len(node) != 1:
        return None
    ((tag, recipe),) = node.items()
    if tag not in (Tag.SPARSE, Tag.QUANTIZED, Tag.COMPLEX) or not isinstance(recipe, dict):
        return None
    return {
        key: value[Tag.TENSOR]
        for key, value in recipe.items()
        if isinstance(value, dict) and set(value) == {Tag.TENSOR}
    }


def stored_shape(node: Any, shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of the sparse or quantized tensor ``node`` stores (``shape_of`` gives a
    stored tensor's), or None for any other node."""
    parts = parts_of(node)
    if parts is None:
        return None
    ((tag, recipe),) = node.items()
    if tag == Tag.SPARSE:
        return tuple(recipe["size"])
    if tag == Tag.COMPLEX:
        return tuple(shape_of(parts["real"]))[:-1]
    return tuple(shape_of(parts["int_repr"]))


def kept_dtype(tree: Any) -> set[str]:
    """The stored tensors of ``tree`` that a ``dtype=`` never casts: the parts of quantized
    tensors (a cast scale would change every value) and complex ones (complex tensors keep
    their dtype). A sparse tensor's values are cast like
    a dense tensor's, by ``tree.cast``'s rule; its indices are integers, never cast."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            parts = parts_of(node)
            if parts is not None and (Tag.QUANTIZED in node or Tag.COMPLEX in node):
                names.update(parts.values())
            elif parts is None:
                stack.extend(node.values())
    return names


def rebuild(tag: str, recipe: Mapping[str, Any], tensor: Callable[[str], Any]) -> Any:
    """The sparse or quantized tensor a recipe describes, from its parts (``tensor`` maps a
    stored name to the tensor). Where ``tensor`` gives something else (names, when a caller
    only looks at a tree's shape), the recipe comes back with its parts so replaced.

    Raises:
        CorruptCheckpointError: the parts do not make the tensor the recipe describes.
    """
    if tag == Tag.COMPLEX:
        keys: tuple[str, ...] = ("real",)
    elif tag == Tag.SPARSE:
        keys = SPARSE_PARTS[recipe["layout"]]
    else:
        keys = QUANTIZED_PARTS[recipe["qscheme"]]
    names = {key: recipe[key][Tag.TENSOR] for key in keys}
    parts = {key: tensor(name) for key, name in names.items()}
    if not all(isinstance(p, torch.Tensor) for p in parts.values()):
        return {**recipe, **parts}
    where = ", ".join(f"'{n}'" for n in names.values())
    if tag == Tag.SPARSE:
        return _sparse(recipe, parts, where)
    if tag == Tag.COMPLEX:
        return _complex(recipe, parts["real"], where)
    return _quantized(recipe, parts, where)


def _corrupt(where: str, what: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"the {what} stored as {where}: {why}; the manifest does not describe its parts, the "
        "file is corrupt (save it again from the original)"
    )


def _complex(recipe: Mapping[str, Any], real: torch.Tensor, where: str) -> torch.Tensor:
    dtype = recipe["dtype"]
    what = f"{dtype} tensor"
    pairs = getattr(torch, COMPLEX_DTYPES[dtype])
    if real.dtype != pairs:
        raise _corrupt(where, what, f"its pairs are {real.dtype}, not {pairs}")
    if real.dim() == 0 or real.shape[-1] != 2:
        raise _corrupt(where, what, f"its pairs have shape {list(real.shape)}, not [..., 2]")
    if real.device.type == "meta":
        raise _corrupt(where, what, "its parts have no data")
    return torch.view_as_complex(real.contiguous())


def _sparse(recipe: Mapping[str, Any], parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    layout, size = recipe["layout"], recipe["size"]
    what = f"sparse {layout.upper()} tensor of size {size}"
    keys = SPARSE_PARTS[layout]
    values = parts["values"]
    indices = [parts[k] for k in keys[:-1]]
    allowed = (torch.int64,) if layout == "coo" else (torch.int32, torch.int64)
    for key, index in zip(keys, indices, strict=False):
        if index.dtype not in allowed:
            raise _corrupt(where, what, f"its {key} are {index.dtype}, not integers")
    if len({i.dtype for i in indices}) > 1:
        raise _corrupt(where, what, "its index tensors differ in dtype")
    if values.device.type == "meta" or any(i.device.type == "meta" for i in indices):
        raise _corrupt(where, what, "its parts have no data")
    try:
        # check_invariants: torch's own checks (indices in range, shapes consistent, compressed
        # indices monotone, a coalesced tensor's indices sorted and unique).
        if layout == "coo":
            return torch.sparse_coo_tensor(
                indices[0],
                values,
                size,
                is_coalesced=bool(recipe["coalesced"]),
                check_invariants=True,
            )
        return torch.sparse_compressed_tensor(
            indices[0], indices[1], values, size, layout=LAYOUTS[layout], check_invariants=True
        )
    except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as e:
        raise _corrupt(where, what, str(e).split("\n")[0][:300]) from e


def _quantized(
    recipe: Mapping[str, Any], parts: dict[str, torch.Tensor], where: str
) -> torch.Tensor:
    qscheme, dtype = recipe["qscheme"], recipe["dtype"]
    what = f"{dtype} tensor quantized {qscheme}"
    int_dtype, low, high = QUANTIZED_DTYPES[dtype]
    int_repr = parts["int_repr"]
    if int_repr.dtype != getattr(torch, int_dtype):
        raise _corrupt(where, what, f"its int_repr is {int_repr.dtype}, not torch.{int_dtype}")
    if int_repr.device.type == "meta":
        raise _corrupt(where, what, "its int_repr has no data")
    try:
        if qscheme == "per_tensor_affine":
            made = torch._make_per_tensor_quantized_tensor(
                int_repr, float(recipe["scale"]), int(recipe["zero_point"])
            )
        else:
            scales, zero_points = parts["scales"], parts["zero_points"]
            _check_channels(recipe, int_repr, scales, zero_points, where, what, (low, high))
            made = torch._make_per_channel_quantized_tensor(
                int_repr, scales, zero_points, int(recipe["axis"])
            )
    except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as e:
        raise _corrupt(where, what, str(e).split("\n")[0][:300]) from e
    if str(made.qscheme()).removeprefix("torch.") != qscheme:
        raise _corrupt(where, what, f"its parts make a {made.qscheme()} tensor")
    return made


def _check_channels(
    recipe: Mapping[str, Any],
    int_repr: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    where: str,
    what: str,
    zero_range: tuple[int, int],
) -> None:
    axis = recipe["axis"]
    if axis >= int_repr.dim():
        raise _corrupt(where, what, f"axis {axis} is not a dimension of its {int_repr.dim()}")
    channels = int_repr.shape[axis]
    if scales.dim() != 1 or zero_points.dim() != 1 or len(scales) != channels:
        raise _corrupt(where, what, f"its axis has {channels} channels but not as many scales")
    if len(zero_points) != channels:
        raise _corrupt(where, what, f"its axis has {channels} channels but not as many zero points")
    if scales.dtype not in (torch.float32, torch.float64):
        raise _corrupt(where, what, f"its scales are {scales.dtype}, not float32 or float64")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise _corrupt(where, what, "a scale is not a finite number above 0")
    float_params = recipe["qscheme"] == "per_channel_affine_float_qparams"
    if float_params:
        if not zero_points.is_floating_point() or not bool(torch.isfinite(zero_points).all()):
            raise _corrupt(where, what, "its zero points are not finite floating-point numbers")
        return
    if zero_points.dtype != torch.int64:
        raise _corrupt(where, what, f"its zero points are {zero_points.dtype}, not torch.int64")
    low, high = zero_range
    if len(zero_points) and not (low <= int(zero_points.min()) and int(zero_points.max()) <= high):
        raise _corrupt(where, what, f"a zero point lies outside [{low}, {high}]")
