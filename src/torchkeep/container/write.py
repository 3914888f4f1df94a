"""Writing a container: named tensors plus a manifest, as one safetensors file or a directory.

``write_container`` lays tensors out and writes them through the engine. One file: the header
holding the manifest is written last into space reserved for it, then the file is renamed into
place. A directory: shards and members first, ``manifest.json`` last, committed by
``container.commit.DirectoryWrite``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from torchkeep.container.commit import DirectoryWrite
from torchkeep.container.share import Shared
from torchkeep.errors import (
    CorruptCheckpointError,
)
from torchkeep.format import (
    CHECKSUM_CHUNK,
    MANIFEST_FILE,
    MANIFEST_KEY,
    SHARD_SAVE_KEY,
    FileEntry,
    Manifest,
    TensorEntry,
    check_member_name,
    check_target_name,
    dtype_name,
    encode_header,
    is_single_file,
    manifest_to_json,
    shard_name,
)
from torchkeep.io import WriteItem, write_tensors
from torchkeep.io.checksum import checksum_bytes, checksum_data
from torchkeep.io.gc import paused_gc
from torchkeep.io.pool import IO_THREADS
from torchkeep.storage import (
    DEFAULT_STORAGE,
    Sink,
    Storage,
    check_storage,
)

log = logging.getLogger("torchkeep.container")


WRITE_THREADS = IO_THREADS

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
        file_bytes: bytes this save wrote, headers included (an incremental save does not
            count the shards it shares with its base: they were written before).
        seconds: wall time of the save.
        shared_bytes: bytes of tensor data an incremental save shares with its base instead
            of writing them.
    """

    path: str
    files: tuple[str, ...]
    tensors: int
    tensor_bytes: int
    file_bytes: int
    seconds: float
    shared_bytes: int = 0


def layout(
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
            dtype=dtype_name(dtype, where=name, shape=tuple(t.shape)),
            shape=tuple(t.shape),
            begin=position,
            end=position + nbytes,
            checksum=_PLACEHOLDER,
        )
        shards[-1].append((name, entry))
        position += nbytes
    return shards


@dataclass(frozen=True)
class WriteOptions:
    """What a save writes besides its tensors, and how.

    Attributes:
        tree: the typed-JSON skeleton of the saved object (None: a flat dict of tensors).
        aliases: names of tensors stored under another name (tied weights), to that name.
        metadata: the user's metadata (JSON values).
        files: other members of a directory save (an exported program), written beside the
            shards with their checksums in the manifest.
        model: the manifest's model section.
        dtype: the dtype each tensor is stored as, by name and tensor (default: its own).
        threads: writer threads.
        shard_bytes: the largest shard of a directory save.
        checksum_chunk: tensors larger than this are hashed in pieces of this size.
        checksums: False skips computing the tensors' checksums and leaves placeholders, so the
            result fails verification and will not load: it exists only to measure what
            checksums cost.
        ready: called with a tensor's name before its memory is first read (it may block until
            the data is there).
        before_commit: runs after the data is written and before the save commits, and may
            raise to abandon it.
        shared: the tensors an earlier directory save holds unchanged (``container.share``):
            their shards are linked into this save instead of being written again.
    """

    tree: Any = None
    aliases: Mapping[str, str] | None = None
    metadata: Mapping[str, Any] | None = None
    files: Mapping[str, bytes] | None = None
    model: Any = None
    dtype: Callable[[str, torch.Tensor], torch.dtype] | None = None
    threads: int = WRITE_THREADS
    shard_bytes: int = SHARD_BYTES
    checksum_chunk: int = CHECKSUM_CHUNK
    checksums: bool = True
    ready: Callable[[str], None] | None = None
    before_commit: Callable[[], None] | None = None
    shared: Shared | None = None


def write_container(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    storage: Storage = DEFAULT_STORAGE,
    options: WriteOptions = WriteOptions(),  # frozen: one shared default is safe
) -> SaveInfo:
    """Write ``tensors`` and their manifest to ``path`` (a ``.safetensors`` file or a directory),
    as a save of ``kind``, with what ``options`` adds."""
    tree, aliases, metadata = options.tree, options.aliases, options.metadata
    dtype, threads, shard_bytes = options.dtype, options.threads, options.shard_bytes
    files, model, checksum_chunk = options.files, options.model, options.checksum_chunk
    path = os.fspath(path)
    check_target_name(path)
    check_storage(path, storage)
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
    shared = options.shared or Shared("")
    if shared.entries and single:
        raise ValueError(f"{path}: only a directory save shares tensors with an earlier save")
    own = {n: t for n, t in tensors.items() if n not in shared.entries}
    with paused_gc():  # many small objects for a save of many tensors, none cyclic
        shards = layout(own, dtypes, shard_bytes if not single else 1 << 62)
        if shared.entries and not own:
            shards = []
        save_id = uuid.uuid4().hex
        # Built in place (object stores): names no earlier save used, so the previous save's
        # objects stay whole until the new manifest replaces its own. An incremental save's
        # own shards take names apart from those it shares.
        tag = "" if storage.atomic_dirs and not shared.links else save_id
        shard_files = ["" if single else shard_name(i, tag) for i in range(len(shards))]
        entries: dict[str, TensorEntry] = dict(shared.entries)
        for file, shard in zip(shard_files, shards, strict=True):
            for name, entry in shard:
                entries[name] = replace(entry, file=file or None)
    if set(files) & {*shard_files, *shared.links, MANIFEST_FILE}:
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
        shared=dict(shared.links),
    )
    data_bytes = sum(e.nbytes for e in entries.values())
    hooks = WriteHooks(options.ready, options.before_commit, checksum_chunk, options.checksums)
    if single:
        file_bytes = _write_single(path, manifest, tensors, dtypes, storage, threads, hooks)
        written: tuple[str, ...] = (os.path.basename(path),)
    else:
        links = {file: f"{shared.base}/{file}" for file in shared.links}
        file_bytes = _write_directory(
            path, save_id, manifest, shard_files, files, links, tensors, dtypes, storage, threads,
            hooks,
        )
        written = (*shard_files, *links, *files, MANIFEST_FILE)
    seconds = time.perf_counter() - started
    log.info(
        "saved %d tensors (%d bytes, %d of them shared with %s) to %s in %.3fs",
        *(len(entries), data_bytes, shared.nbytes, shared.base or "no earlier save", path, seconds),
    )
    return SaveInfo(
        path, written, len(entries), data_bytes, file_bytes, seconds, shared_bytes=shared.nbytes
    )


@dataclass(frozen=True)
class WriteHooks:
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


def write_items(
    sink: Sink,
    entries: Mapping[str, TensorEntry],
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    data_start: int,
    threads: int,
    hooks: WriteHooks,
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
    hooks: WriteHooks,
) -> int:
    # The header holds the checksums, known only after the data is written: reserve its space
    # (checksums are fixed-width, so the final header has exactly the placeholder's length),
    # write the data, then the header.
    reserved = len(_single_header(manifest))
    size = reserved + sum(e.nbytes for e in manifest.tensors.values())

    def fill(sink: Sink) -> None:
        checksums = write_items(sink, manifest.tensors, tensors, dtypes, reserved, threads, hooks)
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
    links: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    storage: Storage,
    threads: int,
    hooks: WriteHooks,
) -> int:
    write = DirectoryWrite.begin(path, storage, members=members)
    total = 0
    checksums: dict[str, str] = {}
    try:
        for file, source in links.items():
            write.link(file, source, manifest.shared[file])
        for file in files:
            shard = {n: e for n, e in manifest.tensors.items() if e.file == file}
            header = encode_header(shard, {SHARD_SAVE_KEY: save_id})
            size = len(header) + sum(e.nbytes for e in shard.values())

            def fill(
                sink: Sink, shard: dict[str, TensorEntry] = shard, header: bytes = header
            ) -> None:
                sink.pwrite(memoryview(header), 0)
                checksums.update(
                    write_items(sink, shard, tensors, dtypes, len(header), threads, hooks)
                )

            write.write(file, size, fill)
            total += size
        for name, data in members.items():
            write.put(name, data)
            total += len(data)
        hooks.commit()
        text = manifest_to_json(
            replace(_with_checksums(manifest, checksums), metadata={**manifest.metadata})
        ).encode()
        write.commit(text)  # the manifest, written last, is the commit marker
        total += len(text)
    except BaseException as e:
        write.discard()
        reported = write.failed(e)
        if reported is not e:
            raise reported from e
        raise
    write.finish()
    return total
