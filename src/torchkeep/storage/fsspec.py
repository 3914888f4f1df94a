"""Object storage through fsspec: ``FsspecStorage``, for ``s3://``, ``gs://``, ``memory://`` and
every other object store fsspec reaches (fsspec and the backend are the optional ``remote``
extra, imported by ``torchkeep.storage.route`` only for URLs).

Object stores have no rename, so nothing is built under a temporary name: a file is one object,
which appears whole or not at all when its upload completes; a directory save writes its data
objects under names no earlier save used and its manifest last, so the manifest's PUT is the
commit and a save that dies before it leaves nothing that lists as committed. Taking a
directory out of use is removing its commit marker.

Here objects are written with one ``pipe_file`` of the whole object and read with ranged
``cat_file``; ``torchkeep.storage.s3`` does better on S3. Every request to an async store runs
under a deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import errno
import logging
import mmap
from collections.abc import Callable, Coroutine
from typing import Any

from torchkeep.errors import CheckpointNotFoundError, StorageError, TorchkeepError
from torchkeep.storage.base import Leftover, Sink

log = logging.getLogger(__name__)

# Reads of consecutive tensors are merged into requests of up to REQUEST_BYTES (each request
# has a fixed cost, and some servers read the whole object for every range).
REQUEST_BYTES = 128 << 20
# Every request to an async store (S3) must finish within REQUEST_SECONDS plus the time its
# bytes take at MIN_BYTES_PER_SECOND, s3fs's own retries included; past that it is abandoned and
# the save or load fails with a StorageError. The clients' own timeouts do not cover every wait
# (a PUT waiting for "100 Continue" from an endpoint that never answers waits for ever).
REQUEST_SECONDS = 120.0
MIN_BYTES_PER_SECOND = 1 << 20


def remote_error(url: str, what: str, e: BaseException, *, write: bool) -> TorchkeepError:
    if isinstance(e, TorchkeepError):
        return e
    after = "; the previous checkpoint, if any, is unchanged" if write else ""
    if isinstance(e, FileNotFoundError):
        if write:  # what is missing is the bucket (or container) itself
            return StorageError(
                errno.ENOENT,
                f"{url}: {what} failed: its bucket does not exist ({e}); create it first{after}",
            )
        return CheckpointNotFoundError(f"{url}: no such object ({what})")
    if isinstance(e, Deadline):
        return StorageError(
            errno.ETIMEDOUT,
            f"{url}: {what} got no answer from the store within {e.seconds:.0f} s{after}",
        )
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
    cause = f"{type(e).__name__}: {e}".strip().rstrip(":")
    return StorageError(code, f"{url}: {what} failed: {cause}{after}")


class FsspecStorage:
    """A ``Storage`` on an fsspec file system. Directories are object-name prefixes."""

    atomic_dirs = False
    s3 = False  # S3Storage: multipart uploads and streamed ranged reads

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def call(
        self,
        url: str,
        what: str,
        method: str,
        *args: Any,
        nbytes: int = 0,
        write: bool = False,
        **kw: Any,
    ) -> Any:
        """Run the file system's ``method`` (its coroutine on async stores, under a deadline
        for ``nbytes`` of data); its failures become torchkeep's errors naming ``url``."""
        if getattr(self.fs, "async_impl", False):
            coro = getattr(self.fs, f"_{method}")(*args, **kw)
            return self.run(url, what, coro, nbytes=nbytes, write=write)
        try:
            return getattr(self.fs, method)(*args, **kw)
        except Exception as e:
            raise remote_error(url, what, e, write=write) from e

    def run(
        self,
        url: str,
        what: str,
        coro: Coroutine[Any, Any, Any],
        *,
        nbytes: int = 0,
        write: bool = False,
    ) -> Any:
        """Run a coroutine of the async client on fsspec's I/O loop and wait for it."""
        future = self.submit(coro, nbytes=nbytes)
        try:
            return future.result()
        except Exception as e:
            raise remote_error(url, what, e, write=write) from e
        except BaseException:  # KeyboardInterrupt: the request is abandoned, not left running
            future.cancel()
            raise

    def submit(
        self, coro: Coroutine[Any, Any, Any], *, nbytes: int = 0
    ) -> concurrent.futures.Future[Any]:
        """Start a coroutine on fsspec's I/O loop, under the deadline for ``nbytes``."""
        seconds = REQUEST_SECONDS + nbytes / MIN_BYTES_PER_SECOND
        return asyncio.run_coroutine_threadsafe(within(coro, seconds), self.fs.loop)

    # -- writing

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        upload = self._upload(path, size)
        try:
            fill(upload)
            upload.finish()
        except BaseException:
            upload.abort()
            raise
        self.fs.invalidate_cache(path)

    def _upload(self, path: str, size: int) -> Upload:
        return WholeUpload(self, path, size)

    def link_file(self, source: str, path: str) -> None:
        """Make ``path`` a copy of ``source`` made by the store itself (S3's CopyObject): the
        data is not sent again, and each directory owns its copy, so deleting one keeps the
        other whole."""
        self.fs.invalidate_cache(source)
        info = self.call(source, "looking up the file to share", "info", source)
        nbytes = int(info.get("size") or 0)  # the copy's deadline grows with its size
        self.call(path, f"copying {source} to", "copy", source, path, nbytes=nbytes, write=True)
        self.fs.invalidate_cache(path)

    def make_dirs(self, path: str) -> None:
        pass  # prefixes need no creating (and s3fs would create a missing bucket)

    def staging_dir(self, path: str) -> str:
        return path  # built in place: see the module's docstring

    def commit_dir(self, staging: str, path: str) -> None:
        pass  # the manifest, written last, committed it

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(CheckpointNotFoundError):
            self.call(path, "deleting", "rm_file", path)
        self.fs.invalidate_cache(path)

    def remove_dir(self, path: str) -> None:
        self.fs.invalidate_cache(path)
        try:
            self.call(path, "deleting", "rm", path, recursive=True)
        except CheckpointNotFoundError:
            pass
        except TorchkeepError as e:  # best effort, as for local directories
            log.warning("could not delete %s: %s", path, e)
        self.fs.invalidate_cache(path)

    # -- taking directories out of use, and what crashes leave

    def retire_dir(
        self, path: str, *, commit_marker: str | None = None, previous: bool = False
    ) -> str:
        """Remove ``path``'s commit marker: from then on it is no checkpoint, and its remains
        are ``path`` itself. Nothing is moved aside on an object store, so ``previous`` (a
        replacement's previous version, kept until the new one is in place) is refused."""
        if commit_marker is None or previous:
            raise ValueError(
                f"{path}: an object store has no rename: a directory is taken out of use by "
                "removing its commit marker, which must be named, and none is kept aside"
            )
        self.remove_file(f"{path.rstrip('/')}/{commit_marker}")
        return path

    def leftovers(self, directory: str) -> list[Leftover]:
        return []  # nothing is built under a temporary name here

    def recover(self, leftover: Leftover, whole: Callable[[str], bool]) -> bool:
        return False

    # -- reading

    def open(self, path: str) -> FsspecSource:
        return FsspecSource(self, path)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return bool(self.call(path, "looking up", "exists", path))

    def is_dir(self, path: str) -> bool:
        # One lookup (a HEAD for an object on S3), not a listing of the parent.
        self.fs.invalidate_cache(path)
        try:
            info = self.call(path, "looking up", "info", path)
        except CheckpointNotFoundError:
            return False
        return bool(info.get("type") == "directory")

    def list_dir(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        try:
            found = self.call(path, "listing", "ls", path, detail=False)
        except CheckpointNotFoundError:
            return []
        names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in found}
        return sorted(n for n in names if n)


class Deadline(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.0f} s")
        self.seconds = seconds


async def within(coro: Coroutine[Any, Any, Any], seconds: float) -> Any:
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:  # the caller gave up: so does the request
        await cancel(task)
        raise
    if not done:
        await cancel(task)
        raise Deadline(seconds)
    return task.result()


async def cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# uploads


class Upload:
    """A file being uploaded: the ``Sink`` that ``write_file`` fills."""

    def __init__(self, storage: FsspecStorage, url: str, size: int) -> None:
        self.storage = storage
        self.url = url
        self.size = size

    def pwrite(self, data: memoryview, offset: int) -> None:
        raise NotImplementedError

    def written(self, offset: int, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass

    def _check_range(self, data: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise StorageError(
                errno.EINVAL,
                f"{self.url}: a write of {len(data)} bytes at {offset} falls outside the "
                f"{self.size}-byte object",
            )


class WholeUpload(Upload):
    """The object is gathered in memory and sent in one call (small objects; backends other
    than S3)."""

    def __init__(self, storage: FsspecStorage, url: str, size: int) -> None:
        super().__init__(storage, url, size)
        self.buffer = bytearray(size)

    def pwrite(self, data: memoryview, offset: int) -> None:
        self._check_range(data, offset)
        self.buffer[offset : offset + len(data)] = data

    def finish(self) -> None:
        data = self.buffer
        self.storage.call(
            self.url, "uploading", "pipe_file", self.url, data, nbytes=len(data), write=True
        )
        self.buffer = bytearray()


# reads


class Scatter:
    """Consecutive destination buffers addressed as one run of bytes."""

    def __init__(self, buffers: list[memoryview]) -> None:
        self.buffers = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers]
        self.starts: list[int] = []
        position = 0
        for b in self.buffers:
            self.starts.append(position)
            position += len(b)
        self.size = position

    def put(self, position: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            i = bisect.bisect_right(self.starts, position) - 1
            while not len(self.buffers[i]):
                i += 1
            buffer = self.buffers[i]
            at = position - self.starts[i]
            n = min(len(view), len(buffer) - at)
            buffer[at : at + n] = view[:n]
            view = view[n:]
            position += n


class FsspecSource:
    """An object opened for positional reads."""

    def __init__(self, storage: FsspecStorage, url: str) -> None:
        self.storage = storage
        self.name = url
        info = storage.call(url, "opening", "info", url)
        if info.get("type") == "directory":
            raise CheckpointNotFoundError(f"{url}: is a directory, not a file")
        self.size = int(info["size"])
        self.request_bytes = REQUEST_BYTES

    def readinto(self, buffers: list[memoryview], offset: int) -> None:
        scatter = Scatter(buffers)
        if not scatter.size:
            return
        if offset + scatter.size > self.size:
            raise self.short(self.size)
        self._fill(scatter, offset)

    def _fill(self, scatter: Scatter, offset: int) -> None:
        data = self.storage.call(
            self.name,
            "reading",
            "cat_file",
            self.name,
            start=offset,
            end=offset + scatter.size,
        )
        if len(data) != scatter.size:
            raise self.short(offset + len(data))
        scatter.put(0, data)

    def short(self, at: int) -> StorageError:
        """The error of an object that ends at ``at``, before the bytes asked for."""
        return StorageError(errno.EIO, f"{self.name}: the object ended at {at}; it was truncated")

    def read(self, offset: int, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        self.readinto([memoryview(buffer)], offset)
        return bytes(buffer)

    def map(self) -> mmap.mmap:
        # Nothing to map on an object store: the object is read into anonymous memory.
        mapping = mmap.mmap(-1, max(self.size, 1))
        if self.size:
            self.readinto([memoryview(mapping)[: self.size]], 0)
        return mapping

    def close(self) -> None:
        pass
