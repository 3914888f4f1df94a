"""Reading ``torch.distributed.checkpoint`` (DCP) directories in one process, running no code.

DCP writes ``.metadata``, a pickle of its ``Metadata`` (every key's dtype, size and chunks, and
where each chunk lies as ``(relative_path, offset, length)``), and ``__{rank}_{n}.distcp`` files
holding at those spans one ``torch.save`` zip per tensor chunk or non-tensor value. Nested state is
flattened to dotted keys; ``Metadata.planner_data`` maps each key back to its path.

``.metadata`` is unpickled with stand-ins for DCP's dataclasses (``find_class`` imports nothing);
every span is checked against the directory and its file, and every chunk against its tensor,
before memory is allocated; payloads are read by the restricted unpickler (``torchkeep.unpickler``).
"""

from __future__ import annotations

import io
import itertools
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
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format import DCP_METADATA_FILE
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.memory import tensor_bytes
from torchkeep.storage import LocalSource
from torchkeep.unpickler import (
    FileStorage,
    Refused,
    check_memo,
    modern_name,
    scan_pickles,
    storage_pid,
)
from torchkeep.unpickler import unpickle as unpickle_payload

MAX_METADATA_BYTES = 256 << 20
READ_THREADS = 2
READ_CHUNK = 16 << 20
_MAX_DEPTH = 64

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
class _ChunkStorageMetadata(_StandIn):
    offsets: Any
    sizes: Any


@dataclass(frozen=True, eq=False)
class _TensorProperties(_StandIn):
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
class _TensorStorageMetadata(_StandIn):
    properties: Any
    size: Any
    chunks: Any


@dataclass(frozen=True, eq=False)
class _BytesStorageMetadata(_StandIn):
    pass


@dataclass(frozen=True)  # a dict key of Metadata.storage_data
class _MetadataIndex(_StandIn):
    fqn: Any
    offset: Any = None
    index: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True, eq=False)
class _StorageInfo(_StandIn):
    relative_path: Any
    offset: Any
    length: Any
    transform_descriptors: Any = None


@dataclass(frozen=True, eq=False)
class _StorageMeta(_StandIn):
    _extra_ok: ClassVar[bool] = True  # informational only: fields added later are harmless
    checkpoint_id: Any = None
    save_id: Any = None
    load_id: Any = None
    modules: Any = ()


@dataclass(frozen=True, eq=False)
class _Metadata(_StandIn):
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
        (dcp, "Metadata"): _Metadata,
        (dcp, "TensorStorageMetadata"): _TensorStorageMetadata,
        (dcp, "BytesStorageMetadata"): _BytesStorageMetadata,
        (dcp, "ChunkStorageMetadata"): _ChunkStorageMetadata,
        (dcp, "TensorProperties"): _TensorProperties,
        (dcp, "MetadataIndex"): _MetadataIndex,
        (dcp, "StorageMeta"): _StorageMeta,
        (dcp, "_MEM_FORMAT_ENCODING"): formats.__getitem__,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
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


def _read_metadata(root: str) -> _Metadata:
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
    if stream.tell() != len(data) or not isinstance(metadata, _Metadata):
        raise CorruptCheckpointError(f"{path}: not a DCP Metadata pickle, or bytes follow it")
    version = metadata.version
    if version is not None and (not isinstance(version, str) or version.split(".")[0] != "1"):
        raise UnsupportedFormatError(
            f"{path}: DCP metadata version {version!r:.40}; torchkeep reads 1.x. Upgrade torchkeep"
        )
    return metadata


# ---------------------------------------------------------------------------------------------
# the plan: every key checked against the metadata and the files before anything is allocated


@dataclass(frozen=True)
class _Piece:  # one torch.save payload: a chunk of a tensor, or a whole non-tensor value
    path: str
    offset: int
    length: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    fqn: str
    dtype: torch.dtype | None  # None: a non-tensor value
    size: tuple[int, ...]
    pieces: tuple[_Piece, ...]


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > _MAX_DEPTH:
        raise CorruptCheckpointError(f"{what}: {values!r:.100} is not a tuple of integers")
    if not all(type(v) is int and v >= 0 for v in values):
        raise CorruptCheckpointError(f"{what}: {values!r:.100} holds negative or non-integers")
    return tuple(values)


def _tiles(size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Return True when the boxes lie inside ``size``, cover it and do not overlap."""
    for o, s in boxes:
        if len(o) != len(size) or len(s) != len(size):
            return False
        if any(a + n > m for a, n, m in zip(o, s, size, strict=True)):
            return False
    if sum(math.prod(s) for _, s in boxes) != math.prod(size):
        return False
    boxes = sorted(b for b in boxes if b[0] and all(b[1]))  # empty boxes hold nothing
    for i, (o, s) in enumerate(boxes):
        for p, t in boxes[i + 1 :]:
            if p[0] >= o[0] + s[0]:
                break  # sorted by the first offset: no later box reaches back into this one
            if all(a < b + m and b < a + n for a, n, b, m in zip(o, s, p, t, strict=True)):
                return False
    return True


class _Planner:
    def __init__(self, root: str, metadata: _Metadata) -> None:
        self.root, self.real_root = root, os.path.realpath(root)
        self.where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        self.file_sizes: dict[str, int] = {}
        self.spans: dict[str, list[tuple[int, int, str]]] = {}
        if not isinstance(metadata.storage_data, dict):
            raise CorruptCheckpointError(f"{root}: the metadata has no storage table")
        for index, info in metadata.storage_data.items():
            if not isinstance(index, _MetadataIndex) or not isinstance(index.fqn, str):
                raise CorruptCheckpointError(f"{root}: invalid storage index {index!r:.100}")
            offset = None if index.offset is None else _ints(index.offset, index.fqn)
            self.where[(index.fqn, offset)] = info

    def file(self, rel: Any, fqn: str) -> str:
        ok = isinstance(rel, str) and rel and "\x00" not in rel and "\\" not in rel
        ok = ok and not os.path.isabs(rel) and ".." not in rel.split("/")
        path = os.path.join(self.root, rel) if ok else ""
        if not ok or not os.path.realpath(path).startswith(self.real_root + os.sep):
            raise CorruptCheckpointError(
                f"{self.root}: '{fqn}' is stored in {rel!r:.100}, outside the checkpoint "
                "directory; refused"
            )
        if path not in self.file_sizes:
            if not os.path.isfile(path):
                raise CorruptCheckpointError(
                    f"{path}: missing, yet '{fqn}' is stored in it; the checkpoint is incomplete. "
                    "Copy the file again from where the checkpoint was written"
                )
            self.file_sizes[path] = os.path.getsize(path)
        return path

    def piece(self, fqn: str, offsets: tuple[int, ...] | None, nbytes: int) -> tuple[str, int, int]:
        info, at = self.where.get((fqn, offsets)), "" if offsets is None else f" at {list(offsets)}"
        if not isinstance(info, _StorageInfo):
            raise CorruptCheckpointError(f"{self.root}: no storage entry for '{fqn}'{at}")
        if info.transform_descriptors:
            raise UnsupportedFormatError(
                f"{self.root}: '{fqn}' is stored through {info.transform_descriptors!r:.80} "
                "(DCP's experimental stream transforms, such as zstd); torchkeep does not read them"
            )
        path = self.file(info.relative_path, fqn)
        start, length = _ints((info.offset, info.length), f"'{fqn}'{at} span")
        # A payload holds at least its chunk's bytes: every allocation is bounded by the files.
        if start + length > self.file_sizes[path] or length < nbytes:
            raise CorruptCheckpointError(
                f"{path}: '{fqn}'{at} is stored at bytes {start}..{start + length} and needs "
                f"{nbytes}, but the file holds {self.file_sizes[path]}; truncated or corrupt"
            )
        self.spans.setdefault(path, []).append((start, length, fqn))
        return path, start, length

    def entry(self, fqn: Any, meta: Any) -> _Entry:
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"{self.root}: key {fqn!r:.100} is not a string")
        if isinstance(meta, _BytesStorageMetadata):
            return _Entry(fqn, None, (), (_Piece(*self.piece(fqn, None, 0), (), ()),))
        if not isinstance(meta, _TensorStorageMetadata) or not isinstance(
            meta.properties, _TensorProperties
        ):
            raise UnsupportedFormatError(f"{self.root}: '{fqn}' is a {type(meta).__name__}")
        dtype = meta.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"{self.root}: '{fqn}' has dtype {dtype!r:.80}")
        if meta.properties.layout not in (None, torch.strided):
            raise UnsupportedFormatError(f"{self.root}: '{fqn}' is a sparse tensor; not supported")
        size = _ints(meta.size, f"'{fqn}' size")
        chunks = meta.chunks if isinstance(meta.chunks, (list, tuple)) else ()
        if not chunks or not all(isinstance(c, _ChunkStorageMetadata) for c in chunks):
            raise CorruptCheckpointError(f"{self.root}: '{fqn}' has no valid chunk list")
        boxes = [(_ints(c.offsets, fqn), _ints(c.sizes, fqn)) for c in chunks]
        if not _tiles(size, boxes):
            raise CorruptCheckpointError(
                f"{self.root}: the chunks of '{fqn}' do not tile its size {list(size)}: "
                f"{boxes!r:.200}"
            )
        pieces = [(self.piece(fqn, o, math.prod(s) * dtype.itemsize), o, s) for o, s in boxes]
        return _Entry(fqn, dtype, size, tuple(_Piece(*at, o, s) for at, o, s in pieces))

    def check_spans(self) -> None:
        # Each byte of a file backs at most one allocation: spans may not share bytes.
        for path, spans in self.spans.items():
            for (a, n, first), (b, _, second) in itertools.pairwise(sorted(spans)):
                if b < a + n:
                    raise CorruptCheckpointError(f"{path}: '{first}' and '{second}' share bytes")


# ---------------------------------------------------------------------------------------------
# payloads: a torch.save zip at (offset, length) of a file


class _Window:
    """``length`` bytes at ``offset`` of a source, as the seekable file ``zipfile`` parses."""

    def __init__(self, source: LocalSource, offset: int, length: int) -> None:
        self.source, self.base, self.length, self.pos = source, offset, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.length)[whence]
        if self.pos < 0:
            raise OSError("seek before the start of the payload")
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n < 0 else min(n, self.length - self.pos)
        data = self.source.read(self.base + self.pos, max(n, 0))
        self.pos += len(data)
        return data


def _zip_records(source: LocalSource, piece: _Piece, what: str) -> dict[str, tuple[int, int, int]]:
    """Return the payload's entries, ``name -> (offset in the file, size, crc)``, prefix dropped."""
    try:
        with zipfile.ZipFile(_Window(source, piece.offset, piece.length)) as z:
            infos = z.infolist()
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        struct.error,
        NotImplementedError,
    ) as e:
        raise CorruptCheckpointError(f"{what}: not a torch.save payload ({e})") from e
    pickles = [i.filename for i in infos if i.filename.endswith("data.pkl")]
    if len(pickles) != 1 or pickles[0].count("/") != 1:
        raise CorruptCheckpointError(f"{what}: a zip without exactly one data.pkl")
    prefix = pickles[0].removesuffix("data.pkl")
    records: dict[str, tuple[int, int, int]] = {}
    for info in infos:
        name, head = info.filename.removeprefix(prefix), info.header_offset
        local = source.read(piece.offset + head, 30) if 0 <= head <= piece.length - 30 else b""
        start = piece.length + 1  # no local header: the entry cannot fit
        if local[:4] == b"PK\x03\x04":
            start = head + 30 + sum(struct.unpack("<HH", local[26:30]))
        if name in records or info.compress_type or start + info.file_size > piece.length:
            raise CorruptCheckpointError(f"{what}: entry '{name}' is repeated, compressed or cut")
        records[name] = (piece.offset + start, info.file_size, info.CRC)
    end = 0
    for offset, size, _ in sorted(records.values()):
        if offset < end:  # entries sharing bytes would let a small file claim a lot of memory
            raise CorruptCheckpointError(f"{what}: two entries of the payload overlap")
        end = offset + size
    order = records.get("byteorder")
    if order is not None and source.read(order[0], min(order[1], 16)).strip() != b"little":
        raise UnsupportedFormatError(f"{what}: big-endian payloads are not supported")
    return records


def _read_payload(source: LocalSource, piece: _Piece, what: str, verify: bool) -> Any:
    records = _zip_records(source, piece, what)
    storages: dict[str, tuple[FileStorage, tuple[int, int, int]]] = {}

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, what)
        if key not in storages:
            record = records.get(f"data/{key}")
            if record is None or numel * dtype.itemsize != record[1]:
                raise CorruptCheckpointError(f"{what}: storage {key} is missing or mis-sized")
            # Bounded before allocating: the record lies inside the payload, inside the file.
            storages[key] = (FileStorage(key, torch.empty(numel, dtype=dtype)), record)
        return storages[key][0]

    offset, size, crc = records["data.pkl"]
    pickled = source.read(offset, size)
    if verify and zlib.crc32(pickled) != crc:
        raise CorruptCheckpointError(f"{what}: data.pkl does not match its CRC-32; corrupt")
    try:
        obj = unpickle_payload(pickled, storage, what)
    except UnsafeFileError as e:  # its `torchkeep scan` hint fits whole files only
        raise UnsafeFileError(str(e).split(". If you trust")[0]) from None
    items = [ReadItem(s.key, record[0], s.data, None) for s, record in storages.values()]
    read_tensors(source, items, threads=READ_THREADS, chunk=READ_CHUNK, verify=False)
    for s, record in storages.values():
        if verify and zlib.crc32(tensor_bytes(s.data)) != record[2]:
            raise CorruptCheckpointError(f"{what}: storage {s.key} does not match its CRC-32")
    return obj


def _read_entry(entry: _Entry, sources: dict[str, LocalSource], verify: bool) -> Any:
    def read(piece: _Piece) -> Any:
        if piece.path not in sources:
            sources[piece.path] = LocalSource(piece.path)
        at = f" at {list(piece.offsets)}" if len(entry.pieces) > 1 else ""
        what = f"{piece.path}: '{entry.fqn}'{at} (bytes {piece.offset}+{piece.length})"
        value = _read_payload(sources[piece.path], piece, what, verify)
        if entry.dtype is not None and (
            not isinstance(value, torch.Tensor)
            or (value.dtype, tuple(value.shape)) != (entry.dtype, piece.sizes)
        ):
            raise CorruptCheckpointError(
                f"{what}: the payload is not a {entry.dtype} tensor of size {list(piece.sizes)}"
            )
        return value

    if entry.dtype is None or entry.pieces[0].sizes == entry.size:
        return read(entry.pieces[0])
    full = torch.empty(entry.size, dtype=entry.dtype)  # the chunks tile it: checked in the plan
    for piece in entry.pieces:
        region = tuple(slice(o, o + n) for o, n in zip(piece.offsets, piece.sizes, strict=True))
        full[region] = read(piece)
    return full


# ---------------------------------------------------------------------------------------------
# rebuilding the nesting from planner_data


def _nest(values: dict[str, Any], mapping: Any) -> dict[str, Any] | None:
    """Return ``values`` nested along DCP's ``planner_data`` paths; None when they do not fit."""
    if not isinstance(mapping, dict) or any(k not in mapping for k in values):
        return None
    root: dict[str, Any] = {}
    made, limit = {id(root)}, 64 * len(values) + 64  # list indices the metadata can justify
    for fqn, path in mapping.items():
        if fqn not in values:
            continue
        if not isinstance(path, tuple) or not 0 < len(path) <= _MAX_DEPTH:
            return None
        if ".".join(map(str, path)) != fqn:  # so no two keys share a path
            return None
        node: Any = root
        for key, following in itertools.pairwise((*path, None)):
            if isinstance(node, list):
                if type(key) is not int or not 0 <= key < limit:
                    return None
                node.extend([None] * (key + 1 - len(node)))
            elif not isinstance(key, str):
                return None
            current = node[key] if isinstance(node, list) else node.get(key)
            if following is None:  # the leaf: it may not land on a container made for others
                if id(current) in made:
                    return None
                node[key] = values[fqn]
            elif current is None:
                node[key] = {} if isinstance(following, str) else []
                node = node[key]
                made.add(id(node))
            elif id(current) in made:
                node = current
            else:
                return None  # a path runs through a saved value
    return root


# ---------------------------------------------------------------------------------------------
# public entry points


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    """Return True when ``path`` is a directory holding a DCP ``.metadata`` file."""
    return os.path.isfile(os.path.join(os.fspath(path), DCP_METADATA_FILE))


def load_dcp(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Load a ``torch.distributed.checkpoint`` directory in one process, without running code.

    Tensors saved in chunks (sharded over ranks) come back whole, on the CPU; non-tensor values
    come back through torchkeep's restricted loader. Nested state comes back nested as it was
    saved, with DCP's changes: dict keys are strings (optimizer state ``0`` becomes ``"0"``) and
    empty dicts are gone. Without a usable nesting map the keys are DCP's dotted names.

    Args:
        path: the checkpoint directory (``checkpoint_id`` of ``dcp.save``).
        verify: check the CRC-32 of every payload entry.

    Returns:
        The saved state: tensors and values in nested dicts and lists.

    Raises:
        CheckpointNotFoundError: no such directory, or not a DCP checkpoint.
        IncompleteCheckpointError: ``.distcp`` files and no ``.metadata``: a save never committed.
        UnsafeFileError: a pickle names a global outside the allowlist (named in the message).
        CorruptCheckpointError: a missing or truncated file, a span outside its file or the
            directory, chunks that do not tile their tensor, a CRC mismatch.
        UnsupportedFormatError: a newer metadata layout, compressed or sparse entries.

    Example:
        ```python
        state = load_dcp("checkpoints/step_1000")
        model.load_state_dict(state["model"])
        ```
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{root}: no such directory")
    if not is_dcp_dir(root):
        if any(name.endswith((".distcp", ".metadata")) for name in os.listdir(root)):
            raise IncompleteCheckpointError(
                f"{root}: .distcp files but no .metadata: the DCP save never committed, or it "
                "was saved without collectives (one metadata per rank, not read). Use another step"
            )
        raise CheckpointNotFoundError(f"{root}: not a torch.distributed.checkpoint directory")
    metadata = _read_metadata(root)
    if not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{root}: the metadata lists no keys")
    planner = _Planner(root, metadata)
    entries = [planner.entry(k, m) for k, m in metadata.state_dict_metadata.items()]
    planner.check_spans()
    sources: dict[str, LocalSource] = {}
    try:
        values = {entry.fqn: _read_entry(entry, sources, verify) for entry in entries}
    finally:
        for source in sources.values():
            source.close()
    nested = _nest(values, metadata.planner_data)
    return nested if nested is not None else values
