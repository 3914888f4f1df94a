"""Tensors rebuilt from a ``torch.save`` pickle as ``torch.load(weights_only=True)`` returns them.

These are torchkeep's stand-ins for torch's rebuilding functions: plain tensors, parameters with
their ``requires_grad``, tensors' plain Python attributes, meta tensors, conj/neg views
(materialized once their storage is read), and sparse and quantized tensors (``sparse_quantized``;
what their stored bytes must satisfy is checked once those are read). Each checks what the file
claims (sizes against the storage, dtypes, flags) before anything is made. Storages are torch's
own ``TypedStorage``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedFormatError
from torchkeep.legacy.sparse_quantized import (
    QUANTIZED,
    Check,
    check_shape,
    quantized_tensor,
    sparse_tensor,
    storage_dtype,
)

_T = TypeVar("_T", bound=torch.Tensor)

MAX_ELEMENTS = 1 << 62  # of a meta tensor, which has no storage to bound it


class Sealed(type):
    """A metaclass whose classes cannot be changed: a pickle's BUILD opcode applied to an
    allowlisted class must not alter it for later loads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeFileError(f"a pickle tried to change {cls.__name__}.{name}; refused")


class Function:
    """An allowlisted function as the unpickler hands it out: callable, and immutable (no
    ``__dict__``, no ``__defaults__`` to rewrite, BUILD refused), so one file cannot change
    how the next is read."""

    __slots__ = ("_function",)
    _function: Callable[..., Any]

    def __init__(self, function: Callable[..., Any]) -> None:
        object.__setattr__(self, "_function", function)

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeFileError("a pickle tried to change an allowlisted function; refused")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeFileError("a pickle tried to change an allowlisted function; refused")


class TensorType(metaclass=Sealed):
    """Marks ``torch.Tensor`` in ``_rebuild_from_type_v2``."""


class ParameterType(metaclass=Sealed):
    """Marks ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``; called, as pickles of old
    torch releases do (``Parameter(data, requires_grad)``), it makes the parameter."""

    def __new__(cls, data: Any = None, requires_grad: Any = True) -> Any:
        return parameter(data, requires_grad)


@dataclass(frozen=True, slots=True)
class FileStorage:
    """A storage the file holds: ``data``, a flat tensor filled after unpickling, and
    ``typed``, the same memory as the ``torch.storage.TypedStorage`` of ``dtype`` (by default
    the data's) the pickle sees."""

    key: str
    data: torch.Tensor
    dtype: torch.dtype | None = None
    typed: torch.storage.TypedStorage = field(init=False)

    def __post_init__(self) -> None:
        typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=self.data.untyped_storage(),
            dtype=self.dtype or self.data.dtype,
            _internal=True,
        )
        object.__setattr__(self, "typed", typed)

    @classmethod
    def empty(cls, key: str, dtype: torch.dtype, numel: int, *, meta: bool) -> FileStorage:
        """A storage of ``numel`` elements of ``dtype`` to read into (a quantized dtype's bytes
        are held by a tensor of its integers)."""
        data = torch.empty(numel, dtype=storage_dtype(dtype), device="meta" if meta else "cpu")
        return cls(key, data, dtype)


def _check_flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise CorruptCheckpointError(f"tensor {what} {value!r:.50} is not True or False")
    return value


def _checked_view(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None
) -> tuple[torch.UntypedStorage, torch.dtype, int, tuple[int, ...], tuple[int, ...]]:
    untyped = getattr(storage, "_untyped_storage", None)
    base = getattr(storage, "dtype", None)
    if (
        not isinstance(storage, torch.storage.TypedStorage)
        or not isinstance(untyped, torch.UntypedStorage)
        or not isinstance(base, torch.dtype)
    ):
        raise CorruptCheckpointError("a tensor is rebuilt from something that is not a storage")
    dtype = base if dtype is None else dtype
    if dtype != base and (base != torch.uint8 or untyped.nbytes() % dtype.itemsize):
        raise CorruptCheckpointError(
            f"a storage of {untyped.nbytes()} bytes cannot be viewed as {dtype}"
        )
    numel = untyped.nbytes() // dtype.itemsize
    shape = check_shape(size, "size")
    strides = check_shape(stride, "stride")
    if len(shape) != len(strides) or not isinstance(offset, int) or offset < 0:
        raise CorruptCheckpointError(
            f"a storage of {numel} elements: invalid view {offset!r:.50}, {size!r:.200}, "
            f"{stride!r:.200}"
        )
    if math.prod(shape) > numel:
        raise UnsupportedFormatError(
            f"a tensor of size {list(shape)} expands a storage of {numel} elements (stride 0); "
            "torchkeep does not rebuild expanded tensors from files, since their size is not "
            "bounded by the file. Save tensor.contiguous() instead"
        )
    if all(shape):
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= numel:
            raise CorruptCheckpointError(
                f"a tensor of size {list(shape)} reaches element {last} of a storage of {numel}"
            )
    return untyped, dtype, offset, shape, strides


def _view(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None
) -> torch.Tensor:
    untyped, dtype, offset, shape, strides = _checked_view(storage, offset, size, stride, dtype)
    if dtype in QUANTIZED:
        raise CorruptCheckpointError(
            f"a plain tensor is rebuilt as {dtype}, which only quantized tensors are"
        )
    # As torch rebuilds it: a tensor of its own over the storage's memory, not a view of another.
    tensor = torch.empty((0,), dtype=dtype, device=untyped.device)
    return tensor.set_(untyped, offset, shape, strides)


def _with_grad(tensor: torch.Tensor, requires_grad: Any) -> torch.Tensor:
    if _check_flag(requires_grad, "requires_grad"):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            raise CorruptCheckpointError(
                f"a {tensor.dtype} tensor is saved as requiring gradients, which only "
                "floating-point and complex tensors can"
            )
        tensor.requires_grad_(True)
    return tensor


def parameter(data: Any, requires_grad: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise CorruptCheckpointError("a parameter is rebuilt from something that is not a tensor")
    if _check_flag(requires_grad, "requires_grad") and not (
        data.is_floating_point() or data.is_complex()
    ):
        raise CorruptCheckpointError(
            f"a {data.dtype} parameter is saved as requiring gradients, which only "
            "floating-point and complex tensors can"
        )
    return torch.nn.Parameter(data.detach(), requires_grad)


_PLAIN = (
    type(None), bool, int, float, complex, str, bytes, bytearray, slice,
    torch.dtype, torch.device, torch.Size, torch.Tensor, torch.storage.TypedStorage,
)  # fmt: skip


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data: scalars, strings, tensors, storages, dtypes, devices and
    containers of them (none of the unpickler's stand-ins, no class)."""
    stack, seen = [value], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, type):
            return False
        if isinstance(node, _PLAIN):
            continue
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        else:
            return False
    return True


def set_state(tensor: _T, state: Any) -> _T:
    """Give ``tensor`` the Python attributes saved with it (``t.foo = 3`` before
    ``torch.save``): plain data only, and none that would replace one of torch's own."""
    parts = state if isinstance(state, tuple) else (state, None)
    if len(parts) != 2:
        raise CorruptCheckpointError(f"a tensor's saved state {state!r:.100} is malformed")
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict):
            raise CorruptCheckpointError(f"a tensor's saved state {part!r:.100} is not a dict")
        for name, value in part.items():
            if not isinstance(name, str) or not name.isidentifier() or hasattr(type(tensor), name):
                raise CorruptCheckpointError(
                    f"a tensor's saved attribute {name!r:.50} would replace one of torch's; "
                    "the file is corrupt or crafted"
                )
            if not is_plain(value):
                raise CorruptCheckpointError(
                    f"a tensor's saved attribute {name!r} holds a {type(value).__name__}, "
                    "which is not plain data; the file is corrupt or crafted"
                )
            setattr(tensor, name, value)
    return tensor


# The materialized conj/neg views of a load may take this many times the memory of the
# storages they view (torch.save writes each view once; a file naming one many times is refused).
MAX_VIEW_COPIES = 2


class Rebuilders:
    """The tensor-rebuilding stand-ins of one load. With ``defer``, conj/neg views are
    materialized, and sparse and per-channel quantized tensors checked, by ``materialize()``
    once the storages are read; without, they are refused.

    Attributes:
        table: the stand-ins by (module, name), for the unpickler's ``find_class``.
        deferred: each materialized view's tensor, filled by ``materialize()``.
        composite: whether the load made a sparse or quantized tensor (several storages or
            quantization parameters beside one).
    """

    def __init__(self, *, defer: bool = True) -> None:
        self._defer = defer
        self._pending: list[tuple[torch.Tensor, torch.Tensor, bool, bool]] = []
        self._viewed: dict[int, int] = {}  # the bytes of each storage a materialized view views
        self._copied = 0  # the bytes of the materialized views
        self._checks: list[Check] = []
        self.composite = False
        tensor = Function(self._rebuild_tensor)
        tensor_v2 = Function(self._rebuild_tensor_v2)
        tensor_v3 = Function(self._rebuild_tensor_v3)
        param = Function(self._rebuild_parameter)
        param_with_state = Function(self._rebuild_parameter)
        meta = Function(self._rebuild_meta)
        qtensor = Function(self._rebuild_qtensor)
        sparse = Function(self._rebuild_sparse)
        self._functions = (
            tensor, tensor_v2, tensor_v3, param, param_with_state, meta, qtensor, sparse
        )  # fmt: skip
        self.table: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor"): tensor,
            ("torch._utils", "_rebuild_tensor_v2"): tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): tensor_v3,
            ("torch._utils", "_rebuild_parameter"): param,
            ("torch._utils", "_rebuild_parameter_with_state"): param_with_state,
            ("torch._utils", "_rebuild_meta_tensor_no_storage"): meta,
            ("torch._utils", "_rebuild_qtensor"): qtensor,
            ("torch._utils", "_rebuild_sparse_tensor"): sparse,
            ("torch._tensor", "_rebuild_from_type_v2"): Function(self._rebuild_from_type_v2),
        }

    @property
    def deferred(self) -> list[torch.Tensor]:
        return [out for out, *_ in self._pending]

    def materialize(self, where: str) -> None:
        """Fill each conj/neg view's tensor from its storage, then check what the bytes of
        sparse and quantized tensors must satisfy; the storages must have been read. A check
        that fails raises ``CorruptCheckpointError`` naming ``where``."""
        with torch.no_grad():
            for out, view, conj, neg in self._pending:
                value = view.conj() if conj else view
                out.copy_(value.neg() if neg else value)
        try:
            for check in self._checks:
                check()
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{where}: {e}") from None

    def _after_read(self, check: Check | None) -> None:
        if check is None:
            return
        if not self._defer:
            raise UnsupportedFormatError(
                "sparse and per-channel quantized tensors are not read here"
            )
        self._checks.append(check)

    def _resolved(self, view: torch.Tensor, metadata: Any) -> torch.Tensor:
        if not metadata:
            return view
        if (
            not isinstance(metadata, dict)
            or not set(metadata) <= {"conj", "neg"}
            or not all(isinstance(v, bool) for v in metadata.values())
        ):
            raise CorruptCheckpointError(f"tensor metadata {metadata!r:.100} is malformed")
        conj, neg = metadata.get("conj", False), metadata.get("neg", False)
        if conj and not view.is_complex():
            raise CorruptCheckpointError(f"a {view.dtype} tensor is saved as a conjugate view")
        if not (conj or neg):
            return view
        if not self._defer:
            raise UnsupportedFormatError("conj/neg views of tensors are not read here")
        if view.device.type != "meta":
            # Each view is materialized in memory of its own: bounded by the storages viewed,
            # so that a file cannot name one storage's views many times over.
            storage = view.untyped_storage()
            self._viewed[storage.data_ptr()] = storage.nbytes()
            self._copied += view.numel() * view.element_size()
            if self._copied > MAX_VIEW_COPIES * sum(self._viewed.values()) + (1 << 20):
                raise CorruptCheckpointError(
                    f"its conjugate and negative views would take over {MAX_VIEW_COPIES} "
                    "times the memory of the storages they view; the file is corrupt or crafted"
                )
        out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
        if out.device.type != "meta":
            self._pending.append((out, view, conj, neg))
        return out

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
        return _view(storage, offset, size, stride, None)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        metadata: Any = None,
    ) -> torch.Tensor:
        tensor = self._resolved(_view(storage, offset, size, stride, None), metadata)
        return _with_grad(tensor, requires_grad)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"tensor dtype {dtype!r:.50} is not a dtype")
        tensor = self._resolved(_view(storage, offset, size, stride, dtype), metadata)
        return _with_grad(tensor, requires_grad)

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any, hooks: Any, state: Any = None
    ) -> torch.nn.Parameter:
        # The hooks are never restored: torch.save writes them empty.
        result = parameter(data, requires_grad)
        return result if state is None else set_state(result, state)

    def _rebuild_meta(self, dtype: Any, size: Any, stride: Any, requires_grad: Any) -> Any:
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"tensor dtype {dtype!r:.50} is not a dtype")
        shape, strides = check_shape(size, "size"), check_shape(stride, "stride")
        if len(shape) != len(strides) or math.prod(shape) >= MAX_ELEMENTS:
            raise CorruptCheckpointError(
                f"a meta tensor of size {list(shape)} and stride {list(strides)} is malformed"
            )
        tensor = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
        return _with_grad(tensor, requires_grad)

    def _rebuild_qtensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        params: Any,
        requires_grad: Any,
        hooks: Any,
    ) -> torch.Tensor:
        untyped, dtype, offset, shape, strides = _checked_view(storage, offset, size, stride, None)
        if _check_flag(requires_grad, "requires_grad"):
            raise CorruptCheckpointError(
                "a quantized tensor is saved as requiring gradients, which quantized tensors cannot"
            )
        tensor, check = quantized_tensor(untyped, dtype, offset, shape, strides, params)
        self._after_read(check)
        self.composite = True
        return tensor

    def _rebuild_sparse(self, layout: Any, data: Any) -> torch.Tensor:
        tensor, check = sparse_tensor(layout, data)
        self._after_read(check)
        self.composite = True
        return tensor

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if (
            not any(func is f for f in self._functions)
            or not (new_type is TensorType or new_type is ParameterType)
            or not isinstance(args, tuple)
        ):
            raise UnsafeFileError(
                "a tensor subclass is rebuilt with a function outside the allowlist"
            )
        result = func(*args)
        if new_type is ParameterType and type(result) is not torch.nn.Parameter:
            result = parameter(result, result.requires_grad)
        elif new_type is TensorType and type(result) is not torch.Tensor:
            result = result.as_subclass(torch.Tensor)
        return set_state(result, state)
