"""Parallel reader: bytes go from the file straight into destination tensors with ``preadv``.

Destinations off the CPU (a GPU) are filled through staging: each thread reads a piece into one
of its two reusable host buffers (pinned for CUDA), checks it, and starts an asynchronous copy to
the device on its own stream while it reads the next piece into the other buffer, so that disk
reads and host-to-device copies overlap."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.io.checksum import XXH3, Checksum
from torchkeep.io.gc import paused_gc
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.pool import BATCH_BYTES, SMALL_TENSOR_BYTES, run_jobs
from torchkeep.storage import Source

# preadv takes at most IOV_MAX (1024 on Linux) buffers per call.
BATCH_BUFFERS = 512
# Staging buffers hold one checksum piece: files with larger pieces are read to the CPU first.
MAX_STAGING_BYTES = 64 << 20


@dataclass(frozen=True)
class ReadItem:
    """One tensor to read: ``nbytes`` at ``offset`` into ``dest`` (contiguous, exact size; on
    the CPU it is read into directly, elsewhere through staging buffers)."""

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


class _Slot:
    """One staging buffer and the events of its copies still in flight to a GPU."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.events: list[Any] = []

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events.clear()


class Staging:
    """Two reusable host buffers per reading thread, for destinations not on the CPU.

    When any destination is on a GPU the buffers are pinned, and each thread copies to each
    GPU on a stream of its own, ordered after the caller's current stream on that GPU (taken
    on the caller's thread: streams are per thread); a buffer is refilled only once its copies
    are done. Other destinations (and ``staged`` CPU ones, how the path is tested without a
    GPU) are copied synchronously.
    """

    def __init__(self, nbytes: int, devices: set[torch.device]) -> None:
        self.nbytes = nbytes
        cuda = [d for d in devices if d.type == "cuda"]
        self._pinned = bool(cuda)
        self._callers = {d: torch.cuda.current_stream(d) for d in cuda}
        self._local = threading.local()
        self._streams: list[Any] = []
        self._lock = threading.Lock()

    def buffer(self) -> tuple[torch.Tensor, _Slot]:
        """This thread's next buffer, once its earlier copies are done, and its slot."""
        slots: list[_Slot] | None = getattr(self._local, "slots", None)
        if slots is None:
            slots = [_Slot(self.nbytes, self._pinned), _Slot(self.nbytes, self._pinned)]
            self._local.slots, self._local.turn, self._local.streams = slots, 0, {}
        slot = slots[self._local.turn]
        self._local.turn = 1 - self._local.turn
        slot.wait()
        return slot.buffer, slot

    def _stream(self, device: torch.device) -> Any:
        streams: dict[torch.device, Any] = self._local.streams
        stream = streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            stream.wait_stream(self._callers[device])
            streams[device] = stream
            with self._lock:
                self._streams.append(stream)
        return stream

    def copy(self, dest: torch.Tensor, source: torch.Tensor, slot: _Slot) -> None:
        """Copy ``source`` (part of ``slot``'s buffer) into ``dest``."""
        if dest.device.type != "cuda":
            dest.copy_(source)
            return
        stream = self._stream(dest.device)
        with torch.cuda.stream(stream):
            dest.copy_(source, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        slot.events.append(event)

    def finish(self) -> None:
        """Wait for every copy started, so that the destinations hold their data."""
        for stream in self._streams:
            stream.synchronize()


def _dest_bytes(dest: torch.Tensor) -> torch.Tensor:
    return dest.detach().reshape(-1).view(torch.uint8)


def _read_piece(
    source: Source,
    item: ReadItem,
    digests: _Digests,
    index: int,
    begin: int,
    end: int,
    checksum: Checksum | None,
    staging: Staging | None,
) -> None:
    if staging is None:
        view = tensor_bytes(item.dest)[begin:end]
        source.readinto([view], item.offset + begin)
        if checksum is not None:
            digests.values[index] = checksum.digest(view)
    else:
        buffer, slot = staging.buffer()
        part = buffer[: end - begin]
        view = tensor_bytes(part)
        source.readinto([view], item.offset + begin)
        if checksum is not None:
            digests.values[index] = checksum.digest(view)
        staging.copy(_dest_bytes(item.dest)[begin:end], part, slot)
    digests.piece_read()


def _read_batch(
    source: Source,
    batch: list[tuple[ReadItem, _Digests]],
    checksum: Checksum | None,
    staging: Staging | None,
) -> None:
    # Consecutive small tensors are read with one preadv call into all their buffers.
    if staging is None:
        views = [tensor_bytes(item.dest) for item, _ in batch]
        source.readinto(views, batch[0][0].offset)
    else:
        buffer, slot = staging.buffer()
        views, position = [], 0
        for item, _ in batch:
            views.append(tensor_bytes(buffer[position : position + item.nbytes]))
            position += item.nbytes
        source.readinto(views, batch[0][0].offset)
    position = 0
    for view, (item, digests) in zip(views, batch, strict=True):
        if checksum is not None:
            digests.values[0] = checksum.digest(view)
        if staging is not None:
            part = buffer[position : position + item.nbytes]
            staging.copy(_dest_bytes(item.dest), part, slot)
            position += item.nbytes
        digests.piece_read()


def _read_run(
    source: Source,
    run: list[tuple[ReadItem, _Digests, int, int, int]],
    checksum: Checksum | None,
) -> None:
    # Consecutive pieces, of any tensors, read with one request into all their destinations.
    views = [tensor_bytes(item.dest)[begin:end] for item, _, _, begin, end in run]
    first, _, _, begin, _ = run[0]
    source.readinto(views, first.offset + begin)
    for view, (_, digests, index, _, _) in zip(views, run, strict=True):
        if checksum is not None:
            digests.values[index] = checksum.digest(view)
        digests.piece_read()


def _runs(
    pieces: list[tuple[ReadItem, _Digests, int, int, int]], limit: int
) -> list[list[tuple[ReadItem, _Digests, int, int, int]]]:
    """Group pieces lying next to each other in the file into runs of at most ``limit`` bytes
    (a piece larger than that is a run of its own)."""
    runs: list[list[tuple[ReadItem, _Digests, int, int, int]]] = []
    size = end_of_run = 0
    for piece in pieces:
        item, _, _, begin, end = piece
        if not runs or item.offset + begin != end_of_run or size + end - begin > limit:
            runs.append([])
            size = 0
        runs[-1].append(piece)
        size += end - begin
        end_of_run = item.offset + end
    return runs


def read_tensors(
    source: Source,
    items: Sequence[ReadItem],
    *,
    threads: int,
    chunk: int,
    verify: bool,
    checksum: Checksum = XXH3,
    on_done: Callable[[ReadItem], None] | None = None,
    staged: bool = False,
) -> None:
    """Fill every item's destination in parallel; with ``verify``, check every checksum,
    computed by ``checksum`` piece by piece as the pieces arrive. ``on_done`` is called for
    each item as soon as all its bytes are in (before checksums are compared; for a staged
    destination, as soon as they are in its staging buffer).

    Destinations not on the CPU (and every destination with ``staged``) are filled through
    reusable staging buffers of ``chunk`` bytes; ``chunk`` must then be at most
    ``MAX_STAGING_BYTES``.

    Raises:
        CorruptCheckpointError: a tensor's bytes do not match its checksum (named in the message).
    """
    hashing = checksum if verify else None
    ordered = sorted(items, key=lambda i: i.offset)

    def needs_staging(item: ReadItem) -> bool:
        return staged or item.dest.device.type != "cpu"

    # Sources where each request is costly (object stores) ask for runs of this many bytes.
    request = int(getattr(source, "request_bytes", 0))
    staging: Staging | None = None
    if request and not any(needs_staging(item) for item in items):
        digests, jobs = _run_jobs(source, ordered, request, checksum, chunk, hashing, on_done)
    else:
        if any(needs_staging(item) for item in items):
            if chunk > MAX_STAGING_BYTES:
                raise ValueError(f"staged reads take pieces of at most {MAX_STAGING_BYTES} bytes")
            # A buffer holds one piece, or one batch (below BATCH_BYTES + one small tensor).
            devices = {item.dest.device for item in items}
            staging = Staging(max(chunk, BATCH_BYTES + SMALL_TENSOR_BYTES), devices)
        digests, jobs = _piece_jobs(
            source, ordered, needs_staging, staging, checksum, chunk, hashing, on_done
        )
    try:
        run_jobs(jobs, threads=threads)
    finally:
        if staging is not None:
            staging.finish()
    _check(source, digests, checksum, chunk, verify)


_Jobs = tuple[list[tuple[ReadItem, _Digests]], list[Callable[[], None]]]


def _run_jobs(
    source: Source,
    ordered: Sequence[ReadItem],
    request: int,
    checksum: Checksum,
    chunk: int,
    hashing: Checksum | None,
    on_done: Callable[[ReadItem], None] | None,
) -> _Jobs:
    """One job per run of about ``request`` bytes, pieces of several tensors merged."""
    all_digests: list[tuple[ReadItem, _Digests]] = []
    pieces = []
    with paused_gc():
        for item in ordered:
            spans = checksum.spans(item.nbytes, chunk)
            digests = _Digests(item, len(spans), on_done)
            all_digests.append((item, digests))
            pieces += [(item, digests, i, b, e) for i, (b, e) in enumerate(spans)]
        jobs: list[Callable[[], None]] = [
            partial(_read_run, source, run, hashing) for run in _runs(pieces, request)
        ]
    return all_digests, jobs


def _piece_jobs(
    source: Source,
    ordered: Sequence[ReadItem],
    needs_staging: Callable[[ReadItem], bool],
    staging: Staging | None,
    checksum: Checksum,
    chunk: int,
    hashing: Checksum | None,
    on_done: Callable[[ReadItem], None] | None,
) -> _Jobs:
    """One job per piece of a large tensor, one per batch of small neighbouring tensors."""
    jobs: list[Callable[[], None]] = []
    all_digests: list[tuple[ReadItem, _Digests]] = []
    batch: list[tuple[ReadItem, _Digests]] = []
    batch_bytes = 0
    end_of_batch = -1
    batch_staged = False

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            jobs.append(
                partial(_read_batch, source, batch, hashing, staging if batch_staged else None)
            )
        batch, batch_bytes = [], 0

    with paused_gc():  # many small objects for a file of many tensors, none cyclic
        for item in ordered:
            nbytes = item.nbytes
            spans = checksum.spans(nbytes, chunk)
            digests = _Digests(item, len(spans), on_done)
            all_digests.append((item, digests))
            if nbytes <= SMALL_TENSOR_BYTES and len(spans) == 1:
                if batch and (
                    item.offset != end_of_batch
                    or batch_bytes >= BATCH_BYTES
                    or len(batch) >= BATCH_BUFFERS
                    or needs_staging(item) != batch_staged
                ):
                    flush()
                batch.append((item, digests))
                batch_staged = needs_staging(item)
                batch_bytes += nbytes
                end_of_batch = item.offset + nbytes
                continue
            through = staging if needs_staging(item) else None
            for index, (begin, end) in enumerate(spans):
                jobs.append(
                    partial(_read_piece, source, item, digests, index, begin, end, hashing, through)
                )
        flush()
    return all_digests, jobs


def _check(
    source: Source,
    all_digests: list[tuple[ReadItem, _Digests]],
    checksum: Checksum,
    chunk: int,
    verify: bool,
) -> None:
    if not verify:
        return
    for item, digests in all_digests:
        if item.checksum is not None and checksum.combine(digests.values, chunk) != item.checksum:
            raise CorruptCheckpointError(
                f"{source.name}: tensor '{item.name}' does not match its checksum "
                f"({item.nbytes} bytes at offset {item.offset}); the file is corrupt. "
                "Restore it from another copy; `torchkeep verify` lists every damaged tensor"
            )
