"""Parallel writer: each tensor's bytes go from its own memory to the file with ``pwrite``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from torchkeep.format import checksum_bytes, chunk_spans, combine_digests
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.pool import BATCH_BYTES, SMALL_TENSOR_BYTES, run_jobs
from torchkeep.storage import Sink


@dataclass(frozen=True)
class WriteItem:
    """One tensor to write: ``tensor`` converted to ``dtype`` lands at ``offset`` in the file."""

    name: str
    tensor: torch.Tensor
    dtype: torch.dtype
    offset: int
    ready: Callable[[], None] | None = None  # blocks until the tensor's memory holds its data

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.dtype.itemsize


class _Pieces:
    """Per-tensor state shared by the jobs writing its chunks."""

    def __init__(self, item: WriteItem, count: int) -> None:
        self.item = item
        self.digests: list[int] = [0] * count
        self._lock = threading.Lock()
        self._flat: torch.Tensor | None = None
        self._remaining = count

    def flat(self) -> torch.Tensor:
        # A non-contiguous tensor is made contiguous once for all its chunks; contiguous ones
        # are only viewed, so the extra memory stays at one chunk per thread.
        with self._lock:
            if self._flat is None:
                t = self.item.tensor.detach()
                self._flat = (t if t.is_contiguous() else t.contiguous()).reshape(-1)
            return self._flat

    def done(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self._flat = None


class _Staging:
    """One reusable buffer per writing thread, for pieces that must be converted first.

    Converting into a reused buffer keeps the extra memory of a save at one chunk per thread,
    with no allocator churn, however many tensors need a cast or a device copy.
    """

    def __init__(self, chunk: int) -> None:
        self._chunk = chunk
        self._local = threading.local()

    def buffer(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        raw: torch.Tensor | None = getattr(self._local, "raw", None)
        if raw is None:
            raw = torch.empty(self._chunk, dtype=torch.uint8)
            self._local.raw = raw
        return raw[: count * dtype.itemsize].view(dtype)


def _piece_bytes(pieces: _Pieces, begin: int, end: int, staging: _Staging) -> memoryview:
    item = pieces.item
    t = item.tensor
    if t.device.type == "cpu" and t.dtype == item.dtype and t.is_contiguous():
        return tensor_bytes(t.detach())[begin:end]
    size = item.dtype.itemsize
    part = pieces.flat()[begin // size : end // size]
    out = staging.buffer(item.dtype, part.numel())
    out.copy_(part)
    return tensor_bytes(out)


def _write_piece(
    sink: Sink, staging: _Staging, pieces: _Pieces, index: int, begin: int, end: int
) -> None:
    if pieces.item.ready is not None:
        pieces.item.ready()
    view = _piece_bytes(pieces, begin, end, staging)
    pieces.digests[index] = checksum_bytes(view)
    offset = pieces.item.offset + begin
    sink.pwrite(view, offset)
    sink.written(offset, end - begin)
    pieces.done()


def _write_batch(sink: Sink, staging: _Staging, batch: list[_Pieces]) -> None:
    for pieces in batch:
        _write_piece(sink, staging, pieces, 0, 0, pieces.item.nbytes)


def write_tensors(
    sink: Sink, items: Sequence[WriteItem], *, threads: int, chunk: int
) -> dict[str, str]:
    """Write every item in parallel; return each tensor's checksum by name.

    Large tensors are split into ``chunk``-byte pieces written by different threads; small ones
    are batched. The first error stops the remaining work and is raised.
    """
    results: dict[str, _Pieces] = {}
    staging = _Staging(chunk)
    jobs: list[Callable[[], None]] = []
    batch: list[_Pieces] = []
    batch_bytes = 0
    for item in sorted(items, key=lambda i: i.offset):
        nbytes = item.nbytes
        spans = chunk_spans(nbytes, chunk)
        pieces = _Pieces(item, len(spans))
        results[item.name] = pieces
        if nbytes <= SMALL_TENSOR_BYTES and len(spans) == 1:
            batch.append(pieces)
            batch_bytes += nbytes
            if batch_bytes >= BATCH_BYTES:
                jobs.append(partial(_write_batch, sink, staging, batch))
                batch, batch_bytes = [], 0
            continue
        for index, (begin, end) in enumerate(spans):
            jobs.append(partial(_write_piece, sink, staging, pieces, index, begin, end))
    if batch:
        jobs.append(partial(_write_batch, sink, staging, batch))
    run_jobs(jobs, threads=threads)
    return {name: combine_digests(p.digests) for name, p in results.items()}
