"""Where bytes go: the ``Storage`` seam and ``LocalStorage``, the atomic local implementation.

A ``Storage`` writes whole files atomically (``write_file``), opens files for positional reads
(``open``), and commits directories built under a temporary name (``commit_dir``). The engine in
``torchkeep.io`` only sees ``Sink`` and ``Source`` objects, so tests inject faults by wrapping a
storage rather than patching internals.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from torchkeep.errors import CheckpointNotFoundError, StorageError, TorchkeepError

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class Sink(Protocol):
    """A file being written: positional writes from any thread."""

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""

    def written(self, offset: int, nbytes: int) -> None:
        """Hint that a range is complete, so the storage may start flushing it."""


class Source(Protocol):
    """A file being read: positional reads from any thread."""

    name: str
    size: int

    def readinto(self, buffers: list[memoryview], offset: int) -> None:
        """Fill ``buffers`` with consecutive bytes from ``offset``; raise on a short read."""

    def read(self, offset: int, nbytes: int) -> bytes:
        """Return ``nbytes`` bytes from ``offset``; raise on a short read."""

    def map(self) -> mmap.mmap:
        """Return a private copy-on-write mapping of the whole file."""

    def close(self) -> None:
        """Release the file."""


class Storage(Protocol):
    """The operations torchkeep needs from a file system or object store.

    ``atomic_dirs`` says whether ``commit_dir`` swaps a whole directory in at once (a local
    rename); where it does not (object stores), a directory save is built in place under
    object names no earlier save used, and its manifest, written last, commits it.
    """

    atomic_dirs: bool

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        """Create ``path`` holding ``size`` bytes written by ``fill``, atomically and durably."""

    def open(self, path: str) -> Source:
        """Open ``path`` for reading."""

    def exists(self, path: str) -> bool:
        """Return whether ``path`` exists."""

    def is_dir(self, path: str) -> bool:
        """Return whether ``path`` is a directory."""

    def staging_dir(self, path: str) -> str:
        """Create and return an empty directory beside ``path`` to build it in."""

    def commit_dir(self, staging: str, path: str) -> None:
        """Make the staging directory ``path`` atomically, replacing any previous one."""

    def remove_dir(self, path: str) -> None:
        """Remove a directory and everything in it."""

    def remove_file(self, path: str) -> None:
        """Remove one file, if it exists."""

    def make_dirs(self, path: str) -> None:
        """Create directory ``path`` and its parents, if missing."""

    def list_dir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted (none if it does not exist)."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def fsync_dir(path: str) -> None:
    """Make a rename or creation inside directory ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSink:
    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path

    def pwrite(self, data: memoryview, offset: int) -> None:
        view = data
        while len(view):
            try:
                n = os.pwrite(self._fd, view, offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise _storage_error(self._path, e) from e
            if n == 0:
                raise StorageError(errno.EIO, f"{self._path}: the disk accepted no bytes")
            view = view[n:]
            offset += n

    def written(self, offset: int, nbytes: int) -> None:
        # Start writeback of this range now, so the final fsync overlaps with later writes
        # instead of flushing the whole file at the end. A hint only: failures are ignored.
        if _LIBC is not None and nbytes > 0:
            _LIBC.sync_file_range(
                self._fd,
                ctypes.c_longlong(offset),
                ctypes.c_longlong(nbytes),
                ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
            )


class LocalSource:
    """A local file opened for positional reads."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{path}: no such file") from e
        except IsADirectoryError as e:
            raise CheckpointNotFoundError(f"{path}: is a directory, not a file") from e
        except OSError as e:
            raise StorageError(e.errno, f"{path}: cannot open for reading: {e.strerror}") from e
        self.size = os.fstat(self._fd).st_size

    def readinto(self, buffers: list[memoryview], offset: int) -> None:
        pending = [b for b in buffers if len(b)]
        while pending:
            try:
                n = os.preadv(self._fd, pending, offset)
            except InterruptedError:
                continue
            except OSError as e:
                raise StorageError(e.errno, f"{self.name}: read failed: {e.strerror}") from e
            if n == 0:
                raise StorageError(
                    errno.EIO, f"{self.name}: the file ended at {offset}; it was truncated"
                )
            offset += n
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if pending and n:
                pending[0] = pending[0][n:]

    def read(self, offset: int, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        self.readinto([memoryview(buffer)], offset)
        return bytes(buffer)

    def map(self) -> mmap.mmap:
        return mmap.mmap(self._fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        os.close(self._fd)


class LocalStorage:
    """Local files: each file written beside its target, fsynced, renamed, directory fsynced."""

    atomic_dirs = True

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError(errno.ENOENT, f"{path}: the directory {directory} does not exist")
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with _storage_errors(path):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with _storage_errors(path):
                    _preallocate(fd, size)
                fill(self._sink(fd, path))
                with _storage_errors(path):
                    self._fsync(fd)
            finally:
                os.close(fd)
            with _storage_errors(path):
                # Atomic: a reader sees the old file or the new one. A reader that mapped the
                # old file keeps its inode, so its data does not change under it.
                self._replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with _storage_errors(path):
            self._fsync_dir(directory)

    # The steps of the commit protocol, one method each, so that a test storage can fail any
    # one of them.

    def _sink(self, fd: int, path: str) -> Sink:
        return _FileSink(fd, path)

    def _fsync(self, fd: int) -> None:
        # An error here is final for this save: the kernel may have dropped the dirty pages,
        # so retrying fsync could report a success that is not one.
        os.fsync(fd)

    def _replace(self, tmp: str, path: str) -> None:
        os.replace(tmp, path)

    def _fsync_dir(self, directory: str) -> None:
        fsync_dir(directory)

    def open(self, path: str) -> LocalSource:
        return LocalSource(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def staging_dir(self, path: str) -> str:
        target = os.path.abspath(path.rstrip("/"))
        parent = os.path.dirname(target)
        with _storage_errors(path):
            os.makedirs(parent, exist_ok=True)
            staging = os.path.join(
                parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:12]}"
            )
            os.mkdir(staging)
        return staging

    def commit_dir(self, staging: str, path: str, *, replace_entry: bool = False) -> None:
        """Make the staging directory ``path`` atomically, replacing any previous directory;
        with ``replace_entry``, also a file or a link there (the link itself, never what it
        points to). Where the atomic exchange is unavailable the previous entry is first moved
        aside to ``<staging>.old``, which ``restore_or_remove`` puts back after a crash."""
        target = os.path.abspath(path.rstrip("/"))
        parent = os.path.dirname(target)
        with _storage_errors(path):
            fsync_dir(staging)
            if os.path.lexists(target):
                if not replace_entry and (not os.path.isdir(target) or os.path.islink(target)):
                    raise StorageError(
                        errno.EEXIST, f"{path}: exists and is not a directory; remove it first"
                    )
                if _exchange(staging, target):
                    fsync_dir(parent)
                    _remove_entry(staging)
                    fsync_dir(parent)
                    return
                old = f"{staging}.old"
                os.rename(target, old)
                os.rename(staging, target)
                fsync_dir(parent)
                _remove_entry(old)
            else:
                os.rename(staging, target)
            fsync_dir(parent)

    def remove_dir(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def remove_file(self, path: str) -> None:
        with _storage_errors(path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def make_dirs(self, path: str) -> None:
        with _storage_errors(path):
            os.makedirs(path, exist_ok=True)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _storage_error(path, e) from e


def _remove_entry(path: str) -> None:
    """Remove a directory tree, or a file or a link (not what it points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def restore_or_remove(
    leftover: str,
    target: str,
    whole: Callable[[str], bool],
    remove: Callable[[str], None] = _remove_entry,
) -> bool:
    """Deal with an entry a crash left beside ``target`` while replacing it: the previous
    version, moved aside (``….old``) by a two-rename replacement that was interrupted before the
    new one took its place, goes back when ``target`` is missing and ``whole(leftover)`` says it
    is intact; anything else is removed. Returns True when it was put back."""
    if leftover.endswith(".old") and not os.path.lexists(target):
        try:
            if whole(leftover):
                os.rename(leftover, target)
                fsync_dir(os.path.dirname(os.path.abspath(target)))
                return True
        except (TorchkeepError, OSError):
            pass
    with contextlib.suppress(OSError):
        remove(leftover)
    return False


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if _LIBC is None or not hasattr(_LIBC, "renameat2"):
        return False
    result = _LIBC.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE)
    return bool(result == 0)


def _preallocate(fd: int, size: int) -> None:
    # Reserve the blocks up front: a full disk fails here, before any data is written.
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise


@contextmanager
def _storage_errors(path: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise _storage_error(path, e) from e


def _storage_error(path: str, e: OSError) -> StorageError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = " (no space left for the file: free some disk)" if full else ""
    return StorageError(
        e.errno, f"{path}: {e.strerror or e}{hint}; the previous file, if any, is unchanged"
    )


DEFAULT_STORAGE = LocalStorage()
