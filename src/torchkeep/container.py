"""Containers: named tensors plus a manifest, as one safetensors file or a committed directory.

``write_container`` lays tensors out, writes them through the engine and commits (one file: the
header holding the manifest is written last into the reserved space, then the file is renamed
into place; a directory: shards first, ``manifest.json`` last, then the directory is renamed).
``open_container`` validates everything before anything is allocated from it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    TorchkeepError,
    UnsupportedFormatError,
)
from torchkeep.format import (
    CHECKSUM_CHUNK,
    DTYPES,
    MANIFEST_FILE,
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    SHARD_NAME,
    FileEntry,
    Header,
    Manifest,
    TensorEntry,
    check_against_header,
    check_member_name,
    check_target_name,
    dtype_name,
    encode_header,
    is_single_file,
    manifest_from_json,
    manifest_to_json,
    parse_header,
    read_header_length,
)
from torchkeep.io import ReadItem, WriteItem, read_tensors, write_tensors
from torchkeep.io.checksum import checksum_bytes, checksum_data, chunk_spans, combine_digests
from torchkeep.io.gc import paused_gc
from torchkeep.io.pool import run_jobs
from torchkeep.io.reader import MAX_STAGING_BYTES
from torchkeep.storage import DEFAULT_STORAGE, LocalStorage, Sink, Source, Storage, is_url

log = logging.getLogger(__name__)

# Threads for positional I/O: one per core. Measured on 2 cores, more threads than cores made
# cold loads slower (they interleave the disk's sequential readahead) and saves no faster.
IO_THREADS = min(8, max(2, os.cpu_count() or 2))
WRITE_THREADS = IO_THREADS
READ_THREADS = IO_THREADS
SHARD_BYTES = 4 << 30
_PLACEHOLDER = "0" * 16


@dataclass(frozen=True)
class SaveInfo:
    """What a save wrote.

    Attributes:
        path: the file or directory written.
        files: every file of the save, relative to ``path`` for directories.
        tensors: how many distinct tensors were stored (aliases not counted).
        tensor_bytes: bytes of tensor data.
        file_bytes: bytes on disk, headers included.
        seconds: wall time of the save.
    """

    path: str
    files: tuple[str, ...]
    tensors: int
    tensor_bytes: int
    file_bytes: int
    seconds: float


def _layout(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], shard_bytes: int
) -> list[list[tuple[str, TensorEntry]]]:
    """Assign byte spans; wider dtypes first so every tensor starts aligned to its item size."""
    order = sorted(tensors, key=lambda n: -dtypes[n].itemsize)
    shards: list[list[tuple[str, TensorEntry]]] = [[]]
    position = 0
    for name in order:
        t, dtype = tensors[name], dtypes[name]
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and position + nbytes > shard_bytes:
            shards.append([])
            position = 0
        entry = TensorEntry(
            dtype=dtype_name(dtype, where=name),
            shape=tuple(t.shape),
            begin=position,
            end=position + nbytes,
            checksum=_PLACEHOLDER,
        )
        shards[-1].append((name, entry))
        position += nbytes
    return shards


def write_container(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    tree: Any = None,
    aliases: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: Callable[[str, torch.Tensor], torch.dtype] | None = None,
    storage: Storage = DEFAULT_STORAGE,
    threads: int = WRITE_THREADS,
    shard_bytes: int = SHARD_BYTES,
    ready: Callable[[str], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    checksum_chunk: int = CHECKSUM_CHUNK,
    files: Mapping[str, bytes] | None = None,
    model: Any = None,
    checksums: bool = True,
) -> SaveInfo:
    """Write ``tensors`` and their manifest to ``path`` (a ``.safetensors`` file or a directory).

    ``checksums=False`` skips computing the tensors' checksums and leaves placeholders, so the
    result fails verification and will not load: it exists only to measure what checksums cost.

    ``files`` are other members of a directory save (an exported program), written beside the
    shards with their checksums in the manifest; ``model`` is the manifest's model section.

    ``ready(name)``, when given, is called before a tensor's memory is first read (it may block
    until the data is there); ``before_commit()`` runs after the data is written and before the
    save commits, and may raise to abandon it.
    """
    path = os.fspath(path)
    check_target_name(path)
    _check_storage(path, storage)
    started = time.perf_counter()
    dtypes = {n: (dtype(n, t) if dtype else t.dtype) for n, t in tensors.items()}
    single = is_single_file(path)
    files = dict(files or {})
    if files and single:
        raise ValueError(f"{path}: only a directory save holds other files")
    for name in files:
        try:
            check_member_name(name, where=path)
        except CorruptCheckpointError as e:
            raise ValueError(f"{path}: {name!r} is not a plain file name for a save") from e
    if model is not None and not isinstance(model, dict):
        raise ValueError(f"{path}: the model section must be a dict, not {type(model).__name__}")
    with paused_gc():  # many small objects for a save of many tensors, none cyclic
        shards = _layout(tensors, dtypes, shard_bytes if not single else 1 << 62)
        save_id = uuid.uuid4().hex
        # Built in place (object stores): names no earlier save used, so the previous save's
        # objects stay whole until the new manifest replaces its own.
        tag = "" if storage.atomic_dirs else f"-{save_id[:12]}"
        shard_files = [
            "" if single else f"shard-{i:05d}{tag}.safetensors" for i in range(len(shards))
        ]
        entries: dict[str, TensorEntry] = {}
        for file, shard in zip(shard_files, shards, strict=True):
            for name, entry in shard:
                entries[name] = replace(entry, file=file or None)
    if set(files) & {*shard_files, MANIFEST_FILE}:
        raise ValueError(f"{path}: the names {sorted(files)} clash with the save's own files")
    manifest = Manifest(
        kind=kind,
        tensors=entries,
        tree=tree,
        aliases=dict(aliases or {}),
        metadata=dict(metadata or {}),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        checksum_chunk=checksum_chunk,
        files={n: FileEntry(len(b), checksum_data(b, checksum_chunk)) for n, b in files.items()},
        model=model,
        save_id="" if single else save_id,
    )
    data_bytes = sum(e.nbytes for e in entries.values())
    hooks = _Hooks(ready, before_commit, checksum_chunk, checksums)
    if single:
        file_bytes = _write_single(path, manifest, tensors, dtypes, storage, threads, hooks)
        written: tuple[str, ...] = (os.path.basename(path),)
    else:
        file_bytes = _write_directory(
            path, save_id, manifest, shard_files, files, tensors, dtypes, storage, threads, hooks
        )
        written = (*shard_files, *files, MANIFEST_FILE)
    seconds = time.perf_counter() - started
    log.info("saved %d tensors (%d bytes) to %s in %.3fs", len(entries), data_bytes, path, seconds)
    return SaveInfo(path, written, len(entries), data_bytes, file_bytes, seconds)


@dataclass(frozen=True)
class _Hooks:
    """What the write of one save needs besides its tensors."""

    ready: Callable[[str], None] | None = None
    before_commit: Callable[[], None] | None = None
    checksum_chunk: int = CHECKSUM_CHUNK
    checksums: bool = True

    def ready_for(self, name: str) -> Callable[[], None] | None:
        ready = self.ready
        return None if ready is None else (lambda: ready(name))

    def commit(self) -> None:
        if self.before_commit is not None:
            self.before_commit()


def _write_items(
    sink: Sink,
    entries: Mapping[str, TensorEntry],
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    data_start: int,
    threads: int,
    hooks: _Hooks,
) -> dict[str, str]:
    items = [
        WriteItem(
            name, tensors[name], dtypes[name], data_start + entry.begin, hooks.ready_for(name)
        )
        for name, entry in entries.items()
    ]
    return write_tensors(
        sink,
        items,
        threads=threads,
        chunk=hooks.checksum_chunk,
        digest=checksum_bytes if hooks.checksums else None,
    )


def _with_checksums(manifest: Manifest, checksums: Mapping[str, str]) -> Manifest:
    tensors = {
        n: replace(e, checksum=checksums.get(n, e.checksum)) for n, e in manifest.tensors.items()
    }
    return replace(manifest, tensors=tensors)


def _single_header(manifest: Manifest) -> bytes:
    # "format": "pt" is what Hugging Face loaders look for in a safetensors file.
    with paused_gc():
        metadata = {"format": "pt", MANIFEST_KEY: manifest_to_json(manifest)}
        return encode_header(manifest.tensors, metadata)


def _write_single(
    path: str,
    manifest: Manifest,
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    storage: Storage,
    threads: int,
    hooks: _Hooks,
) -> int:
    # The header holds the checksums, known only after the data is written: reserve its space
    # (checksums are fixed-width, so the final header has exactly the placeholder's length),
    # write the data, then the header.
    reserved = len(_single_header(manifest))
    size = reserved + sum(e.nbytes for e in manifest.tensors.values())

    def fill(sink: Sink) -> None:
        checksums = _write_items(sink, manifest.tensors, tensors, dtypes, reserved, threads, hooks)
        hooks.commit()
        header = _single_header(_with_checksums(manifest, checksums))
        if len(header) != reserved:
            raise AssertionError("header length changed between layout and commit")
        sink.pwrite(memoryview(header), 0)

    storage.write_file(path, size, fill)
    return size


def _write_directory(
    path: str,
    save_id: str,
    manifest: Manifest,
    files: list[str],
    members: Mapping[str, bytes],
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    storage: Storage,
    threads: int,
    hooks: _Hooks,
) -> int:
    check_replaceable(path, storage, (MANIFEST_FILE,))
    in_place = not storage.atomic_dirs
    if in_place:
        _check_members_free(path, members, storage)
    staging = storage.staging_dir(path)
    total = 0
    checksums: dict[str, str] = {}
    written: list[str] = []
    committing = False
    try:
        for file in files:
            shard = {n: e for n, e in manifest.tensors.items() if e.file == file}
            header = encode_header(shard, {"torchkeep_save": save_id})
            size = len(header) + sum(e.nbytes for e in shard.values())

            def fill(
                sink: Sink, shard: dict[str, TensorEntry] = shard, header: bytes = header
            ) -> None:
                sink.pwrite(memoryview(header), 0)
                checksums.update(
                    _write_items(sink, shard, tensors, dtypes, len(header), threads, hooks)
                )

            written.append(file)
            storage.write_file(f"{staging}/{file}", size, fill)
            total += size
        for name, data in members.items():

            def put(sink: Sink, data: bytes = data) -> None:
                sink.pwrite(memoryview(data), 0)

            written.append(name)
            storage.write_file(f"{staging}/{name}", len(data), put)
            total += len(data)
        hooks.commit()
        text = manifest_to_json(
            replace(_with_checksums(manifest, checksums), metadata={**manifest.metadata})
        ).encode()
        # The manifest is written last: it is the commit marker.
        committing = True
        storage.write_file(
            f"{staging}/{MANIFEST_FILE}",
            len(text),
            lambda sink: sink.pwrite(memoryview(text), 0),
        )
        total += len(text)
        storage.commit_dir(staging, path)
    except BaseException as e:
        if not in_place:
            storage.remove_dir(staging)
        elif not committing:  # only what this save wrote: the previous save is still committed
            for name in written:
                try:
                    storage.remove_file(f"{path}/{name}")
                except TorchkeepError as cleanup:  # the save's own error matters more
                    log.warning("could not delete %s/%s: %s", path, name, cleanup)
        elif isinstance(e, OSError):
            # The manifest may have been stored before the error (a timeout, an interrupted
            # answer): its shards stay, and the path holds this save or the previous one.
            raise StorageError(
                e.errno or errno.EIO,
                f"{path}: writing the manifest that commits this save failed ({e}); the path "
                "holds either this save or the previous one, whole",
            ) from e
        raise
    if in_place:
        _remove_replaced(path, {*files, *members, MANIFEST_FILE}, storage)
    return total


def _check_members_free(path: str, members: Mapping[str, bytes], storage: Storage) -> None:
    """In place, a member file (an exported program) would overwrite the committed save's copy
    before the new manifest commits: refuse before writing anything."""
    if not members or not storage.exists(f"{path}/{MANIFEST_FILE}"):
        return
    taken = sorted(set(members) & set(storage.list_dir(path)))
    if taken:
        raise StorageError(
            errno.EEXIST,
            f"{path}: holds a committed save with {taken[0]}; in object storage a new save "
            "cannot replace that file without a moment where neither save is whole. Save to a "
            "new path (a CheckpointManager does), or delete this one first",
        )


def _remove_replaced(path: str, kept: set[str], storage: Storage) -> None:
    """After an in-place commit: delete the shards of earlier saves (and of interrupted ones)."""
    for name in storage.list_dir(path):
        if name not in kept and SHARD_NAME.fullmatch(name):
            try:
                storage.remove_file(f"{path}/{name}")
            except StorageError as e:  # the new save is committed: only space is lost
                log.warning("could not delete the replaced %s/%s: %s", path, name, e)


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


def check_replaceable(path: str, storage: Storage, markers: tuple[str, ...]) -> None:
    """Refuse to replace a directory that is neither empty nor a save (one holding a marker)."""
    if not storage.is_dir(path) or any(storage.exists(f"{path}/{m}") for m in markers):
        return
    if all(SHARD_NAME.fullmatch(name) for name in storage.list_dir(path)):
        return  # empty, or holding only the shards of a save that never committed
    raise StorageError(
        errno.EEXIST,
        f"{path}: exists and is not a checkpoint; saving there would delete what it holds. "
        "Choose another name, or remove the directory first",
    )


# ---------------------------------------------------------------------------------------------
# reading


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
    _check_storage(where, storage)
    return Container(where, storage)


def _check_storage(path: str, storage: Storage) -> None:
    """A URL must reach its store, never a local directory named like it."""
    if is_url(path) and storage.atomic_dirs:
        raise UnsupportedFormatError(
            f"{path}: a URL given with local storage; pass it to a torchkeep function, which "
            "picks the storage from the URL (with storage_options=)"
        )
