"""Reading ``torch.distributed.checkpoint`` (DCP) directories in one process, running no code.

DCP writes a directory: ``.metadata``, a pickle of its ``Metadata`` (the keys, each tensor's dtype,
size and chunks, and where each chunk lies as ``(relative_path, offset, length)``), and
``__{rank}_{n}.distcp`` files holding, at those spans, one ``torch.save`` payload per tensor chunk
or non-tensor value. Nested state is flattened to dotted keys; ``Metadata.planner_data`` maps each
key back to its path.

``.metadata`` is unpickled with stand-ins for DCP's dataclasses (``find_class`` imports nothing);
every span is checked against the directory and its file, and every chunk against its tensor,
before memory is allocated; payloads go through the restricted loader of ``legacy``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.memory import tensor_bytes
from torchkeep.legacy import _modern_name, _Refused, _scan_pickles, _Storage, _storage_pid, _unpickle
from torchkeep.storage import LocalSource

METADATA_NAME = ".metadata"
READ_THREADS = 2
READ_CHUNK = 16 << 20
_KNOWN_MAJOR_VERSIONS = ("0", "1")

# ---------------------------------------------------------------------------------------------
# stand-ins for DCP's metadata classes


class _Sealed(type):
    """Metaclass of the stand-ins: once sealed, a class takes no new attributes, so a pickle's
    BUILD aimed at the class itself cannot rewrite its methods for later loads."""

    def __setattr__(cls, name: str, value: Any) -> None:
        if cls.__dict__.get("_sealed_"):
            raise AttributeError(f"{cls.__name__} is read-only")
        super().__setattr__(name, value)

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


def _seal(cls: type) -> type:
    type.__setattr__(cls, "_sealed_", True)
    return cls


class _StandIn(metaclass=_Sealed):
    """Filled once from the pickle's BUILD state (a dict of fields); validated after loading."""

    _extra_ok: ClassVar[bool] = False

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and not state[1]:
            state = state[0]  # (dict, slot state) from classes with __slots__
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CorruptCheckpointError(f"DCP metadata: invalid state for {type(self).__name__}")
        if self.__dict__:
            raise CorruptCheckpointError(f"DCP metadata: {type(self).__name__} is built twice")
        known = [f for f in fields(self)]  # type: ignore[arg-type]
        unknown = sorted(set(state) - {f.name for f in known})
        if unknown and not self._extra_ok:
            raise UnsupportedFormatError(
                f"DCP metadata: {type(self).__name__} has fields {unknown} this version of "
                "torchkeep does not know; the checkpoint was written by a newer DCP layout"
            )
        for f in known:
            if f.name not in state and f.default is MISSING:
                raise CorruptCheckpointError(f"DCP metadata: {type(self).__name__} lacks {f.name}")
            object.__setattr__(self, f.name, state.get(f.name, f.default))


@_seal
@dataclass(frozen=True, eq=False)
class _Chunk(_StandIn):
    offsets: Any
    sizes: Any


@_seal
@dataclass(frozen=True, eq=False)
class _Properties(_StandIn):
    dtype: Any
    layout: Any = torch.strided
    requires_grad: Any = False
    memory_format: Any = torch.contiguous_format
    pin_memory: Any = False

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # DCP's own __getstate__
            state = dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
                             state, strict=True))  # fmt: skip
        super().__setstate__(state)


@_seal
@dataclass(frozen=True, eq=False)
class _TensorMeta(_StandIn):
    properties: Any
    size: Any
    chunks: Any


@_seal
@dataclass(frozen=True, eq=False)
class _BytesMeta(_StandIn):
    pass


@_seal
@dataclass(frozen=True)
class _Index(_StandIn):
    fqn: Any
    offset: Any = None
    index: Any = field(default=None, compare=False, hash=False)


@_seal
@dataclass(frozen=True, eq=False)
class _StorageInfo(_StandIn):
    relative_path: Any
    offset: Any
    length: Any
    transform_descriptors: Any = None


@_seal
@dataclass(frozen=True, eq=False)
class _StorageMeta(_StandIn):
    _extra_ok: ClassVar[bool] = True
    checkpoint_id: Any = None
    save_id: Any = None
    load_id: Any = None
    modules: Any = ()


@_seal
@dataclass(frozen=True, eq=False)
class _Metadata(_StandIn):
    state_dict_metadata: Any
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: Any = None
    version: Any = None


class _Layout(metaclass=_Sealed):
    """``torch.serialization._get_layout``: a layout by name."""

    def __new__(cls, name: Any) -> Any:
        value = getattr(torch, name[6:], None) if isinstance(name, str) else None
        if not isinstance(value, torch.layout) or not name.startswith("torch."):
            raise CorruptCheckpointError(f"DCP metadata: unknown layout {name!r:.80}")
        return value


class _MemoryFormat(metaclass=_Sealed):
    """DCP's ``_MEM_FORMAT_ENCODING`` enum, read as the memory format it encodes."""

    def __new__(cls, value: Any) -> Any:
        formats = (torch.contiguous_format, torch.channels_last, torch.preserve_format)
        if not isinstance(value, int) or not 0 <= value < len(formats):
            raise CorruptCheckpointError(f"DCP metadata: unknown memory format {value!r:.80}")
        return formats[value]


class _Path(metaclass=_Sealed):
    """A ``pathlib`` path (``StorageMeta.checkpoint_id``), read as a string."""

    def __new__(cls, *parts: Any) -> Any:
        if not all(isinstance(p, str) for p in parts):
            raise CorruptCheckpointError("DCP metadata: a path made of something but strings")
        return os.path.join(*parts) if parts else ""


def _metadata_globals() -> dict[tuple[str, str], Any]:
    dcp = "torch.distributed.checkpoint"
    table: dict[tuple[str, str], Any] = {
        (f"{dcp}.metadata", "Metadata"): _Metadata,
        (f"{dcp}.metadata", "TensorStorageMetadata"): _TensorMeta,
        (f"{dcp}.metadata", "BytesStorageMetadata"): _BytesMeta,
        (f"{dcp}.metadata", "ChunkStorageMetadata"): _Chunk,
        (f"{dcp}.metadata", "TensorProperties"): _Properties,
        (f"{dcp}.metadata", "MetadataIndex"): _Index,
        (f"{dcp}.metadata", "StorageMeta"): _StorageMeta,
        (f"{dcp}.metadata", "_MEM_FORMAT_ENCODING"): _MemoryFormat,
        (f"{dcp}.filesystem", "_StorageInfo"): _StorageInfo,
        ("torch.serialization", "_get_layout"): _Layout,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
            table[(module, name)] = _Path
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            table[("torch", name)] = value
    return table


METADATA_GLOBALS = _metadata_globals()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = METADATA_GLOBALS.get(_modern_name(module, name))
        if found is None:
            raise _Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpointError("DCP metadata: a persistent reference in a plain pickle")
