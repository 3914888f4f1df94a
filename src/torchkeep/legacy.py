"""Reading ``torch.save`` files, and ``scan``.

Both the zip format (torch >= 1.6) and the older stream format are read; their pickles go through
``unpickler``'s restricted unpickler, which runs no code from the file. Storage sizes are checked
against the file before any memory is allocated for them, and tensor data is read with the
parallel engine straight into the storages. ``scan`` lists every global a file's pickles name.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from torchkeep.errors import (
    CorruptCheckpointError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format.detect import Kind, detect, readable
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.checksum import ZIP_CRC32
from torchkeep.storage import DEFAULT_STORAGE, LocalSource, storage_for
from torchkeep.unpickler import (
    ALLOWED_GLOBALS,
    FileStorage,
    Refused,
    RestrictedUnpickler,
    check_memo,
    scan_pickles,
    storage_pid,
    unpickle,
    unsafe_error,
)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_SCANNED_BYTES = 64 << 20  # of a refused pickle stream, read again to list its globals
READ_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------
# the zip format


@dataclass(frozen=True)
class _Record:
    name: str
    offset: int
    size: int
    crc: int


@dataclass
class _Archive:
    path: str
    prefix: str
    records: dict[str, _Record]
    file_size: int


def _open_zip(path: str) -> _Archive:
    file_size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable zip archive ({e})") from e
    code = [
        i.filename for i in infos if i.filename.split("/")[1:2] in (["code"], ["constants.pkl"])
    ]
    if code:
        raise UnsafeFileError(
            f"{path}: a TorchScript archive; it holds code ({code[0]}) that runs when it is "
            "loaded. torchkeep does not load TorchScript; save the model's state_dict from "
            "trusted code instead"
        )
    records: dict[str, _Record] = {}
    with open(path, "rb") as f:
        for info in infos:
            name = info.filename
            if name in records:
                raise CorruptCheckpointError(f"{path}: the archive holds '{name}' twice")
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                raise CorruptCheckpointError(f"{path}: archive entry '{name}' escapes the archive")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise UnsupportedFormatError(
                    f"{path}: entry '{name}' is compressed; torch.save never compresses, so the "
                    "file was not written by torch.save and is refused"
                )
            if not 0 <= info.header_offset <= file_size - 30:
                raise CorruptCheckpointError(
                    f"{path}: entry '{name}' starts at {info.header_offset}, outside the file; "
                    "the archive is corrupt"
                )
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(f"{path}: entry '{name}' has no local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            local_name = f.read(name_len)
            if local_name.decode("utf-8", "replace") != name:
                raise CorruptCheckpointError(
                    f"{path}: entry '{name}' has a mismatched local header"
                )
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > file_size:
                raise CorruptCheckpointError(
                    f"{path}: entry '{name}' runs past the end of the file; it was truncated"
                )
            records[name] = _Record(name, start, info.file_size, info.CRC)
    end = 0
    for record in sorted(records.values(), key=lambda r: r.offset):
        # Disjoint entries: no byte of the file may back two storages, so what is allocated
        # for them never exceeds the file's size.
        if record.offset < end:
            raise CorruptCheckpointError(
                f"{path}: entry '{record.name}' overlaps the previous entry; the archive is "
                "corrupt or crafted"
            )
        end = record.offset + record.size
    pickles = [n for n in records if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise UnsupportedFormatError(
            f"{path}: a zip archive without exactly one data.pkl; not a torch.save file"
        )
    prefix = pickles[0][: -len("data.pkl")]
    order = records.get(prefix + "byteorder")
    if order is not None:
        with open(path, "rb") as f:
            f.seek(order.offset)
            if f.read(min(order.size, 16)).strip() != b"little":
                raise UnsupportedFormatError(f"{path}: big-endian torch files are not supported")
    return _Archive(path, prefix, records, file_size)


def _read_record(archive: _Archive, record: _Record) -> bytes:
    with open(archive.path, "rb") as f:
        f.seek(record.offset)
        data = f.read(record.size)
    if len(data) != record.size:
        raise CorruptCheckpointError(f"{archive.path}: entry '{record.name}' is truncated")
    return data


@dataclass
class _Loaded:
    obj: Any
    storages: list[tuple[FileStorage, int, int, int | None]] = field(default_factory=list)


def _load_zip(path: str, *, meta: bool) -> _Loaded:
    """Unpickle a torch zip file; its storages are empty (filled later by the parallel read),
    or on the meta device with ``meta``."""
    archive = _open_zip(path)
    loaded = _Loaded(None)
    storages: dict[str, FileStorage] = {}

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, path)
        if key in storages:
            return storages[key]
        record = archive.records.get(f"{archive.prefix}data/{key}")
        if record is None:
            raise CorruptCheckpointError(f"{path}: storage {key} is missing from the archive")
        if numel * dtype.itemsize != record.size:
            raise CorruptCheckpointError(
                f"{path}: storage {key} claims {numel} × {dtype} but its entry holds "
                f"{record.size} bytes"
            )
        data = torch.empty(numel, dtype=dtype, device="meta" if meta else "cpu")
        storages[key] = FileStorage(key, data)
        loaded.storages.append((storages[key], record.offset, record.size, record.crc))
        return storages[key]

    pickled = archive.records[archive.prefix + "data.pkl"]
    loaded.obj = unpickle(_read_record(archive, pickled), storage, path)
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
        check_memo(stream, path)
        try:
            return RestrictedUnpickler(stream, storage).load()
        except Refused:
            stream.seek(start)
            raise unsafe_error(path, stream.read(MAX_SCANNED_BYTES)) from None
        except (CorruptCheckpointError, UnsupportedFormatError, UnsafeFileError):
            raise
        except Exception as e:
            raise CorruptCheckpointError(
                f"{path}: malformed pickle ({type(e).__name__}: {e})"
            ) from e

    def no_storage(pid: Any) -> FileStorage:
        raise CorruptCheckpointError(f"{path}: a storage reference outside the main object")

    if next_pickle(no_storage) != LEGACY_MAGIC:
        raise UnsupportedFormatError(f"{path}: a pickle, but not a torch.save file")
    if next_pickle(no_storage) != LEGACY_PROTOCOL:
        raise UnsupportedFormatError(f"{path}: unknown torch.save protocol version")
    info = next_pickle(no_storage)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsupportedFormatError(f"{path}: big-endian torch files are not supported")
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
            storages[key] = FileStorage(
                key, torch.empty(numel, dtype=dtype, device="meta" if meta else "cpu")
            )
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


def load_pickle_file(
    path: str, *, verify: bool = True, meta: bool = False, threads: int = 2
) -> Any:
    """Load a ``torch.save`` file without running code from it.

    With ``meta``, tensors come back on the meta device (shapes and dtypes, no data read).
    With ``verify``, every zip entry's CRC-32 is checked.

    Raises:
        UnsafeFileError: the file names a global outside the allowlist (all of them listed).
        CorruptCheckpointError, UnsupportedFormatError.
    """
    loaded = _load(path, meta=meta)
    if not meta and loaded.storages:
        _read_storages(path, loaded, verify=verify, threads=threads)
    return loaded.obj


class PendingLoad:
    """A ``torch.save`` file being read in the background: ``obj`` holds the tensors already
    (allocated), ``wait(tensor)`` blocks until that tensor's bytes are in, and ``finish()``
    waits for the whole read and raises its error (a CRC-32 mismatch, say), if any."""

    def __init__(self, path: str, *, verify: bool = True, threads: int = 2) -> None:
        loaded = _load(path, meta=False)
        self.obj = loaded.obj
        self._events = {
            s.data.untyped_storage().data_ptr(): threading.Event() for s, *_ in loaded.storages
        }
        self._error: BaseException | None = None

        def done(item: ReadItem) -> None:
            self._events[item.dest.untyped_storage().data_ptr()].set()

        def run() -> None:
            try:
                _read_storages(path, loaded, verify=verify, threads=threads, on_done=done)
            except BaseException as e:  # handed to finish(), in the caller's thread
                self._error = e
            finally:
                for event in self._events.values():
                    event.set()

        self._thread = threading.Thread(target=run, name="torchkeep-read", daemon=True)
        self._thread.start()

    def wait(self, tensor: torch.Tensor) -> None:
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


@dataclass(frozen=True)
class ScanReport:
    """What loading a file would import and call.

    Attributes:
        format: ``safetensors``, ``torch zip``, ``torch legacy``, ``torchscript`` or ``unknown``.
        globals: every global the file's pickles name (module.name), sorted.
        unsafe: those outside torchkeep's allowlist: loading with pickle would import and call them.
        safe: True when torchkeep can load the file without running any of its code.
    """

    path: str
    format: str
    globals: tuple[str, ...]
    unsafe: tuple[str, ...]
    safe: bool
    verdict: str


def _iter_zip_pickles(archive: _Archive) -> Iterator[tuple[str, bytes]]:
    for name, record in archive.records.items():
        if name.endswith(".pkl"):
            yield name, _read_record(archive, record)


def scan(
    source: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> ScanReport:
    """List every global a file's pickles would import and call, without running any of them.

    ``source`` may be a URL (``s3://…``, downloaded first) with its fsspec ``storage_options``.

    Example:
        ```python
        report = tk.scan("downloaded.pth")
        if not report.safe:
            print("would run:", report.unsafe)
        ```
    """
    storage, url = storage_for(source, storage_options)
    if storage.is_dir(url):
        raise UnsupportedFormatError(f"{url}: scan takes a file, not a directory")
    with readable(storage, url, download=True) as (_, path, kind):
        report = _scan(path, kind)
        return replace(report, path=url, verdict=report.verdict.replace(path, url))


def _scan(path: str, kind: Kind) -> ScanReport:
    names: list[str] = []
    problems: list[str] = []
    fmt = kind.value if kind.pickled else "safetensors"
    if kind is Kind.TORCH_ZIP:
        try:
            archive = _open_zip(path)
            for _, data in _iter_zip_pickles(archive):
                names += scan_pickles(data, problems)
        except UnsafeFileError as e:
            return ScanReport(path, "torchscript", (), (), False, f"unsafe: {e}")
        except (CorruptCheckpointError, UnsupportedFormatError) as e:
            return ScanReport(path, "zip", (), (), False, f"refused: {e}")
    elif kind is Kind.TORCH_LEGACY:
        with open(path, "rb") as f:
            # The pickles come first; the storage bytes after them need not be read.
            names = scan_pickles(f.read(MAX_SCANNED_BYTES), problems)
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        if len(head) < 16 or head[8:9] != b"{":
            return ScanReport(path, "unknown", (), (), False, "not a checkpoint torchkeep knows")
        return ScanReport(path, "safetensors", (), (), True, "safe: no pickle, no code")
    found = tuple(sorted(set(names)))
    unsafe = tuple(n for n in found if tuple(n.rsplit(".", 1)) not in ALLOWED_GLOBALS)
    if unsafe:
        verdict = f"unsafe: loading with pickle would import and call {', '.join(unsafe)}"
    elif problems:
        # Nothing to run was seen before the damage; what pickle makes of the rest is unknown.
        verdict = f"refused: a malformed pickle ({problems[0]}); torchkeep will not load it"
    else:
        verdict = "safe: only plain data; torchkeep loads it without running code"
    return ScanReport(path, fmt, found, unsafe, not unsafe and not problems, verdict)
