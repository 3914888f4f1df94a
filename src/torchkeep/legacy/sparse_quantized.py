"""Sparse and quantized tensors rebuilt from a ``torch.save`` pickle with torch's own constructors.

Each is made from parts the pickle already rebuilt (index and value tensors over the file's
storages, a storage and its quantization parameters) once their sizes are checked against each
other, so that nothing is allocated past what the file holds. What depends on the stored bytes
(indices in range and ordered, per-channel scales finite, zero points in range) is checked by
the function returned beside the tensor, which the caller runs once the storages are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError

Check = Callable[[], None]

# The quantized dtypes read, with the integer dtype of their stored bytes and its range.
QUANTIZED: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.qint8: (torch.int8, -(1 << 7), (1 << 7) - 1),
    torch.quint8: (torch.uint8, 0, (1 << 8) - 1),
    torch.qint32: (torch.int32, -(1 << 31), (1 << 31) - 1),
}

QSCHEMES = {
    name: getattr(torch, name)
    for name in (
        "per_tensor_affine",
        "per_tensor_symmetric",
        "per_channel_affine",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    )
}

# Of each compressed layout: which of the two sparse dimensions is compressed, and whether its
# values are blocks.
_COMPRESSED: dict[torch.layout, tuple[int, bool]] = {
    torch.sparse_csr: (0, False),
    torch.sparse_csc: (1, False),
    torch.sparse_bsr: (0, True),
    torch.sparse_bsc: (1, True),
}
_LAYOUTS = {str(layout): layout for layout in (torch.sparse_coo, *_COMPRESSED)}


def check_shape(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) > 64:
        raise CorruptCheckpointError(f"tensor {what} {values!r:.200} is not a tuple of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CorruptCheckpointError(
            f"tensor {what} {values!r:.200} must hold non-negative integers"
        )
    return tuple(int(v) for v in values)


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the tensor that holds a storage's bytes: a quantized dtype's integers."""
    return QUANTIZED[dtype][0] if dtype in QUANTIZED else dtype


def get_layout(name: Any) -> torch.layout:
    """What ``torch.serialization._get_layout`` returns for a sparse layout's name."""
    layout = _LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise UnsupportedFormatError(
            f"tensor layout {name!r:.50} is not read; torchkeep reads the sparse layouts "
            f"{', '.join(_LAYOUTS)}"
        )
    return layout


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor's data takes: a sparse tensor's indices and values, not its dense size."""
    if tensor.layout == torch.sparse_coo:
        parts: tuple[torch.Tensor, ...] = (tensor._indices(), tensor._values())
    elif tensor.layout in _COMPRESSED:
        parts = (*_compressed_indices(tensor), tensor.values())
    else:
        parts = (tensor,)
    return sum(p.numel() * p.element_size() for p in parts)


def tensor_parts(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor as the plain tensors that hold it, to compare: a sparse tensor's indices and
    values (a COO tensor's coalesced), a quantized tensor's integers and quantization parameters,
    a plain tensor itself (as ``values``)."""
    if tensor.layout == torch.sparse_coo:
        tensor = tensor.coalesce()
        return {"indices": tensor._indices(), "values": tensor._values()}
    if tensor.layout in _COMPRESSED:
        compressed, plain = _compressed_indices(tensor)
        return {"compressed indices": compressed, "plain indices": plain, "values": tensor.values()}
    if not tensor.is_quantized:
        return {"values": tensor}
    if tensor.qscheme() == torch.per_tensor_affine:
        params = {
            "scale": torch.tensor([tensor.q_scale()], dtype=torch.float64),
            "zero point": torch.tensor([tensor.q_zero_point()]),
        }
    else:
        params = {
            "scales": tensor.q_per_channel_scales(),
            "zero points": tensor.q_per_channel_zero_points(),
            "axis": torch.tensor([tensor.q_per_channel_axis()]),
        }
    return {"integers": tensor.int_repr(), **params}


def _compressed_indices(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _COMPRESSED[tensor.layout][0] == 0:
        return tensor.crow_indices(), tensor.col_indices()
    return tensor.ccol_indices(), tensor.row_indices()


# ---------------------------------------------------------------------------------------------
# sparse tensors


def _part(value: Any, layout: torch.layout, what: str) -> torch.Tensor:
    if type(value) is not torch.Tensor or value.layout != torch.strided or value.is_quantized:
        raise CorruptCheckpointError(
            f"a sparse tensor's {what} is a {type(value).__name__}, not a plain tensor "
            f"(layout {layout})"
        )
    return value


def _same_device(parts: tuple[torch.Tensor, ...], layout: torch.layout) -> None:
    if len({p.device for p in parts}) > 1:
        raise CorruptCheckpointError(
            f"the parts of a sparse tensor ({layout}) are on different devices"
        )


def sparse_tensor(layout: Any, data: Any) -> tuple[torch.Tensor, Check]:
    """A sparse tensor of ``layout`` from ``data`` as ``torch.save`` writes it (COO: indices,
    values, size and whether it is coalesced; compressed: compressed and plain indices, values,
    size), and the check of its indices to run once their bytes are read."""
    if not isinstance(layout, torch.layout) or not isinstance(data, tuple):
        raise CorruptCheckpointError(
            f"a sparse tensor is rebuilt from {type(layout).__name__} and {type(data).__name__}, "
            "not a layout and a tuple"
        )
    try:
        if layout == torch.sparse_coo:
            return _coo(data)
        if layout in _COMPRESSED:
            return _compressed(layout, data)
    except RuntimeError as e:  # torch's constructor refuses what the checks here let through
        raise CorruptCheckpointError(
            f"a sparse tensor ({layout}) does not hold together: {e}"
        ) from e
    raise UnsupportedFormatError(f"sparse tensors of layout {layout} are not read")


def _mismatch(
    layout: torch.layout, size: tuple[int, ...], parts: dict[str, Any]
) -> CorruptCheckpointError:
    shapes = ", ".join(f"{name} of shape {list(p.shape)}" for name, p in parts.items())
    return CorruptCheckpointError(
        f"a sparse tensor ({layout}) of size {list(size)} has {shapes}, which do not fit together; "
        "the file is corrupt or crafted"
    )


def _coo(data: tuple[Any, ...]) -> tuple[torch.Tensor, Check]:
    layout = torch.sparse_coo
    if len(data) not in (3, 4):
        raise CorruptCheckpointError(
            f"a sparse COO tensor is saved with {len(data)} parts, not 3 or 4"
        )
    indices, values = _part(data[0], layout, "indices"), _part(data[1], layout, "values")
    size = check_shape(data[2], "size")
    coalesced = data[3] if len(data) == 4 else None
    if coalesced is not None and not isinstance(coalesced, bool):
        raise CorruptCheckpointError(
            f"a sparse COO tensor's is_coalesced {coalesced!r:.50} is not True or False"
        )
    _same_device((indices, values), layout)
    if indices.dtype != torch.int64:
        raise CorruptCheckpointError(
            f"a sparse COO tensor's indices are {indices.dtype}, not int64"
        )
    parts = {"indices": indices, "values": values}
    if indices.dim() != 2 or values.dim() < 1:
        raise _mismatch(layout, size, parts)
    sparse_dim, nnz = indices.shape
    if (
        values.shape[0] != nnz
        or len(size) != sparse_dim + values.dim() - 1
        or tuple(values.shape[1:]) != size[sparse_dim:]
    ):
        raise _mismatch(layout, size, parts)
    tensor = torch.sparse_coo_tensor(
        indices, values, size, check_invariants=False, is_coalesced=coalesced
    )

    def check() -> None:
        if tensor.device.type == "meta":
            return
        try:
            torch._validate_sparse_coo_tensor_args(
                tensor._indices(), tensor._values(), tensor.size(), tensor.is_coalesced(),
                check_pinning=False,
            )  # fmt: skip
        except RuntimeError as e:
            raise CorruptCheckpointError(
                f"a sparse COO tensor of size {list(size)} does not hold together: {e}"
            ) from None

    return tensor, check


def _compressed(layout: torch.layout, data: tuple[Any, ...]) -> tuple[torch.Tensor, Check]:
    if len(data) != 4:
        raise CorruptCheckpointError(
            f"a sparse {layout} tensor is saved with {len(data)} parts, not 4"
        )
    compressed = _part(data[0], layout, "compressed indices")
    plain = _part(data[1], layout, "plain indices")
    values = _part(data[2], layout, "values")
    size = check_shape(data[3], "size")
    _same_device((compressed, plain, values), layout)
    if compressed.dtype not in (torch.int32, torch.int64) or plain.dtype != compressed.dtype:
        raise CorruptCheckpointError(
            f"a sparse {layout} tensor's indices are {compressed.dtype} and {plain.dtype}, not "
            "both int32 or both int64"
        )
    parts = {"compressed indices": compressed, "plain indices": plain, "values": values}
    which, blocked = _COMPRESSED[layout]
    batch = compressed.dim() - 1
    block_dims = 2 if blocked else 0
    if batch < 0 or plain.dim() != batch + 1 or values.dim() < batch + 1 + block_dims:
        raise _mismatch(layout, size, parts)
    block = tuple(values.shape[batch + 1 : batch + 1 + block_dims]) if blocked else (1, 1)
    dense = tuple(values.shape[batch + 1 + block_dims :])
    if len(size) != batch + 2 + len(dense) or 0 in block:
        raise _mismatch(layout, size, parts)
    batch_shape, nnz = size[:batch], plain.shape[-1]
    extent, step = size[batch + which], block[which]
    if (
        size[batch] % block[0]
        or size[batch + 1] % block[1]
        or tuple(compressed.shape) != (*batch_shape, extent // step + 1)
        or tuple(plain.shape) != (*batch_shape, nnz)
        or tuple(values.shape[: batch + 1]) != (*batch_shape, nnz)
        or dense != size[batch + 2 :]
    ):
        raise _mismatch(layout, size, parts)
    tensor = torch.sparse_compressed_tensor(
        compressed, plain, values, size, layout=layout, check_invariants=False
    )

    def check() -> None:
        if tensor.device.type == "meta":
            return
        try:
            torch._validate_sparse_compressed_tensor_args(
                *_compressed_indices(tensor), tensor.values(), tensor.size(), layout,
                check_pinning=False,
            )  # fmt: skip
        except RuntimeError as e:
            raise CorruptCheckpointError(
                f"a sparse {layout} tensor of size {list(size)} does not hold together: {e}"
            ) from None

    return tensor, check


# ---------------------------------------------------------------------------------------------
# quantized tensors


def _scale(value: Any) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        scale = float(value) if number else math.nan
    except OverflowError:  # an integer beyond any float
        scale = math.inf
    if not math.isfinite(scale):
        raise CorruptCheckpointError(
            f"a quantized tensor's scale {value!r:.50} is not a finite number; the file is "
            "corrupt or crafted"
        )
    return scale


def _zero_point(value: Any, dtype: torch.dtype) -> int:
    _, low, high = QUANTIZED[dtype]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CorruptCheckpointError(
            f"a {dtype} tensor's zero point {value!r:.50} is not an integer from {low} to {high}"
        )
    return value


def quantized_tensor(
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    params: Any,
) -> tuple[torch.Tensor, Check | None]:
    """A quantized tensor of ``dtype`` over ``storage`` (the view already checked against it),
    with the quantization ``params`` as ``torch.save`` writes them: ``(per_tensor_affine, scale,
    zero_point)`` or ``(per_channel_affine, scales, zero_points, axis)``. Per channel, the check
    of the scales and zero points to run once their bytes are read comes with it."""
    if dtype not in QUANTIZED:
        raise CorruptCheckpointError(
            f"a quantized tensor is rebuilt over a storage of {dtype}, not of a quantized dtype"
        )
    scheme = params[0] if isinstance(params, tuple) and params else None
    meta = storage.device.type == "meta"
    if scheme is torch.per_tensor_affine and len(params) == 3:
        scale, zero_point = _scale(params[1]), _zero_point(params[2], dtype)
        if meta:  # quantized meta tensors have a shape and a dtype, no quantizer
            return torch.empty(shape, dtype=dtype, device="meta"), None
        tensor = torch._empty_affine_quantized(
            (0,), scale=scale, zero_point=zero_point, dtype=dtype, device=storage.device
        )
        return tensor.set_(storage, offset, shape, strides), None
    if (
        scheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams)
        and len(params) == 4
    ):
        return _per_channel(storage, dtype, offset, shape, strides, params[1:])
    raise CorruptCheckpointError(
        f"a quantized tensor's parameters {params!r:.100} are not those torch.save writes "
        "(per_tensor_affine, scale, zero point or per_channel_affine, scales, zero points, axis)"
    )


def _per_channel(
    storage: torch.UntypedStorage,
    dtype: torch.dtype,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    params: tuple[Any, ...],
) -> tuple[torch.Tensor, Check]:
    scales, zero_points, axis = params
    if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape):
        raise CorruptCheckpointError(
            f"a quantized tensor of size {list(shape)} is quantized along axis {axis!r:.50}, "
            "which it does not have"
        )
    channels = shape[axis]
    for what, part in (("scales", scales), ("zero points", zero_points)):
        if (
            type(part) is not torch.Tensor
            or part.layout != torch.strided
            or part.shape != (channels,)
            or not part.is_contiguous()
            or part.device != storage.device
        ):
            raise CorruptCheckpointError(
                f"a quantized tensor of size {list(shape)} along axis {axis} has {channels} "
                f"channels; its {what} are not a tensor of {channels} values beside it"
            )
    # As torch.save writes them; the quantizer then keeps these very tensors, read later.
    float_params = (scales.dtype, zero_points.dtype) == (torch.float32, torch.float32)
    if (scales.dtype, zero_points.dtype) != (torch.float64, torch.int64) and not float_params:
        raise CorruptCheckpointError(
            f"a quantized tensor's scales and zero points are {scales.dtype} and "
            f"{zero_points.dtype}, not float64 and int64 (or float32 and float32)"
        )
    if float_params and dtype != torch.quint8:
        # torch makes float zero points for quint8 only; others crash its kernels (SIGILL)
        raise CorruptCheckpointError(
            f"a {dtype} tensor quantized with float zero points, which torch makes for quint8 "
            "tensors only; the file is corrupt or crafted"
        )
    if storage.device.type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta"), lambda: None
    tensor = torch._empty_per_channel_affine_quantized(
        [0] * len(shape), scales=scales, zero_points=zero_points, axis=axis, dtype=dtype,
        device=storage.device,
    )  # fmt: skip
    tensor.set_(storage, offset, shape, strides)
    if channels and (
        tensor.q_per_channel_scales().data_ptr() != scales.data_ptr()
        or tensor.q_per_channel_zero_points().data_ptr() != zero_points.data_ptr()
    ):
        raise UnsupportedFormatError("this torch copies per-channel quantization parameters")
    _, low, high = QUANTIZED[dtype]

    def check() -> None:
        if not bool(torch.isfinite(scales).all()):
            raise CorruptCheckpointError(
                f"a quantized tensor of size {list(shape)} has per-channel scales that are not "
                "all finite numbers; the file is corrupt or crafted"
            )
        if float_params:
            bad = not bool(torch.isfinite(zero_points).all())
        else:
            bad = bool(((zero_points < low) | (zero_points > high)).any())
        if bad:
            raise CorruptCheckpointError(
                f"a {dtype} tensor of size {list(shape)} has per-channel zero points that are "
                f"not all {'finite numbers' if float_params else f'from {low} to {high}'}"
            )

    return tensor, check
