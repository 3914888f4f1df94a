"""Parallel writer: each tensor's bytes go from its own memory to the file with ``pwrite``."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from torchkeep.io.checksum import checksum_bytes, chunk_spans, combine_digests
from torchkeep.io.gc import paused_gc
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.pool import BATCH_BYTES, SMALL_TENSOR_BYTES, run_jobs
from torchkeep.storage import Sink

Digest = Callable[[memoryview], int]


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
                t = self.item.tensor.detach().resolve_conj().resolve_neg()
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

    def buffer(self, dtype: torch.dtype, count: int, *, pinned: bool = False) -> torch.Tensor:
        """This thread's buffer as ``count`` items of ``dtype``; pinned for copies from a GPU
        (faster, and they run beside the other threads' writes)."""
        name = "pinned" if pinned else "raw"
        raw: torch.Tensor | None = getattr(self._local, name, None)
        if raw is None:
            raw = torch.empty(self._chunk, dtype=torch.uint8, pin_memory=pinned)
            setattr(self._local, name, raw)
        return raw[: count * dtype.itemsize].view(dtype)

    def batch(self, nbytes: int) -> torch.Tensor:
        """A reused byte buffer of at least ``nbytes`` for gathering a batch of small tensors."""
        raw: torch.Tensor | None = getattr(self._local, "batch", None)
        if raw is None or raw.numel() < nbytes:
            raw = torch.empty(max(nbytes, BATCH_BYTES + SMALL_TENSOR_BYTES), dtype=torch.uint8)
            self._local.batch = raw
        return raw


def _plain_bytes(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t``'s memory is already the bytes to write."""
    return (
        t.device.type == "cpu"
        and t.dtype == dtype
        and t.is_contiguous()
        and not (t.is_conj() or t.is_neg())  # such views keep the values before them
    )


def _piece_bytes(pieces: _Pieces, begin: int, end: int, staging: _Staging) -> memoryview:
    item = pieces.item
    t = item.tensor
    if _plain_bytes(t, item.dtype):
        return tensor_bytes(t.detach())[begin:end]
    size = item.dtype.itemsize
    part = pieces.flat()[begin // size : end // size]
    out = staging.buffer(item.dtype, part.numel(), pinned=t.device.type == "cuda")
    out.copy_(part)
    return tensor_bytes(out)


def _write_piece(
    sink: Sink,
    staging: _Staging,
    digest: Digest | None,
    pieces: _Pieces,
    index: int,
    begin: int,
    end: int,
) -> None:
    if pieces.item.ready is not None:
        pieces.item.ready()
    view = _piece_bytes(pieces, begin, end, staging)
    if digest is not None:
        pieces.digests[index] = digest(view)
    offset = pieces.item.offset + begin
    sink.pwrite(view, offset)
    sink.written(offset, end - begin)
    pieces.done()


def _write_batch(
    sink: Sink, staging: _Staging, digest: Digest | None, batch: list[_Pieces]
) -> None:
    # Small tensors lying next to each other in the file are gathered into one buffer and
    # written with one call: one write and one writeback hint for many tensors.
    start = batch[0].item.offset
    total = batch[-1].item.offset + batch[-1].item.nbytes - start
    buffer = staging.batch(total)
    view = tensor_bytes(buffer)
    base = buffer.data_ptr()
    for pieces in batch:
        item = pieces.item
        if item.ready is not None:
            item.ready()
        begin = item.offset - start
        if item.nbytes:
            t = item.tensor.detach()
            if not _plain_bytes(t, item.dtype):
                t = t.resolve_conj().resolve_neg().to(device="cpu", dtype=item.dtype)
                t = t.contiguous()
            ctypes.memmove(base + begin, t.data_ptr(), item.nbytes)
        if digest is not None:
            pieces.digests[0] = digest(view[begin : begin + item.nbytes])
    sink.pwrite(view[:total], start)
    sink.written(start, total)


def write_tensors(
    sink: Sink,
    items: Sequence[WriteItem],
    *,
    threads: int,
    chunk: int,
    digest: Digest | None = checksum_bytes,
) -> dict[str, str]:
    """Write every item in parallel; return each tensor's checksum by name (none when
    ``digest`` is None: no checksums computed).

    Large tensors are split into ``chunk``-byte pieces written by different threads; small ones
    are batched. The first error stops the remaining work and is raised.
    """
    results: dict[str, _Pieces] = {}
    staging = _Staging(chunk)
    jobs: list[Callable[[], None]] = []
    batch: list[_Pieces] = []
    batch_bytes = 0
    end_of_batch = -1

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            jobs.append(partial(_write_batch, sink, staging, digest, batch))
        batch, batch_bytes = [], 0

    with paused_gc():  # many small objects for a save of many tensors, none cyclic
        for item in sorted(items, key=lambda i: i.offset):
            nbytes = item.nbytes
            spans = chunk_spans(nbytes, chunk)
            pieces = _Pieces(item, len(spans))
            results[item.name] = pieces
            if nbytes <= SMALL_TENSOR_BYTES and len(spans) == 1:
                if batch and (item.offset != end_of_batch or batch_bytes >= BATCH_BYTES):
                    flush()
                batch.append(pieces)
                batch_bytes += nbytes
                end_of_batch = item.offset + nbytes
                continue
            for index, (begin, end) in enumerate(spans):
                jobs.append(partial(_write_piece, sink, staging, digest, pieces, index, begin, end))
        flush()
    run_jobs(jobs, threads=threads)
    if digest is None:
        return {}
    return {name: combine_digests(p.digests) for name, p in results.items()}
