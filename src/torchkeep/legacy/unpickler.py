"""The restricted unpickler that reads ``torch.save`` pickles without running code.

A ``torch.save`` file is a pickle: loading it with ``pickle`` runs whatever code it names. Here
it is unpickled by ``RestrictedUnpickler``, whose ``find_class`` never imports anything: it
returns torchkeep's own stand-ins from a fixed table of plain types (the tensor rebuilders of
``rebuild``, containers, numbers, dtypes, ``torch.Size``, numpy scalars, argparse namespaces).
Before it runs, the opcodes are walked without running them (``check_memo``): a BUILD that
would change anything but a container made by the pickle is refused. Any other global ends
the load with ``UnsafeFileError`` listing every global that would run code, found by
``_RecordingUnpickler``, which unpickles with inert placeholders; torch's own functions that
torchkeep does not read yet are named apart, never as code that would run (``classify``).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import torch

from torchkeep.errors import (
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.legacy.rebuild import (
    FileStorage,
    Function,
    ParameterType,
    Rebuilders,
    Sealed,
    TensorType,
)
from torchkeep.legacy.sparse_quantized import QSCHEMES, get_layout

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
    "QInt8Storage": torch.qint8,
    "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32,
}


# ---------------------------------------------------------------------------------------------
# stand-ins: what the restricted unpickler hands out instead of importing


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: torch.dtype


class AttributeDict(dict[str, Any], metaclass=Sealed):
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


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles store bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError("_codecs.encode is allowed only to rebuild bytes")
    return text.encode("latin1")


class _NumpyDType(metaclass=Sealed):
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


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    # Pickled as bytearray(bytes) or bytearray(text, "latin-1"); never from a length.
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin-1")
    raise CorruptCheckpointError("bytearray is allowed only to rebuild its bytes")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "Counter"): Counter,
        ("torch", "Tensor"): TensorType,
        ("torch.nn.parameter", "Parameter"): ParameterType,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): Function(_codecs_encode),
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("builtins", "bytearray"): Function(_bytearray),
        ("argparse", "Namespace"): AttributeDict,
        ("numpy", "dtype"): _NumpyDType,
        ("numpy.core.multiarray", "scalar"): Function(_numpy_scalar),
        ("numpy._core.multiarray", "scalar"): Function(_numpy_scalar),
        ("torch.serialization", "_get_layout"): Function(get_layout),
    }
    for name, scheme in QSCHEMES.items():
        table[("torch", name)] = scheme
    # The names of the tensor-rebuilding functions; each load has stand-ins of its own.
    table.update(Rebuilders(defer=False).table)
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
    """Unpickles with the stand-ins of ``ALLOWED_GLOBALS``, the tensor-rebuilding ones those
    of ``rebuilders``; each storage reference is ``storage(pid)``'s ``TypedStorage``."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        storage: Callable[[Any], FileStorage],
        rebuilders: Rebuilders,
    ) -> None:
        super().__init__(file)
        self._storage = storage
        self._rebuilders = rebuilders.table

    def find_class(self, module: str, name: str) -> Any:
        module, name = modern_name(module, name)
        found = self._rebuilders.get((module, name)) or ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid).typed


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
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_STRINGS = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8",
})  # fmt: skip
_MAKERS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"})
_FILLERS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"})  # keep their target

# The objects a pickle may change after making them (BUILD): what torch.save writes so.
BUILT = frozenset(
    {("collections", "OrderedDict"), ("argparse", "Namespace"), ("numpy", "dtype")}
    | {name for name, value in ALLOWED_GLOBALS.items() if value is AttributeDict}
)


class _Stack:
    """What each object on a pickle machine's stack is, as far as BUILD needs to know: a
    global (its name), an object made by calling one (``made`` and its name), a string (for
    STACK_GLOBAL), or something else (None)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[tuple[str, Any] | None] = []
        self.marks: list[int] = []
        self.memo: dict[int, tuple[str, Any] | None] = {}

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any, builds: frozenset[Any]) -> None:
        name, items = opcode.name, self.items
        if name == "MARK":
            self.marks.append(len(items))
            return
        if name in _MEMO_PUTS or name == "MEMOIZE":
            if items:
                self.memo[arg if name != "MEMOIZE" else len(self.memo)] = items[-1]
            return
        if name in _MEMO_GETS:
            items.append(self.memo.get(arg))
            return
        before = opcode.stack_before
        if pickletools.markobject in before:
            if not self.marks:
                raise CorruptCheckpointError(f"{self.where}: malformed pickle (no mark)")
            start = self.marks.pop() - before.index(pickletools.markobject)
        else:
            start = len(items) - len(before)
        if start < 0:
            raise CorruptCheckpointError(f"{self.where}: malformed pickle (stack underflow)")
        args = items[start:]
        del items[start:]
        made: tuple[str, Any] | None = None
        if name == "GLOBAL":
            made = ("global", modern_name(*str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL" and all(a and a[0] == "str" for a in args):
            made = ("global", modern_name(args[0][1], args[1][1]))  # type: ignore[index]
        elif name in _STRINGS:
            made = ("str", arg)
        elif name in _MAKERS and args and args[0] and args[0][0] == "global":
            made = ("made", args[0][1])
        elif name == "INST":
            made = ("made", modern_name(*str(arg).split(" ", 1)))
        elif name == "BUILD":
            target = args[0] if args else None
            # An object of a global outside the allowlist is refused when the global is
            # looked up, before this BUILD could run, naming the code it would run.
            refused = bool(target and target[0] == "made" and target[1] not in ALLOWED_GLOBALS)
            if not refused and (target is None or target[0] != "made" or target[1] not in builds):
                what = ".".join(target[1]) if target and target[0] != "str" else "an object"
                raise CorruptCheckpointError(
                    f"{self.where}: the pickle changes {what} after making it (BUILD), which "
                    "torch.save never does; the file is corrupt or crafted"
                )
            made = target
        elif name in _FILLERS and args:
            made = args[0]
        elif name == "DUP" and args:
            items.append(args[0])
            made = args[0]
        items.extend([made] * len(opcode.stack_after))


# How much of a pickle refused for its structure is scanned for code it would run.
MAX_REFUSAL_SCAN = 64 << 20


def check_memo(stream: IO[bytes], where: str, *, builds: frozenset[Any] | None = None) -> None:
    """Walk the opcodes of the pickle at the stream's position with the reference parser
    (pickletools) without running them, then go back there. Refused: a pickle that parser
    rejects, and a memo index beyond the entries stored so far (the C unpickler sizes its memo
    to the largest index, so five bytes could make it fill gigabytes). A pickler numbers its
    entries in order, so no file it wrote is refused. With ``builds``, also refused: a BUILD
    applied to anything but an object made by one of those globals (a tensor's ``__setstate__``
    could resize its storage to any size, a class's attributes would change for later loads),
    unless the object's global is outside the allowlist (then its lookup refuses the file)."""
    start = stream.tell()
    stored = 0
    stack = _Stack(where) if builds is not None else None
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
            if stack is not None and builds is not None:
                try:
                    stack.step(opcode, arg, builds)
                except CorruptCheckpointError:
                    stream.seek(start)  # code it would run is the first thing to say
                    named = stream.read(MAX_REFUSAL_SCAN)
                    if classify(scan_pickles(named))[0]:
                        raise refusal(where, named) from None
                    raise
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


def unpickle(
    data: bytes,
    storage: Callable[[Any], FileStorage],
    where: str,
    rebuilders: Rebuilders | None = None,
) -> Any:
    """Unpickle ``data`` without running code from it. Without ``rebuilders`` (whose
    ``materialize()`` the caller runs once the storages are read), conj/neg views are refused."""
    stream = io.BytesIO(data)
    check_memo(stream, where, builds=BUILT)
    try:
        obj = RestrictedUnpickler(stream, storage, rebuilders or Rebuilders(defer=False)).load()
    except Refused:
        raise refusal(where, data) from None
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


# What torch.load(weights_only=True) reads and torchkeep does not yet: torch's own functions
# and types, which run no code of the file's. They are never reported as code that would run.
TORCH_ONLY = frozenset(
    {
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch.storage.TypedStorage",
        "torch.QUInt4x2Storage",
        "torch.QUInt2x4Storage",
    }
    | {
        f"torch{where}.{t}{kind}"
        for where, kind in (
            ("", "Tensor"), (".cuda", "Tensor"), (".sparse", "Tensor"), (".cuda.sparse", "Tensor"),
            (".cuda", "Storage"),
        )
        for t in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
                  "Bool", "ComplexDouble", "ComplexFloat")
    }
)  # fmt: skip


def classify(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the globals a pickle names that torchkeep refuses into those that would run code
    outside torch (sorted) and torch's own that torchkeep does not read yet (sorted)."""
    refused = sorted({n for n in names if tuple(n.rsplit(".", 1)) not in ALLOWED_GLOBALS})
    return [n for n in refused if n not in TORCH_ONLY], [n for n in refused if n in TORCH_ONLY]


def refusal(where: str, data: bytes) -> TorchkeepError:
    """Why a pickle naming a global outside the allowlist is refused: UnsafeFileError listing
    the code it would run, or, when it names only torch's own functions that torchkeep does not
    read yet, UnsupportedFormatError naming them."""
    unsafe, unread = classify(scan_pickles(data))
    if not unsafe:
        return UnsupportedFormatError(
            f"{where}: it holds objects that torch rebuilds with {', '.join(unread[:12])}, which "
            "torchkeep does not read yet (they run no code of the file's); nothing was run. "
            "Load it with torch.load(path, weights_only=True), then save the state with tk.save"
        )
    return UnsafeFileError(
        f"{where}: loading it would import and call {', '.join(unsafe[:12])}"
        f"{' …' if len(unsafe) > 12 else ''}; refused, nothing was run. If you trust the file, "
        f"inspect it with `torchkeep scan {where}`"
    )
