"""The metadata of a ``torch.distributed.checkpoint`` (DCP) directory, read without running code.

DCP writes ``.metadata``, a pickle of its ``Metadata``: every key's dtype, size and chunks, and
where each chunk lies as ``(relative_path, offset, length)``. It is unpickled here with stand-ins
for DCP's dataclasses, named as DCP names them (``find_class`` imports nothing); what they hold
is checked where it is used (``dcp``).
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
from collections import OrderedDict
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedFormatError
from torchkeep.format import DCP_METADATA_FILE
from torchkeep.legacy.unpickler import Refused, check_memo, modern_name, scan_pickles

MAX_METADATA_BYTES = 256 << 20

# ---------------------------------------------------------------------------------------------
# stand-ins for DCP's metadata classes. find_class hands out only these classes (a BUILD aimed at
# a class itself calls __setstate__ unbound, and fails), bound methods of private dicts and
# immutable torch objects: no pickle can alter what the table gives a later load.


class _StandIn:
    """Filled once from the pickle's BUILD state, a dict of fields; checked where it is used."""

    _extra_ok: ClassVar[bool] = False

    def __setstate__(self, state: Any) -> None:
        name = type(self).__name__.lstrip("_")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CorruptCheckpointError(f"invalid state for {name}")
        if self.__dict__:
            raise CorruptCheckpointError(f"a {name} is built twice")
        known = fields(self)  # type: ignore[arg-type]
        unknown = sorted(set(state) - {f.name for f in known})
        if unknown and not self._extra_ok:
            raise UnsupportedFormatError(
                f"{name} has fields {unknown} torchkeep does not know: the checkpoint was written "
                "by a newer DCP. Upgrade torchkeep"
            )
        for f in known:
            if f.name not in state and f.default is MISSING:
                raise CorruptCheckpointError(f"a {name} lacks its {f.name}")
            object.__setattr__(self, f.name, state.get(f.name, f.default))


@dataclass(frozen=True, eq=False)
class ChunkStorageMetadata(_StandIn):
    offsets: Any
    sizes: Any


@dataclass(frozen=True, eq=False)
class TensorProperties(_StandIn):
    dtype: Any
    layout: Any = torch.strided
    requires_grad: Any = False
    memory_format: Any = torch.contiguous_format
    pin_memory: Any = False

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # DCP's TensorProperties.__getstate__
            state = dict(zip([f.name for f in fields(self)], state, strict=True))
        super().__setstate__(state)


@dataclass(frozen=True, eq=False)
class TensorStorageMetadata(_StandIn):
    properties: Any
    size: Any
    chunks: Any


@dataclass(frozen=True, eq=False)
class BytesStorageMetadata(_StandIn):
    pass


@dataclass(frozen=True)  # a dict key of Metadata.storage_data
class MetadataIndex(_StandIn):
    fqn: Any
    offset: Any = None
    index: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True, eq=False)
class StorageInfo(_StandIn):
    relative_path: Any
    offset: Any
    length: Any
    transform_descriptors: Any = None


@dataclass(frozen=True, eq=False)
class StorageMeta(_StandIn):
    _extra_ok: ClassVar[bool] = True  # informational only: fields added later are harmless
    checkpoint_id: Any = None
    save_id: Any = None
    load_id: Any = None
    modules: Any = ()


@dataclass(frozen=True, eq=False)
class Metadata(_StandIn):
    state_dict_metadata: Any
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: Any = None
    version: Any = None


class _Path(_StandIn):
    """A ``pathlib`` path (``StorageMeta.checkpoint_id``), read as a string."""

    def __new__(cls, *parts: Any) -> Any:
        if not all(isinstance(p, str) for p in parts):
            raise CorruptCheckpointError("a path made of something but strings")
        return os.path.join(*parts) if parts else ""


def _metadata_globals() -> dict[tuple[str, str], Any]:
    dcp = "torch.distributed.checkpoint.metadata"
    values = dict(vars(torch))  # no getattr: it would import torch's lazy submodules
    layouts = {f"torch.{k}": v for k, v in values.items() if isinstance(v, torch.layout)}
    formats = dict(enumerate((torch.contiguous_format, torch.channels_last, torch.preserve_format)))
    table: dict[tuple[str, str], Any] = {
        (dcp, "Metadata"): Metadata,
        (dcp, "TensorStorageMetadata"): TensorStorageMetadata,
        (dcp, "BytesStorageMetadata"): BytesStorageMetadata,
        (dcp, "ChunkStorageMetadata"): ChunkStorageMetadata,
        (dcp, "TensorProperties"): TensorProperties,
        (dcp, "MetadataIndex"): MetadataIndex,
        (dcp, "StorageMeta"): StorageMeta,
        (dcp, "_MEM_FORMAT_ENCODING"): formats.__getitem__,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): StorageInfo,
        ("torch.serialization", "_get_layout"): layouts.__getitem__,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for module, name in itertools.product(
        ("pathlib", "pathlib._local"),
        ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"),
    ):
        table[(module, name)] = _Path
    for name, value in values.items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            table[("torch", name)] = value
    return table


METADATA_GLOBALS = _metadata_globals()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = METADATA_GLOBALS.get(modern_name(module, name))
        if found is None:
            raise Refused(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptCheckpointError("a persistent reference in a plain pickle")


def read_metadata(root: str) -> Metadata:
    """Return the DCP metadata of the directory ``root``, unpickled without running code."""
    path = os.path.join(root, DCP_METADATA_FILE)
    if os.path.getsize(path) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(
            f"{path}: over {MAX_METADATA_BYTES} bytes, more than any DCP metadata; refused unread"
        )
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)
    check_memo(stream, path)
    try:
        metadata = _MetadataUnpickler(stream).load()
    except Refused:
        bad = {n for n in scan_pickles(data) if tuple(n.rsplit(".", 1)) not in METADATA_GLOBALS}
        raise UnsafeFileError(
            f"{path}: loading it would import and call {', '.join(sorted(bad)[:12])}; refused, "
            "nothing was run. DCP writes only its own dataclasses there: the file is not DCP's"
        ) from None
    except (CorruptCheckpointError, UnsupportedFormatError) as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # the pickle machine reports malformed input in many ways
        raise CorruptCheckpointError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from e
    if stream.tell() != len(data) or not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(f"{path}: not a DCP Metadata pickle, or bytes follow it")
    version = metadata.version
    if version is not None and (not isinstance(version, str) or version.split(".")[0] != "1"):
        raise UnsupportedFormatError(
            f"{path}: DCP metadata version {version!r:.40}; torchkeep reads 1.x. Upgrade torchkeep"
        )
    return metadata
