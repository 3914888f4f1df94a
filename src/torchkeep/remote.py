"""Object storage through fsspec: ``s3://``, ``gs://``, ``memory://`` and every other fsspec URL.

``storage_for(path, storage_options)`` picks the storage of a path: local paths get
``LocalStorage``; URLs get an ``FsspecStorage`` on the URL's fsspec file system (fsspec and the
backend, such as s3fs, are the optional ``remote`` extra, imported only here and only for URLs).

Object stores have no rename, so nothing is built under a temporary name: a file is one object,
which appears whole or not at all when its upload completes (an S3 multipart upload is
completed only after every part arrived, and aborted on any failure); a directory save writes
its data objects under names no earlier save used and its manifest last, so the manifest's PUT
is the commit and a save that dies before it leaves nothing that lists as committed.

On S3 (s3fs), uploads are multipart: writer threads copy their pieces into part buffers and
each full part is sent at once, several in flight; reads are ranged GETs, split and run
concurrently, each streamed into the destination tensor's memory as it arrives. Other backends
are written with one ``pipe_file`` of the whole object and read with ranged ``cat_file``.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import re
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

from torchkeep.errors import (
    CheckpointNotFoundError,
    MissingDependencyError,
    StorageError,
    TorchkeepError,
    UnsupportedFormatError,
)
from torchkeep.format import MANIFEST_FILE, SHARD_NAME, pickle_kind
from torchkeep.storage import DEFAULT_STORAGE, Sink, Storage

log = logging.getLogger(__name__)

INSTALL = "pip install 'torchkeep[remote]'"
# S3 parts: at least 5 MiB (but the last), at most 10,000 per object.
PART_BYTES = 32 << 20
FIRST_PART_BYTES = 5 << 20
MAX_PARTS = 10_000
# Parts uploading at once per file; with the part buffers being filled this bounds the memory
# of an upload to about (INFLIGHT_PARTS + writer threads + 1) parts.
INFLIGHT_PARTS = 4
# Reads of consecutive tensors are merged into requests of up to REQUEST_BYTES (each request
# has a fixed cost, and some servers read the whole object for every range), each cut into
# ranged GETs of at most READ_PIECE bytes fetched concurrently.
REQUEST_BYTES = 128 << 20
READ_PIECE = 64 << 20
# Every request to an async store (S3) must finish within REQUEST_SECONDS plus the time its
# bytes take at MIN_BYTES_PER_SECOND, s3fs's own retries included; past that it is abandoned and
# the save or load fails with a StorageError. The clients' own timeouts do not cover every wait
# (a PUT waiting for "100 Continue" from an endpoint that never answers waits for ever).
REQUEST_SECONDS = 120.0
MIN_BYTES_PER_SECOND = 1 << 20


# Object stores, where an object appears whole when its upload completes. Other fsspec file
# systems (sftp, hdfs, ftp, …) write a file in place, so a crash could leave a torn one: mount
# them and use a local path instead.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://…``) rather than a local path."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and (_SCHEME.fullmatch(scheme) is not None or "::" in scheme)


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def storage_for(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[Storage, str]:
    """Return the storage for ``path`` and the path as that storage names it.

    Raises:
        MissingDependencyError: a URL whose fsspec backend is not installed.
        UnsupportedFormatError: a URL scheme fsspec does not know.
        ValueError: ``storage_options`` for a local path.
    """
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_url(text):
        scheme, sep, rest = text.partition(":/")
        if sep and scheme.lower() in OBJECT_STORES and not isinstance(path, str):
            raise UnsupportedFormatError(
                f"{text}: looks like the URL {scheme}://{rest} made into a pathlib.Path, which "
                "drops a slash; pass URLs as strings"
            )
        if storage_options:
            raise ValueError(
                f"{text}: storage_options apply to URLs (s3://…, gs://…); this is a local path"
            )
        return DEFAULT_STORAGE, text
    protocol = text.partition("://")[0]
    if protocol.lower() not in OBJECT_STORES:
        raise UnsupportedFormatError(
            f"{text}: torchkeep writes checkpoints to object stores ({', '.join(OBJECT_STORES)}"
            f"://), where an object appears whole or not at all; {protocol}:// is not one. "
            "Mount it and use a local path"
        )
    if any(c in text for c in "*?["):
        raise UnsupportedFormatError(
            f"{text}: '*', '?' and '[' in a URL are wildcards to fsspec; rename the path"
        )
    fs = _filesystem(text, protocol, dict(storage_options or {}))
    return FsspecStorage(fs, protocol), text.rstrip("/")


def _filesystem(url: str, protocol: str, options: dict[str, Any]) -> Any:
    try:
        import fsspec
    except ImportError as e:
        raise MissingDependencyError(
            f"{url}: URLs are read and written through fsspec, which is not installed; "
            f"install it with: {INSTALL}"
        ) from e
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError as e:
        raise MissingDependencyError(
            f"{url}: the {protocol}:// backend of fsspec is not installed ({e}); install it "
            f"with: {INSTALL}" + ("" if protocol in ("s3", "s3a") else f" and {protocol}'s backend")
        ) from e
    except ValueError as e:
        raise UnsupportedFormatError(f"{url}: fsspec knows no {protocol}:// storage ({e})") from e
    except TypeError as e:
        raise ValueError(f"{url}: storage_options not accepted by {protocol}:// ({e})") from e


def _remote_error(url: str, what: str, e: BaseException, *, write: bool) -> TorchkeepError:
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
    if isinstance(e, _Deadline):
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

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        # s3fs: multipart uploads and streamed ranged reads through its async client.
        self.s3 = bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_call_s3")

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
            raise _remote_error(url, what, e, write=write) from e

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
            raise _remote_error(url, what, e, write=write) from e
        except BaseException:  # KeyboardInterrupt: the request is abandoned, not left running
            future.cancel()
            raise

    def submit(
        self, coro: Coroutine[Any, Any, Any], *, nbytes: int = 0
    ) -> concurrent.futures.Future[Any]:
        """Start a coroutine on fsspec's I/O loop, under the deadline for ``nbytes``."""
        seconds = REQUEST_SECONDS + nbytes / MIN_BYTES_PER_SECOND
        return asyncio.run_coroutine_threadsafe(_within(coro, seconds), self.fs.loop)

    # -- writing

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        upload: _Upload = (
            _MultipartUpload(self, path, size)
            if self.s3 and size > PART_BYTES
            else _WholeUpload(self, path, size)
        )
        try:
            fill(upload)
            upload.finish()
        except BaseException:
            upload.abort()
            raise
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


class _Deadline(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.0f} s")
        self.seconds = seconds


async def _within(coro: Coroutine[Any, Any, Any], seconds: float) -> Any:
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:  # the caller gave up: so does the request
        await _cancel(task)
        raise
    if not done:
        await _cancel(task)
        raise _Deadline(seconds)
    return task.result()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# uploads


class _Upload:
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


class _WholeUpload(_Upload):
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


class _MultipartUpload(_Upload):
    """An S3 multipart upload. The object is cut into fixed parts; writer threads copy their
    bytes into the part buffers, and a part is sent as soon as all its bytes arrived, while the
    writers go on. Completing the upload makes the object appear whole; aborting it (on any
    error) leaves the previous object, if any, as it was."""

    def __init__(self, storage: FsspecStorage, url: str, size: int) -> None:
        super().__init__(storage, url, size)
        fs = storage.fs
        self.bucket, self.key, _ = fs.split_path(url)
        # The first part holds the header, written last: it is kept to S3's smallest part size
        # so that little is left to send once the data is written.
        self.part = max(PART_BYTES, -(-size // (MAX_PARTS - 1)))
        self.first = min(FIRST_PART_BYTES, size)
        self.count = 1 + -(-(size - self.first) // self.part)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(INFLIGHT_PARTS)
        self._buffers: dict[int, bytearray] = {}
        self._filled: dict[int, int] = {}
        self._sent: dict[int, concurrent.futures.Future[Any]] = {}
        self._failed: BaseException | None = None
        self.upload_id: str | None = None
        created = storage.run(
            url, "starting the upload", self._call("create_multipart_upload"), write=True
        )
        self.upload_id = created["UploadId"]

    def _call(self, method: str, **kw: Any) -> Coroutine[Any, Any, Any]:
        """One request of this upload (the client's coroutine, not yet started)."""
        if self.upload_id is not None:
            kw["UploadId"] = self.upload_id
        coro: Coroutine[Any, Any, Any] = self.storage.fs._call_s3(
            method, Bucket=self.bucket, Key=self.key, **kw
        )
        return coro

    def _bounds(self, index: int) -> tuple[int, int]:
        if index == 0:
            return 0, self.first
        start = self.first + (index - 1) * self.part
        return start, min(start + self.part, self.size)

    def _index(self, offset: int) -> int:
        return 0 if offset < self.first else 1 + (offset - self.first) // self.part

    def pwrite(self, data: memoryview, offset: int) -> None:
        self._check_range(data, offset)
        self._raise_failure()
        end = offset + len(data)
        source = 0
        while offset < end:
            index = self._index(offset)
            start, stop = self._bounds(index)
            n = min(end, stop) - offset
            with self._lock:
                if index in self._sent:
                    raise StorageError(
                        errno.EINVAL, f"{self.url}: bytes at {offset} written twice"
                    )
                buffer = self._buffers.get(index)
                if buffer is None:
                    buffer = self._buffers[index] = bytearray(stop - start)
            buffer[offset - start : offset - start + n] = data[source : source + n]
            with self._lock:
                self._filled[index] = self._filled.get(index, 0) + n
                full = self._filled[index] >= stop - start
                if full:
                    del self._buffers[index]
            if full:
                self._send(index, buffer)
            offset += n
            source += n

    def _send(self, index: int, buffer: bytearray) -> None:
        self._slots.acquire()  # at most INFLIGHT_PARTS parts in flight: the writers wait
        try:
            future = self.storage.submit(
                self._call("upload_part", PartNumber=index + 1, Body=buffer), nbytes=len(buffer)
            )
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._done)
        with self._lock:
            self._sent[index] = future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None and self._failed is None:
            self._failed = future.exception()

    def _raise_failure(self) -> None:
        if self._failed is not None:
            error = _remote_error(self.url, "uploading a part", self._failed, write=True)
            raise error from self._failed

    def finish(self) -> None:
        # Parts never written in full (bytes no write covered) go as they are: zeros, as in a
        # local file.
        for index in range(self.count):
            if index not in self._sent:
                start, stop = self._bounds(index)
                buffer = self._buffers.pop(index) if index in self._buffers else None
                self._send(index, bytearray(stop - start) if buffer is None else buffer)
        parts = []
        for index in range(self.count):
            future = self._sent[index]
            try:
                etag = future.result()["ETag"]
            except Exception as e:
                error = _remote_error(self.url, f"uploading part {index + 1}", e, write=True)
                raise error from e
            parts.append({"PartNumber": index + 1, "ETag": etag})
        self.storage.run(
            self.url,
            "completing the upload",
            self._call("complete_multipart_upload", MultipartUpload={"Parts": parts}),
            write=True,
        )
        self.upload_id = None

    def abort(self) -> None:
        for future in list(self._sent.values()):
            future.cancel()
            with contextlib.suppress(Exception):
                future.result()
        self._buffers.clear()
        if self.upload_id is None:
            return
        try:
            self.storage.run(
                self.url,
                "aborting the upload",
                self._call("abort_multipart_upload"),
            )
        except TorchkeepError as e:  # the store removes abandoned uploads by its own rules
            log.warning("%s", e)
        self.upload_id = None


# ---------------------------------------------------------------------------------------------
# reads


class _Scatter:
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
        fs = storage.fs
        info = storage.call(url, "opening", "info", url)
        if info.get("type") == "directory":
            raise CheckpointNotFoundError(f"{url}: is a directory, not a file")
        self.size = int(info["size"])
        self.request_bytes = REQUEST_BYTES
        self._s3 = storage.s3
        if self._s3:
            self.bucket, self.key, _ = fs.split_path(url)

    def readinto(self, buffers: list[memoryview], offset: int) -> None:
        scatter = _Scatter(buffers)
        if not scatter.size:
            return
        self._check(offset, scatter.size)
        if self._s3:
            self.storage.run(
                self.name, "reading", self._fetch(scatter, offset), nbytes=scatter.size
            )
            return
        data = self.storage.call(
            self.name,
            "reading",
            "cat_file",
            self.name,
            start=offset,
            end=offset + scatter.size,
        )
        if len(data) != scatter.size:
            raise self._short(offset + len(data))
        scatter.put(0, data)

    def _check(self, offset: int, nbytes: int) -> None:
        if offset + nbytes > self.size:
            raise self._short(self.size)

    def _short(self, at: int) -> StorageError:
        return StorageError(errno.EIO, f"{self.name}: the object ended at {at}; it was truncated")

    async def _fetch(self, scatter: _Scatter, offset: int) -> None:
        pieces = [
            (start, min(start + READ_PIECE, scatter.size))
            for start in range(0, scatter.size, READ_PIECE)
        ]
        tasks = [
            asyncio.ensure_future(self._fetch_piece(scatter, offset, b, e)) for b, e in pieces
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # No piece may go on writing into the destination after this read has failed.
            await _cancel(*tasks)
            raise

    async def _fetch_piece(self, scatter: _Scatter, offset: int, begin: int, end: int) -> None:
        fs = self.storage.fs
        response = await fs._call_s3(
            "get_object",
            Bucket=self.bucket,
            Key=self.key,
            Range=f"bytes={offset + begin}-{offset + end - 1}",
        )
        body = response["Body"]
        position = begin
        try:
            # Each chunk goes into the destination as it arrives: no whole-range copy.
            while chunk := await body.read(1 << 20):
                if position + len(chunk) > end:
                    raise StorageError(errno.EIO, f"{self.name}: the store sent too many bytes")
                scatter.put(position, chunk)
                position += len(chunk)
        finally:
            body.close()
        if position != end:
            raise self._short(offset + position)

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


# ---------------------------------------------------------------------------------------------
# formats read from local files only


@contextlib.contextmanager
def readable(
    storage: Storage, path: str, *, download: bool = False
) -> Iterator[tuple[Storage, str]]:
    """Yield the storage and path to read ``path`` through.

    torchkeep's own saves and safetensors files are read from the store in place (unless
    ``download``). The formats parsed from local files (``torch.save`` pickles, Hugging Face
    and torch.distributed directories) are first downloaded to a temporary directory, removed
    afterwards.
    """
    if not isinstance(storage, FsspecStorage) or (not download and _in_place(storage, path)):
        yield storage, path
        return
    with tempfile.TemporaryDirectory(prefix="torchkeep-download-") as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1] or "download")
        log.info("downloading %s to %s to read it", path, local)
        size = storage.call(path, "sizing", "du", path)
        storage.call(path, "downloading", "get", path, local, recursive=True, nbytes=size)
        try:
            yield DEFAULT_STORAGE, local
        except TorchkeepError as e:
            # Errors name the object, not the temporary copy they were found in.
            if not any(isinstance(a, str) and local in a for a in e.args):
                raise
            args = [a.replace(local, path) if isinstance(a, str) else a for a in e.args]
            raise type(e)(*args) from e


def _in_place(storage: FsspecStorage, path: str) -> bool:
    if storage.is_dir(path):
        names = storage.list_dir(path)
        # A torchkeep directory, committed or (shards only) not: read where it is, so that an
        # uncommitted one is reported as such without downloading it.
        return MANIFEST_FILE in names or all(SHARD_NAME.fullmatch(n) for n in names)
    try:
        source = storage.open(path)
    except CheckpointNotFoundError:
        return True  # reading it raises the error that says so
    try:
        head = source.read(0, min(16, source.size))
    finally:
        source.close()
    return pickle_kind(head) is None
