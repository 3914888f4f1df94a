"""The restricted unpickler that reads ``torch.save`` pickles without running code.

A ``torch.save`` file is a pickle: loading it with ``pickle`` runs whatever code it names. Here
it is unpickled by ``RestrictedUnpickler``, whose ``find_class`` never imports anything: it
returns torchkeep's own stand-ins from a fixed table of plain types (tensor rebuilders that
validate bounds, containers, numbers, dtypes, ``torch.Size``, numpy scalars, argparse
namespaces). Any other global ends the load with ``UnsafeFileError`` listing every global the
file names, found by ``_RecordingUnpickler``, which unpickles with inert placeholders.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import pickletools
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedFormatError

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


# ---------------------------------------------------------------------------------------------
# stand-ins: what the restricted unpickler hands out instead of importing


class _Sealed(type):
    """A metaclass whose classes cannot be changed: a pickle's BUILD opcode applied to an
    allowlisted class must not alter it for later loads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise UnsafeFileError(f"a pickle tried to change {cls.__name__}.{name}; refused")


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: torch.dtype


class _TensorType(metaclass=_Sealed):
    """Marks ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""


@dataclass(frozen=True, slots=True)
class FileStorage:
    """A storage the file holds: a flat tensor of ``numel`` elements, filled after unpickling."""

    key: str
    data: torch.Tensor


class AttributeDict(dict[str, Any], metaclass=_Sealed):
    """A dict whose items are also attributes: how torchkeep reads ``argparse.Namespace`` and
    Lightning's ``AttributeDict`` (plain data, saved again as a dict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


def _check_shape(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or len(values) > 64:
        raise CorruptCheckpointError(f"tensor {what} {values!r} is not a tuple of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CorruptCheckpointError(f"tensor {what} {values!r} must hold non-negative integers")
    return tuple(int(v) for v in values)


def _view(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None
) -> torch.Tensor:
    if not isinstance(storage, FileStorage):
        raise CorruptCheckpointError("a tensor is rebuilt from something that is not a storage")
    data = storage.data
    if dtype is not None and dtype != data.dtype:
        if data.dtype != torch.uint8 or data.numel() % dtype.itemsize:
            raise CorruptCheckpointError(f"storage {storage.key} cannot be viewed as {dtype}")
        data = data.view(dtype)
    shape = _check_shape(size, "size")
    strides = _check_shape(stride, "stride")
    if len(shape) != len(strides) or not isinstance(offset, int) or offset < 0:
        raise CorruptCheckpointError(
            f"storage {storage.key}: invalid view {offset}, {size}, {stride}"
        )
    if math.prod(shape) > data.numel():
        raise UnsupportedFormatError(
            f"a tensor of size {list(shape)} expands storage {storage.key} of {data.numel()} "
            "elements (stride 0); torchkeep does not rebuild expanded tensors from files, "
            "since their size is not bounded by the file. Save tensor.contiguous() instead"
        )
    if all(shape):
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= data.numel():
            raise CorruptCheckpointError(
                f"a tensor of size {list(shape)} reaches element {last} of storage {storage.key}, "
                f"which holds {data.numel()}"
            )
    return data.as_strided(shape, strides, offset)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _view(storage, offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    if metadata:
        raise UnsupportedFormatError("tensors with conj/neg metadata are not supported")
    return _view(storage, offset, size, stride, None)


def _rebuild_tensor_v3(
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
        raise CorruptCheckpointError(f"tensor dtype {dtype!r} is not a dtype")
    return _view(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> Any:
    if not isinstance(data, torch.Tensor):
        raise CorruptCheckpointError("a parameter is rebuilt from something that is not a tensor")
    return data


class _Function:
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


_REBUILD_TENSOR = _Function(_rebuild_tensor)
_REBUILD_TENSOR_V2 = _Function(_rebuild_tensor_v2)
_REBUILD_TENSOR_V3 = _Function(_rebuild_tensor_v3)
_REBUILD_PARAMETER = _Function(_rebuild_parameter)
_REBUILDERS = (_REBUILD_TENSOR, _REBUILD_TENSOR_V2, _REBUILD_TENSOR_V3, _REBUILD_PARAMETER)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in _REBUILDERS or new_type is not _TensorType or not isinstance(args, tuple):
        raise UnsafeFileError("a tensor subclass is rebuilt with a function outside the allowlist")
    return func(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles store bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError("_codecs.encode is allowed only to rebuild bytes")
    return text.encode("latin1")


class _NumpyDType(metaclass=_Sealed):
    """A numpy dtype, recorded as its spec string; numpy itself is never imported."""

    _FORMATS: ClassVar[dict[str, str]] = {
        "f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
        "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?",
    }  # fmt: skip

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if spec not in self._FORMATS:
            raise UnsupportedFormatError(f"numpy dtype {spec!r} is not supported")
        self.spec: str = spec
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = "<" if state[1] in ("|", "=") else state[1]

    def value(self, raw: bytes) -> int | float | bool:
        fmt = self.order + self._FORMATS[self.spec]
        if len(raw) != struct.calcsize(fmt):
            raise CorruptCheckpointError(f"numpy scalar of {self.spec} has {len(raw)} bytes")
        result: int | float | bool = struct.unpack(fmt, raw)[0]
        return result


def _numpy_scalar(dtype: Any, raw: Any = b"") -> int | float | bool:
    if not isinstance(dtype, _NumpyDType) or not isinstance(raw, bytes):
        raise CorruptCheckpointError("numpy scalar with an invalid dtype or payload")
    return dtype.value(raw)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _REBUILD_TENSOR,
        ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR_V2,
        ("torch._utils", "_rebuild_tensor_v3"): _REBUILD_TENSOR_V3,
        ("torch._utils", "_rebuild_parameter"): _REBUILD_PARAMETER,
        ("torch._utils", "_rebuild_parameter_with_state"): _REBUILD_PARAMETER,
        ("torch._tensor", "_rebuild_from_type_v2"): _Function(_rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorType,
        ("torch.nn.parameter", "Parameter"): _TensorType,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _Function(_codecs_encode),
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("argparse", "Namespace"): AttributeDict,
        ("numpy", "dtype"): _NumpyDType,
        ("numpy.core.multiarray", "scalar"): _Function(_numpy_scalar),
        ("numpy._core.multiarray", "scalar"): _Function(_numpy_scalar),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dtype)
    # torch.save names the untyped storage of newer dtypes (float8, uint16, …) by its module.
    table[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", torch.uint8)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    for module in (
        "lightning.fabric.utilities.data",
        "lightning_fabric.utilities.data",
        "pytorch_lightning.utilities.parsing",
    ):
        table[(module, "AttributeDict")] = AttributeDict
    return table


ALLOWED_GLOBALS = _allowed_globals()


# ---------------------------------------------------------------------------------------------
# the unpicklers


class Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")


def modern_name(module: str, name: str) -> tuple[str, str]:
    """Map a Python 2 name (protocol 0-2 pickles say ``__builtin__.set``) to Python 3's."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        mapped: tuple[str, str] = _compat_pickle.NAME_MAPPING[(module, name)]
        return mapped
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, storage: Callable[[Any], FileStorage]) -> None:
        super().__init__(file)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        module, name = modern_name(module, name)
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid)


class _Inert:
    """What ``scan`` hands out for every global: accepts anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, seen: list[str]) -> None:
        super().__init__(file)
        self._seen = seen

    def find_class(self, module: str, name: str) -> Any:
        module, name = modern_name(module, name)
        self._seen.append(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        return _Inert()


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def check_memo(stream: IO[bytes], where: str) -> None:
    """Walk the opcodes of the pickle at the stream's position with the reference parser
    (pickletools) without running them, then go back there. Refused: a pickle that parser
    rejects, and a memo index beyond the entries stored so far (the C unpickler sizes its memo
    to the largest index, so five bytes could make it fill gigabytes). A pickler numbers its
    entries in order, so no file it wrote is refused."""
    start = stream.tell()
    stored = 0
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in _MEMO_PUTS:
                if not isinstance(arg, int) or not 0 <= arg <= stored:
                    raise CorruptCheckpointError(
                        f"{where}: the pickle stores memo entry {arg!r:.20} after {stored} "
                        "entries; the file is corrupt or crafted"
                    )
                stored = max(stored, arg + 1)
            elif opcode.name == "MEMOIZE":
                stored += 1
    except (ValueError, MemoryError) as e:
        # Malformed by the reference parser. The C unpickler parses some opcodes more loosely
        # (an INT line cut by a NUL byte), so it could go on past this point: refuse here.
        raise CorruptCheckpointError(f"{where}: malformed pickle ({e})") from None
    finally:
        stream.seek(start)


def scan_pickles(data: bytes, problems: list[str] | None = None) -> list[str]:
    """The globals the pickles at the start of ``data`` name, none of them run. If the first
    pickle is malformed, why is added to ``problems`` (what follows the first, as the storage
    bytes of the pre-1.6 format, may well not be a pickle)."""
    seen: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        first = stream.tell() == 0
        try:
            check_memo(stream, "")
            _RecordingUnpickler(stream, seen).load()
        except Exception as e:
            if first and problems is not None:
                problems.append(str(e).removeprefix(": "))
            break
    return seen


def storage_pid(pid: Any, where: str) -> tuple[torch.dtype, str, int]:
    if (
        not isinstance(pid, tuple)
        or len(pid) not in (5, 6)
        or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)
        or not isinstance(pid[2], str)
        or not isinstance(pid[4], int)
        or pid[4] < 0
    ):
        raise CorruptCheckpointError(f"{where}: invalid storage reference {pid!r:.200}")
    if len(pid) == 6 and pid[5] is not None:
        raise UnsupportedFormatError(
            f"{where}: storage views of the pre-1.0 format are not supported"
        )
    return pid[1].dtype, pid[2], pid[4]


def unpickle(data: bytes, storage: Callable[[Any], FileStorage], where: str) -> Any:
    stream = io.BytesIO(data)
    check_memo(stream, where)
    try:
        obj = RestrictedUnpickler(stream, storage).load()
    except Refused:
        raise unsafe_error(where, data) from None
    except (CorruptCheckpointError, UnsupportedFormatError, UnsafeFileError) as e:
        if str(e).startswith(where):
            raise
        raise type(e)(f"{where}: {e}") from e  # raised while rebuilding, without the path
    except RecursionError as e:
        raise CorruptCheckpointError(f"{where}: the pickle is nested too deeply") from e
    except Exception as e:  # the pickle machine reports malformed input in many ways
        raise CorruptCheckpointError(f"{where}: malformed pickle ({type(e).__name__}: {e})") from e
    if stream.tell() != len(data):
        raise CorruptCheckpointError(
            f"{where}: {len(data) - stream.tell()} bytes follow the pickle; the file is corrupt"
        )
    return obj


def unsafe_error(where: str, data: bytes) -> UnsafeFileError:
    names = scan_pickles(data)
    bad = sorted({n for n in names if tuple(n.rsplit(".", 1)) not in ALLOWED_GLOBALS})
    return UnsafeFileError(
        f"{where}: loading it would import and call {', '.join(bad[:12])}"
        f"{' …' if len(bad) > 12 else ''}; refused, nothing was run. If you trust the file, "
        f"inspect it with `torchkeep scan {where}`"
    )
