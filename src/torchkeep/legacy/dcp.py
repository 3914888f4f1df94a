"""Reading ``torch.distributed.checkpoint`` (DCP) directories in one process, running no code.

DCP writes ``.metadata``, a pickle of its ``Metadata`` (every key's dtype, size and chunks, and
where each chunk lies as ``(relative_path, offset, length)``), and ``__{rank}_{n}.distcp`` files
holding at those spans one ``torch.save`` zip per tensor chunk or non-tensor value. Nested state is
flattened to dotted keys; ``Metadata.planner_data`` maps each key back to its path.

``.metadata`` is unpickled with stand-ins for DCP's dataclasses (``dcp_metadata``); every span is
checked against the directory and its file, and every chunk against its tensor, before memory is
allocated; payloads are read through the one validated zip table (``torch_zip``) by the
restricted unpickler (``unpickler``).
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format import DCP_METADATA_FILE, tiles
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.memory import tensor_bytes
from torchkeep.legacy.dcp_metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
    read_metadata,
)
from torchkeep.legacy.rebuild import FileStorage
from torchkeep.legacy.torch_zip import DCP_PAYLOAD, ZipEntry, read_zip_table
from torchkeep.legacy.unpickler import storage_pid
from torchkeep.legacy.unpickler import unpickle as unpickle_payload
from torchkeep.storage import LocalSource

READ_THREADS = 2
READ_CHUNK = 16 << 20
_MAX_DEPTH = 64

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


class _Planner:
    def __init__(self, root: str, metadata: Metadata) -> None:
        self.root, self.real_root = root, os.path.realpath(root)
        self.where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        self.file_sizes: dict[str, int] = {}
        self.spans: dict[str, list[tuple[int, int, str]]] = {}
        if not isinstance(metadata.storage_data, dict):
            raise CorruptCheckpointError(f"{root}: the metadata has no storage table")
        for index, info in metadata.storage_data.items():
            if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
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
        if not isinstance(info, StorageInfo):
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
        if isinstance(meta, BytesStorageMetadata):
            return _Entry(fqn, None, (), (_Piece(*self.piece(fqn, None, 0), (), ()),))
        if not isinstance(meta, TensorStorageMetadata) or not isinstance(
            meta.properties, TensorProperties
        ):
            raise UnsupportedFormatError(f"{self.root}: '{fqn}' is a {type(meta).__name__}")
        dtype = meta.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"{self.root}: '{fqn}' has dtype {dtype!r:.80}")
        if meta.properties.layout not in (None, torch.strided):
            raise UnsupportedFormatError(f"{self.root}: '{fqn}' is a sparse tensor; not supported")
        size = _ints(meta.size, f"'{fqn}' size")
        chunks = meta.chunks if isinstance(meta.chunks, (list, tuple)) else ()
        if not chunks or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
            raise CorruptCheckpointError(f"{self.root}: '{fqn}' has no valid chunk list")
        boxes = [(_ints(c.offsets, fqn), _ints(c.sizes, fqn)) for c in chunks]
        if not tiles(size, boxes):
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


def _read_payload(source: LocalSource, piece: _Piece, what: str, verify: bool) -> Any:
    table = read_zip_table(source, what, DCP_PAYLOAD, offset=piece.offset, length=piece.length)
    storages: dict[str, tuple[FileStorage, ZipEntry]] = {}

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, what)
        if key not in storages:
            record = table.get(f"data/{key}")
            if record is None or numel * dtype.itemsize != record.size:
                raise CorruptCheckpointError(f"{what}: storage {key} is missing or mis-sized")
            # Bounded before allocating: the record lies inside the payload, inside the file.
            storages[key] = (FileStorage(key, torch.empty(numel, dtype=dtype)), record)
        return storages[key][0]

    data_pkl = table.entries[table.prefix + "data.pkl"]
    pickled = source.read(data_pkl.offset, data_pkl.size)
    if verify and data_pkl.crc is not None and zlib.crc32(pickled) != data_pkl.crc:
        raise CorruptCheckpointError(f"{what}: data.pkl does not match its CRC-32; corrupt")
    try:
        obj = unpickle_payload(pickled, storage, what)
    except UnsafeFileError as e:  # its `torchkeep scan` hint fits whole files only
        raise UnsafeFileError(str(e).split(". If you trust")[0]) from None
    items = [ReadItem(s.key, record.offset, s.data, None) for s, record in storages.values()]
    read_tensors(source, items, threads=READ_THREADS, chunk=READ_CHUNK, verify=False)
    for s, record in storages.values():
        crc = record.crc
        if verify and crc is not None and zlib.crc32(tensor_bytes(s.data)) != crc:
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
    metadata = read_metadata(root)
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
