"""Parallel reader: bytes go from the file straight into destination tensors with ``preadv``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.io.checksum import XXH3, Checksum
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.pool import BATCH_BYTES, SMALL_TENSOR_BYTES, run_jobs
from torchkeep.storage import Source

# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
BATCH_BUFFERS = 512


@dataclass(frozen=True)
class ReadItem:
    """One tensor to read: ``nbytes`` at ``offset`` into ``dest`` (contiguous, CPU, exact size)."""

    name: str
    offset: int
    dest: torch.Tensor
    checksum: str | None

    @property
    def nbytes(self) -> int:
        return self.dest.numel() * self.dest.element_size()


class _Digests:
    """The digests of one tensor's pieces, and how many pieces are still to be read."""

    def __init__(self, item: ReadItem, count: int, on_done: Callable[[ReadItem], None] | None):
        self.values: list[int] = [0] * count
        self._item = item
        self._remaining = count
        self._lock = threading.Lock()
        self._on_done = on_done

    def piece_read(self) -> None:
        if self._on_done is None:
            return
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0
        if finished:
            self._on_done(self._item)


def _read_piece(
    source: Source,
    item: ReadItem,
    digests: _Digests,
    index: int,
    begin: int,
    end: int,
    checksum: Checksum | None,
) -> None:
    view = tensor_bytes(item.dest)[begin:end]
    source.readinto([view], item.offset + begin)
    if checksum is not None:
        digests.values[index] = checksum.digest(view)
    digests.piece_read()


def _read_batch(
    source: Source, batch: list[tuple[ReadItem, _Digests]], checksum: Checksum | None
) -> None:
    # Consecutive small tensors are read with one preadv call into all their buffers.
    views = [tensor_bytes(item.dest) for item, _ in batch]
    source.readinto(views, batch[0][0].offset)
    for view, (_, digests) in zip(views, batch, strict=True):
        if checksum is not None:
            digests.values[0] = checksum.digest(view)
        digests.piece_read()


def read_tensors(
    source: Source,
    items: Sequence[ReadItem],
    *,
    threads: int,
    chunk: int,
    verify: bool,
    checksum: Checksum = XXH3,
    on_done: Callable[[ReadItem], None] | None = None,
) -> None:
    """Fill every item's destination in parallel; with ``verify``, check every checksum,
    computed by ``checksum`` piece by piece as the pieces arrive. ``on_done`` is called for
    each item as soon as all its bytes are in (before checksums are compared).

    Raises:
        CorruptCheckpointError: a tensor's bytes do not match its checksum (named in the message).
    """
    jobs: list[Callable[[], None]] = []
    all_digests: list[tuple[ReadItem, _Digests]] = []
    batch: list[tuple[ReadItem, _Digests]] = []
    batch_bytes = 0
    end_of_batch = -1

    hashing = checksum if verify else None

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            jobs.append(partial(_read_batch, source, batch, hashing))
        batch, batch_bytes = [], 0

    for item in sorted(items, key=lambda i: i.offset):
        nbytes = item.nbytes
        spans = checksum.spans(nbytes, chunk)
        digests = _Digests(item, len(spans), on_done)
        all_digests.append((item, digests))
        if nbytes <= SMALL_TENSOR_BYTES and len(spans) == 1:
            if batch and (
                item.offset != end_of_batch
                or batch_bytes >= BATCH_BYTES
                or len(batch) >= BATCH_BUFFERS
            ):
                flush()
            batch.append((item, digests))
            batch_bytes += nbytes
            end_of_batch = item.offset + nbytes
            continue
        for index, (begin, end) in enumerate(spans):
            jobs.append(partial(_read_piece, source, item, digests, index, begin, end, hashing))
    flush()
    run_jobs(jobs, threads=threads)
    if not verify:
        return
    for item, digests in all_digests:
        if item.checksum is not None and checksum.combine(digests.values, chunk) != item.checksum:
            raise CorruptCheckpointError(
                f"{source.name}: tensor '{item.name}' does not match its checksum "
                f"({item.nbytes} bytes at offset {item.offset}); the file is corrupt. "
                "Restore it from another copy; `torchkeep verify` lists every damaged tensor"
            )
