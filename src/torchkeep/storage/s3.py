"""S3 through s3fs's async client: multipart uploads and streamed, concurrent ranged reads.

Uploads are multipart: writer threads copy their pieces into part buffers and each full part is
sent at once, several in flight; completing the upload makes the object appear whole, and any
failure aborts it, leaving the previous object as it was. Reads are ranged GETs, split and run
concurrently, each streamed into the destination tensor's memory as it arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import threading
from collections.abc import Coroutine
from typing import Any

from torchkeep.errors import StorageError, TorchkeepError
from torchkeep.storage.fsspec import (
    FsspecSource,
    FsspecStorage,
    Scatter,
    Upload,
    cancel,
    remote_error,
)

log = logging.getLogger(__name__)

# S3 parts: at least 5 MiB (but the last), at most 10,000 per object.
PART_BYTES = 32 << 20
FIRST_PART_BYTES = 5 << 20
MAX_PARTS = 10_000
# Parts uploading at once per file; with the part buffers being filled this bounds the memory
# of an upload to about (INFLIGHT_PARTS + writer threads + 1) parts.
INFLIGHT_PARTS = 4
# Each read request is cut into ranged GETs of at most READ_PIECE bytes, fetched concurrently.
READ_PIECE = 64 << 20


class MultipartUpload(Upload):
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
                    raise StorageError(errno.EINVAL, f"{self.url}: bytes at {offset} written twice")
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
            error = remote_error(self.url, "uploading a part", self._failed, write=True)
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
                error = remote_error(self.url, f"uploading part {index + 1}", e, write=True)
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


class S3Storage(FsspecStorage):
    """An ``FsspecStorage`` on s3fs: large objects go up as multipart uploads, and reads are
    concurrent ranged GETs streamed into place."""

    s3 = True

    @staticmethod
    def fits(fs: Any) -> bool:
        """Whether ``fs`` is s3fs's async file system, whose client this storage calls."""
        return bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_call_s3")

    def _upload(self, path: str, size: int) -> Upload:
        if size > PART_BYTES:
            return MultipartUpload(self, path, size)
        return super()._upload(path, size)

    def open(self, path: str) -> FsspecSource:
        return S3Source(self, path)


class S3Source(FsspecSource):
    """An S3 object opened for positional reads through ranged GETs."""

    def __init__(self, storage: FsspecStorage, url: str) -> None:
        super().__init__(storage, url)
        self.bucket, self.key, _ = storage.fs.split_path(url)

    def _fill(self, scatter: Scatter, offset: int) -> None:
        self.storage.run(self.name, "reading", self._fetch(scatter, offset), nbytes=scatter.size)

    async def _fetch(self, scatter: Scatter, offset: int) -> None:
        pieces = [
            (start, min(start + READ_PIECE, scatter.size))
            for start in range(0, scatter.size, READ_PIECE)
        ]
        tasks = [asyncio.ensure_future(self._fetch_piece(scatter, offset, b, e)) for b, e in pieces]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # No piece may go on writing into the destination after this read has failed.
            await cancel(*tasks)
            raise

    async def _fetch_piece(self, scatter: Scatter, offset: int, begin: int, end: int) -> None:
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
            raise self.short(offset + position)
