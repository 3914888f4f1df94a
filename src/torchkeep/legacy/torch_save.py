"""Reading ``torch.save`` files.

Both the zip format (torch >= 1.6) and the older stream format are read; their pickles go through
``unpickler``'s restricted unpickler, which runs no code from the file. Storage sizes are checked
against the file before any memory is allocated for them, and tensor data is read with the
parallel engine straight into the storages.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.errors import (
    CorruptCheckpointError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format.detect import Kind, detect
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.checksum import ZIP_CRC32
from torchkeep.legacy.rebuild import FileStorage, Rebuilders
from torchkeep.legacy.torch_zip import read_file_entry, read_zip_file
from torchkeep.legacy.unpickler import (
    BUILT,
    Refused,
    RestrictedUnpickler,
    check_memo,
    classify,
    refusal,
    scan_pickles,
    storage_pid,
    unpickle,
)
from torchkeep.storage import DEFAULT_STORAGE, LocalSource

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_SCANNED_BYTES = 64 << 20  # of a refused pickle stream, read again to list its globals
READ_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------
# the zip format


@dataclass
class _Loaded:
    obj: Any
    storages: list[tuple[FileStorage, int, int, int | None]] = field(default_factory=list)
    # Conj/neg views, materialized, and sparse and quantized tensors, checked once the storages
    # are read.
    rebuilders: Rebuilders = field(default_factory=Rebuilders)
    big_endian: bool = False  # the storages' bytes are swapped as each is read


def _load_zip(path: str, *, meta: bool) -> _Loaded:
    """Unpickle a torch zip file; its storages are empty (filled later by the parallel read),
    or on the meta device with ``meta``."""
    archive = read_zip_file(path)
    loaded = _Loaded(None, big_endian=archive.big_endian)
    storages: dict[str, FileStorage] = {}

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, path)
        if key in storages:
            return storages[key]
        record = archive.get(f"data/{key}")
        if record is None:
            raise CorruptCheckpointError(f"{path}: storage {key} is missing from the archive")
        if numel * dtype.itemsize != record.size:
            raise CorruptCheckpointError(
                f"{path}: storage {key} claims {numel} × {dtype} but its entry holds "
                f"{record.size} bytes"
            )
        storages[key] = FileStorage.empty(key, dtype, numel, meta=meta)
        loaded.storages.append((storages[key], record.offset, record.size, record.crc))
        return storages[key]

    pickled = archive.entries[archive.prefix + "data.pkl"]
    loaded.obj = unpickle(read_file_entry(path, pickled), storage, path, loaded.rebuilders)
    return loaded


# ---------------------------------------------------------------------------------------------
# the pre-1.6 stream format


def _load_stream(path: str, *, meta: bool) -> _Loaded:
    file_size = os.path.getsize(path)
    with open(path, "rb") as stream:
        # The pickles come first and are read from the file as they are parsed; the storage
        # bytes after them are read later, straight into the tensors.
        return _read_stream(path, stream, file_size, meta=meta)


def _read_stream(path: str, stream: io.BufferedReader, file_size: int, *, meta: bool) -> _Loaded:
    loaded = _Loaded(None)
    storages: dict[str, FileStorage] = {}

    def next_pickle(storage: Callable[[Any], FileStorage]) -> Any:
        start = stream.tell()
        check_memo(stream, path, builds=BUILT)
        try:
            return RestrictedUnpickler(stream, storage, loaded.rebuilders).load()
        except Refused:
            stream.seek(start)
            raise refusal(path, stream.read(MAX_SCANNED_BYTES)) from None
        except (CorruptCheckpointError, UnsupportedFormatError, UnsafeFileError) as e:
            if str(e).startswith(path):
                raise
            raise type(e)(f"{path}: {e}") from e  # raised while rebuilding, without the path
        except Exception as e:
            raise CorruptCheckpointError(
                f"{path}: malformed pickle ({type(e).__name__}: {e})"
            ) from e

    def no_storage(pid: Any) -> FileStorage:
        raise CorruptCheckpointError(f"{path}: a storage reference outside the main object")

    if next_pickle(no_storage) != LEGACY_MAGIC:
        stream.seek(0)
        head = stream.read(MAX_SCANNED_BYTES)
        if classify(scan_pickles(head))[0]:  # a later pickle names code to run
            raise refusal(path, head)
        raise UnsupportedFormatError(f"{path}: a pickle, but not a torch.save file")
    if next_pickle(no_storage) != LEGACY_PROTOCOL:
        raise UnsupportedFormatError(f"{path}: unknown torch.save protocol version")
    info = next_pickle(no_storage)
    # torch writes a pre-1.6 file's storage sizes and bytes little-endian on every machine;
    # "little_endian" only says which machine it was.
    if not isinstance(info, dict) or not isinstance(info.get("little_endian"), bool):
        raise UnsupportedFormatError(
            f"{path}: its system information is not the dict torch.save writes"
        )
    wanted: dict[str, tuple[torch.dtype, int]] = {}
    claimed = [0]

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, path)
        if key not in storages:
            # Bounded before allocating: the bytes must fit in what is left of the file.
            claimed[0] += numel * dtype.itemsize
            if claimed[0] > file_size:
                raise CorruptCheckpointError(
                    f"{path}: its storages claim more bytes than the file holds (at {key})"
                )
            storages[key] = FileStorage.empty(key, dtype, numel, meta=meta)
            wanted[key] = (dtype, numel)
        return storages[key]

    loaded.obj = next_pickle(storage)
    keys = next_pickle(no_storage)
    if not isinstance(keys, list) or set(keys) != set(wanted) or len(keys) != len(wanted):
        raise CorruptCheckpointError(f"{path}: the storage list does not match the object")
    offset = stream.tell()
    for key in keys:
        dtype, numel = wanted[key]
        if offset + 8 > file_size:
            raise CorruptCheckpointError(f"{path}: the file ends before storage {key}")
        stream.seek(offset)
        (count,) = struct.unpack("<q", stream.read(8))
        nbytes = numel * dtype.itemsize
        if count != numel or offset + 8 + nbytes > file_size:
            raise CorruptCheckpointError(
                f"{path}: storage {key} should hold {numel} elements; the file says {count} or "
                "ends early"
            )
        loaded.storages.append((storages[key], offset + 8, nbytes, None))
        offset += 8 + nbytes
    if offset != file_size:
        raise CorruptCheckpointError(f"{path}: {file_size - offset} bytes follow the last storage")
    return loaded


# ---------------------------------------------------------------------------------------------
# public entry points


def _load(path: str, *, meta: bool) -> _Loaded:
    kind = detect(DEFAULT_STORAGE, path)
    if kind is Kind.TORCH_ZIP:
        return _load_zip(path, meta=meta)
    if kind is Kind.TORCH_LEGACY:
        return _load_stream(path, meta=meta)
    raise UnsupportedFormatError(f"{path}: not a torch.save file")


def _read_storages(
    path: str,
    loaded: _Loaded,
    *,
    verify: bool,
    threads: int,
    on_done: Callable[[ReadItem], None] | None = None,
) -> None:
    if loaded.big_endian:
        then = on_done

        def on_done(item: ReadItem) -> None:  # after its bytes are in and hashed as stored
            swap_bytes(item.dest)
            if then is not None:
                then(item)

    source = LocalSource(path)
    try:
        items = [
            ReadItem(s.key, offset, s.data, None if crc is None else f"{crc:08x}")
            for s, offset, _, crc in loaded.storages
        ]
        read_tensors(
            source,
            items,
            threads=threads,
            chunk=READ_CHUNK,
            verify=verify,
            checksum=ZIP_CRC32,
            on_done=on_done,
        )
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"{e} (a storage of this torch.save file does not match its CRC-32)"
        ) from e
    finally:
        source.close()


def swap_bytes(tensor: torch.Tensor) -> None:
    """Reverse the bytes of each value of ``tensor`` in place (each part of a complex value)."""
    size = tensor.element_size() // (2 if tensor.is_complex() else 1)
    if size > 1 and tensor.numel():
        grouped = tensor.view(torch.uint8).view(-1, size)
        grouped.copy_(grouped.flip(1))


def load_pickle_file(
    path: str, *, verify: bool = True, meta: bool = False, threads: int = 2
) -> Any:
    """Load a ``torch.save`` file without running code from it.

    With ``meta``, tensors come back on the meta device (shapes and dtypes, no data read).
    With ``verify``, every zip entry's CRC-32 is checked.

    Raises:
        UnsafeFileError: the file names code that unpickling it would run (all of it listed).
        UnsupportedFormatError: it holds objects torchkeep does not read yet (those that torch
            rebuilds with its own functions are named).
        CorruptCheckpointError: a size, a CRC-32 or the pickle does not hold together.
    """
    loaded = _load(path, meta=meta)
    if not meta and loaded.storages:
        _read_storages(path, loaded, verify=verify, threads=threads)
        loaded.rebuilders.materialize(path)
    return loaded.obj


class PendingLoad:
    """A ``torch.save`` file being read in the background: ``obj`` holds the tensors already
    (allocated), ``wait(tensor)`` blocks until that tensor's bytes are in, and ``finish()``
    waits for the whole read and raises its error (a CRC-32 mismatch, say), if any. A file
    holding sparse or quantized tensors is read whole first: they are made of several parts,
    which must all be read and checked before anything uses them."""

    def __init__(self, path: str, *, verify: bool = True, threads: int = 2) -> None:
        loaded = _load(path, meta=False)
        self.obj = loaded.obj
        # A conj/neg view's tensor is ready once the whole read is: it is made from the storages.
        made = [s.data for s, *_ in loaded.storages] + loaded.rebuilders.deferred
        self._events = {t.untyped_storage().data_ptr(): threading.Event() for t in made}
        self._error: BaseException | None = None

        def done(item: ReadItem) -> None:
            self._events[item.dest.untyped_storage().data_ptr()].set()

        def run() -> None:
            try:
                _read_storages(path, loaded, verify=verify, threads=threads, on_done=done)
                loaded.rebuilders.materialize(path)
            except BaseException as e:  # handed to finish(), in the caller's thread
                self._error = e
            finally:
                for event in self._events.values():
                    event.set()

        self._thread = threading.Thread(target=run, name="torchkeep-read", daemon=True)
        self._thread.start()
        if loaded.rebuilders.composite:
            self.finish()

    def wait(self, tensor: torch.Tensor) -> None:
        if tensor.layout == torch.strided:  # a sparse tensor's parts are read by now
            event = self._events.get(tensor.untyped_storage().data_ptr())
            if event is not None:
                event.wait()
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def finish_quietly(self) -> None:
        """Wait for the background read to end without raising: for cleanup after a failure
        that is already being reported."""
        self._thread.join()
