"""Reading a container: ``open_container`` validates a file's header, or a directory's manifest
and every shard's header, before anything is allocated from them; ``Container`` then reads,
maps and verifies tensors and members.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format import (
    CHECKSUM_CHUNK,
    DTYPES,
    MANIFEST_FILE,
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    Header,
    Manifest,
    TensorEntry,
    check_against_header,
    manifest_from_json,
    parse_header,
    read_header_length,
)
from torchkeep.io import ReadItem, read_tensors
from torchkeep.io.checksum import checksum_bytes, checksum_data, chunk_spans, combine_digests
from torchkeep.io.gc import paused_gc
from torchkeep.io.pool import IO_THREADS, run_jobs
from torchkeep.io.reader import MAX_STAGING_BYTES
from torchkeep.storage import (
    DEFAULT_STORAGE,
    LocalStorage,
    Source,
    Storage,
    check_storage,
)

log = logging.getLogger("torchkeep.container")


READ_THREADS = IO_THREADS


def _read_whole(storage: Storage, path: str, check: Callable[[int], None]) -> bytes:
    """Read a whole (small) file after ``check(size)`` accepted its size."""
    source = storage.open(path)
    try:
        check(source.size)
        return source.read(0, source.size)
    finally:
        source.close()


def read_manifest(directory: str, storage: Storage = DEFAULT_STORAGE) -> Manifest:
    """Read and validate the manifest of a directory save (its commit marker).

    Raises:
        IncompleteCheckpointError: there is none: the save never committed.
        CorruptCheckpointError, UnsupportedFormatError: it is damaged, or of a newer format.
    """
    manifest_path = f"{directory}/{MANIFEST_FILE}"
    if not storage.exists(manifest_path):
        raise IncompleteCheckpointError(
            f"{directory}: no {MANIFEST_FILE}; this save never committed (it was interrupted) "
            "or the directory is not a torchkeep checkpoint. Load the previous checkpoint."
        )

    def check(size: int) -> None:
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{manifest_path}: {size} bytes, over the {MAX_MANIFEST_BYTES}-byte "
                "limit of a manifest; the file is corrupt"
            )

    raw = _read_whole(storage, manifest_path, check)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{manifest_path}: not UTF-8 text") from e
    return manifest_from_json(text, where=manifest_path)


@dataclass
class _File:
    source: Source
    header: Header


OPEN_ATTEMPTS = 5  # of a directory replaced while it is opened


class Container:
    """An opened, validated container. Use as a context manager, or call ``close()``."""

    def __init__(self, path: str, storage: Storage) -> None:
        self.path = path
        self._storage = storage
        self._files: dict[str | None, _File] = {}
        self.manifest: Manifest | None = None
        self.directory = storage.is_dir(path)
        try:
            with paused_gc():
                if self.directory:
                    self._open_directory_consistently()
                else:
                    self._open_single()
        except BaseException:
            self.close()
            raise

    def _open_directory_consistently(self) -> None:
        """Open a directory save as one whole: a save that replaced it while its files were
        being opened (a manifest of one save, a shard of the next) is opened again, so that a
        reader gets the old save or the new one. Once open, the files stay readable whatever
        happens to the directory."""
        for attempt in range(OPEN_ATTEMPTS):
            try:
                self._open_directory()
                return
            except (CorruptCheckpointError, CheckpointNotFoundError, IncompleteCheckpointError):
                opened = self.manifest
                if attempt == OPEN_ATTEMPTS - 1 or opened is None:
                    raise
                try:
                    replaced = read_manifest(self.path, self._storage) != opened
                except TorchkeepError:
                    replaced = True  # gone or half-replaced this instant: look again
                if not replaced:
                    raise  # damaged, not replaced
                self.close()
                self.manifest = None

    # -- opening

    def _open_file(self, file: str | None) -> _File:
        where = self.path if file is None else f"{self.path}/{file}"
        source = self._storage.open(where)
        try:
            prefix = source.read(0, min(9, source.size)) if source.size else b""
            length = read_header_length(prefix, file_size=source.size, where=where)
            header = parse_header(source.read(8, length), file_size=source.size, where=where)
        except BaseException:
            source.close()
            raise
        opened = _File(source, header)
        self._files[file] = opened
        return opened

    def _open_single(self) -> None:
        if not self._storage.exists(self.path):
            raise CheckpointNotFoundError(f"{self.path}: no such file or directory")
        opened = self._open_file(None)
        text = opened.header.metadata.get(MANIFEST_KEY)
        if text is None:
            if any('"format":"torchkeep"' in v for v in opened.header.metadata.values()):
                raise CorruptCheckpointError(
                    f"{self.path}: the header holds a torchkeep manifest under a damaged key; "
                    "the file is corrupt"
                )
            return  # a plain safetensors file written by another tool: no checksums
        self.manifest = manifest_from_json(text, where=self.path)
        check_against_header(self.manifest, opened.header, file=None, where=self.path)
        if opened.header.metadata != {"format": "pt", MANIFEST_KEY: text}:
            # torchkeep writes exactly these two entries; anything else is damage.
            raise CorruptCheckpointError(
                f"{self.path}: the header's metadata entries were altered; the file is corrupt"
            )

    def _check_inside(self, member: str) -> None:
        """Refuse a member that resolves outside the directory (a link pointing elsewhere):
        torchkeep writes no links, and following one would read a file the save does not own."""
        if not isinstance(self._storage, LocalStorage):
            return  # object stores have no links
        target = os.path.realpath(member)
        if not target.startswith(os.path.realpath(self.path) + os.sep):
            raise CorruptCheckpointError(
                f"{member}: a link to {target}, outside the checkpoint directory; refused. "
                "Copy the checkpoint with its files, not links to them"
            )

    def _open_directory(self) -> None:
        self._check_inside(f"{self.path}/{MANIFEST_FILE}")
        self.manifest = read_manifest(self.path, self._storage)
        files = {e.file for e in self.manifest.tensors.values()}
        save_ids = set()
        for file in sorted(f for f in files if f is not None):
            member = f"{self.path}/{file}"
            if not self._storage.exists(member) or self._storage.is_dir(member):
                raise CorruptCheckpointError(
                    f"{member}: named by {MANIFEST_FILE} but missing; the checkpoint directory "
                    "was modified or copied in part. Restore it from another copy"
                )
            self._check_inside(member)
            opened = self._open_file(file)
            save_id = opened.header.metadata.get("torchkeep_save")
            if set(opened.header.metadata) != {"torchkeep_save"} or (
                self.manifest.save_id and save_id != self.manifest.save_id
            ):
                raise CorruptCheckpointError(
                    f"{member}: its header's metadata {opened.header.metadata!r:.120} does not "
                    f"name this save ({self.manifest.save_id or 'a save id'}); the shard was "
                    "altered or comes from another save"
                )
            save_ids.add(save_id)
            check_against_header(
                self.manifest, opened.header, file=file, where=f"{self.path}/{file}"
            )
        if len(save_ids) > 1:
            raise CorruptCheckpointError(
                f"{self.path}: its shards come from {len(save_ids)} different saves; "
                "the directory was modified by hand"
            )
        if None in files:
            raise CorruptCheckpointError(
                f"{self.path}/{MANIFEST_FILE}: a tensor entry names no shard file"
            )
        for name in self.manifest.files:
            member = f"{self.path}/{name}"
            if name in files or not self._storage.exists(member) or self._storage.is_dir(member):
                raise CorruptCheckpointError(
                    f"{member}: named by {MANIFEST_FILE} but missing; the checkpoint directory "
                    "was modified or copied in part. Restore it from another copy"
                )
            self._check_inside(member)

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

    def _file_of(self, entry: TensorEntry) -> _File:
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

        data = _read_whole(self._storage, where, check)
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
        for opened in self._files.values():
            opened.source.close()
        self._files.clear()

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
