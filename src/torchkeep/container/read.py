"""Reading a container: ``open_container`` opens and validates it (``container.open``);
``Container`` then reads, maps and verifies its tensors and members.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterable, Mapping

import torch

from torchkeep.container.open import (
    OpenedFile,
    close_files,
    open_directory,
    open_single,
    read_whole,
)
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from torchkeep.format import (
    CHECKSUM_CHUNK,
    DTYPES,
    Manifest,
    TensorEntry,
)
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.checksum import checksum_bytes, checksum_data, chunk_spans, combine_digests
from torchkeep.io.gc import paused_gc
from torchkeep.io.pool import IO_THREADS, run_jobs
from torchkeep.io.reader import MAX_STAGING_BYTES
from torchkeep.storage import (
    DEFAULT_STORAGE,
    Source,
    Storage,
    check_storage,
)

log = logging.getLogger("torchkeep.container")


READ_THREADS = IO_THREADS


class Container:
    """An opened, validated container. Use as a context manager, or call ``close()``."""

    def __init__(self, path: str, storage: Storage) -> None:
        self.path = path
        self._storage = storage
        self._files: dict[str | None, OpenedFile] = {}
        self.manifest: Manifest | None = None
        self.directory = storage.is_dir(path)
        try:
            with paused_gc():
                if self.directory:
                    self.manifest = open_directory(storage, path, self._files)
                else:
                    self.manifest = open_single(storage, path, self._files)
        except BaseException:
            self.close()
            raise

    # -- what it holds

    @property
    def entries(self) -> dict[str, TensorEntry]:
        """Every stored tensor (aliases not included)."""
        if self.manifest is not None:
            return self.manifest.tensors
        return self._files[None].header.tensors

    @property
    def aliases(self) -> dict[str, str]:
        return self.manifest.aliases if self.manifest is not None else {}

    def file_bytes(self) -> int:
        """Return the bytes on disk of every file of the save (the manifest file excluded)."""
        members = sum(f.nbytes for f in self.manifest.files.values()) if self.manifest else 0
        return members + sum(opened.source.size for opened in self._files.values())

    def _file_of(self, entry: TensorEntry) -> OpenedFile:
        return self._files[entry.file]

    # -- reading

    def read(
        self,
        names: Iterable[str],
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        verify: bool = True,
        threads: int = READ_THREADS,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read tensors; a name found in ``into`` with the file's dtype and shape is read
        straight into that tensor's memory, the others into new tensors on ``device`` (the
        CPU by default). Tensors bound for a GPU stream there through pinned staging buffers,
        disk reads overlapping the copies."""
        chunk = self.manifest.checksum_chunk if self.manifest else CHECKSUM_CHUNK
        # Staging buffers hold one checksum piece; files cut in larger pieces (possible only in
        # hand-made manifests) are read to the CPU and moved afterwards.
        stream = chunk <= MAX_STAGING_BYTES
        target = torch.device(device) if device is not None else torch.device("cpu")
        into = _disjoint(into or {}, stream)
        result: dict[str, torch.Tensor] = {}
        by_file: dict[str | None, list[ReadItem]] = {}
        with paused_gc():  # many small objects for a file of many tensors, none cyclic
            self._plan(names, into, result, by_file, target if stream else torch.device("cpu"))
        for file, items in by_file.items():
            read_tensors(
                self._files[file].source, items, threads=threads, chunk=chunk, verify=verify
            )
        if not stream and target.type != "cpu":
            result = {name: t.to(target) for name, t in result.items()}
        return result

    def _plan(
        self,
        names: Iterable[str],
        into: Mapping[str, torch.Tensor],
        result: dict[str, torch.Tensor],
        by_file: dict[str | None, list[ReadItem]],
        device: torch.device,
    ) -> None:
        """Pick each tensor's destination (``into``'s, or a new one on ``device``)."""
        for name in names:
            entry = self.entries[name]
            dest = into.get(name)
            if not _fits(dest, entry):
                dest = torch.empty(entry.shape, dtype=DTYPES[entry.dtype], device=device)
            assert dest is not None
            result[name] = dest
            opened = self._file_of(entry)
            checksum = entry.checksum if self.manifest is not None else None
            by_file.setdefault(entry.file, []).append(
                ReadItem(name, opened.header.data_start + entry.begin, dest, checksum)
            )

    def read_member(self, name: str, *, verify: bool = True) -> bytes:
        """Return a file of the save other than its shards (an exported program), checked
        against its size and checksum."""
        entry = self.manifest.files.get(name) if self.manifest is not None else None
        where = f"{self.path}/{name}"
        if entry is None:
            raise CheckpointNotFoundError(f"{where}: the save holds no file '{name}'")

        def check(size: int) -> None:
            if size != entry.nbytes:
                raise CorruptCheckpointError(
                    f"{where}: {size} bytes where the manifest says {entry.nbytes}; "
                    "the file is truncated or was replaced"
                )

        data = read_whole(self._storage, where, check)
        assert self.manifest is not None
        if verify and checksum_data(data, self.manifest.checksum_chunk) != entry.checksum:
            raise CorruptCheckpointError(f"{where}: does not match its checksum; it is corrupt")
        return data

    def map(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Return tensors backed by private mappings of the files: nothing is read until used."""
        maps: dict[str | None, mmap.mmap] = {}
        result: dict[str, torch.Tensor] = {}
        for name in names:
            entry = self.entries[name]
            opened = self._file_of(entry)
            if entry.file not in maps:
                maps[entry.file] = opened.source.map()
            offset = opened.header.data_start + entry.begin
            dtype = DTYPES[entry.dtype]
            if entry.nbytes == 0 or offset % dtype.itemsize:
                # Empty or misaligned (possible in foreign files): read it instead.
                result[name] = self.read([name], verify=False)[name]
                continue
            flat = torch.frombuffer(
                maps[entry.file], dtype=dtype, count=entry.nbytes // dtype.itemsize, offset=offset
            )
            result[name] = flat.view(entry.shape)
        return result

    def verify(self, *, threads: int = READ_THREADS) -> list[str]:
        """Check every tensor against its checksum; return one line per problem found."""
        if self.manifest is None:
            return []
        problems: list[str] = []
        chunk = self.manifest.checksum_chunk
        jobs: list[Callable[[], None]] = []
        digests: dict[str, list[int]] = {}
        for name, entry in self.entries.items():
            opened = self._file_of(entry)
            spans = chunk_spans(entry.nbytes, chunk)
            digests[name] = [0] * len(spans)
            for index, (begin, end) in enumerate(spans):
                offset = opened.header.data_start + entry.begin + begin

                def job(
                    source: Source = opened.source,
                    name: str = name,
                    index: int = index,
                    offset: int = offset,
                    nbytes: int = end - begin,
                ) -> None:
                    digests[name][index] = checksum_bytes(source.read(offset, nbytes))

                jobs.append(job)
        try:
            run_jobs(jobs, threads=threads)
        except StorageError as e:
            return [str(e)]
        for name, entry in self.entries.items():
            if combine_digests(digests[name]) != entry.checksum:
                where = self.path if entry.file is None else f"{self.path}/{entry.file}"
                problems.append(f"{where}: tensor '{name}' does not match its checksum")
        for name in self.manifest.files:
            try:
                self.read_member(name)
            except (CorruptCheckpointError, StorageError) as e:
                problems.append(str(e))
        return problems

    def close(self) -> None:
        close_files(self._files)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _disjoint(into: Mapping[str, torch.Tensor], stream: bool) -> dict[str, torch.Tensor]:
    """Keep the destinations whose memory no earlier one overlaps (tied weights share theirs):
    two reads into one buffer would leave it holding only the second. GPU destinations are
    kept only when ``stream`` (their pieces fit the staging buffers); others (meta, or devices
    whose memory has no address) are read into new memory and copied in by the caller."""
    spans = []
    for name, t in into.items():
        if t.numel() and (t.device.type == "cpu" or (stream and t.device.type == "cuda")):
            start = t.data_ptr()
            spans.append((str(t.device), start, start + t.numel() * t.element_size(), name))
    kept: dict[str, torch.Tensor] = {}
    device, end = "", -1
    for where, start, stop, name in sorted(spans):
        if where != device or start >= end:
            kept[name] = into[name]
            device, end = where, stop
        # else: overlapping; that tensor is read into new memory and copied in by the caller
    return kept


def _fits(dest: torch.Tensor | None, entry: TensorEntry) -> bool:
    return (
        dest is not None
        and dest.dtype == DTYPES[entry.dtype]
        and tuple(dest.shape) == entry.shape
        and dest.is_contiguous()
        and not dest.requires_grad
        and not (dest.is_conj() or dest.is_neg())  # its memory does not hold its values
    )


def open_container(
    path: str | os.PathLike[str], *, storage: Storage = DEFAULT_STORAGE
) -> Container:
    """Open and validate the container at ``path``.

    Raises:
        CheckpointNotFoundError: nothing is there.
        IncompleteCheckpointError: a directory whose save never committed.
        CorruptCheckpointError: a header or manifest that fails validation.
        UnsupportedFormatError: a pickle file or a newer format version.
    """
    where = os.fspath(path).rstrip("/") or "/"
    check_storage(where, storage)
    return Container(where, storage)
