"""Incremental saves: which tensors an earlier directory save already holds, proven by checksum.

A tensor is shared with the earlier save (the base) when the base holds a tensor of the same
name, dtype and shape whose checksum equals the checksum of the bytes the new save would write.
The checksum is the proof and is always computed; the caller's hint (``likely_changed``, from
tensor version counters) only spares hashing the tensors that are about to be written anyway.
The base's shards holding shared tensors are then linked into the new save (``Linking.
link_file``): each save stays a whole directory on its own, whatever happens to the other. A
shard is linked only when what is shared from it is most of it (``SHARE_FRACTION``): to share a
few small tensors of a large file, they are written again instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.container.open import OpenedFile, close_files, open_directory
from torchkeep.errors import CheckpointNotFoundError, StateMismatchError
from torchkeep.format import SAVE_ID, Manifest, TensorEntry, dtype_name, is_single_file
from torchkeep.io import WriteItem, write_tensors
from torchkeep.storage import Linking, Storage, is_url

Hint = tuple[Any, ...]
Hints = dict[str, Hint | None]

# A base shard is linked only when the tensors shared from it hold at least this fraction of its
# bytes: linking a large file for a few small tensors would keep all of it on the disk (on object
# storage, copy all of it) to spare writing them.
SHARE_FRACTION = 0.5


@dataclass(frozen=True)
class Base:
    """An earlier directory save, opened and checked as the base of an incremental save."""

    path: str
    manifest: Manifest
    file_bytes: dict[str, int] = field(default_factory=dict)  # each shard's size


@dataclass(frozen=True)
class Shared:
    """What a new save takes from its base instead of writing it.

    Attributes:
        base: the base's path.
        entries: each shared tensor's entry in the base (its shard, span and checksum).
        links: each shard of the base holding a shared tensor, to the id of the save that
            wrote it (the base itself, or one the base shares it from).
        comparable: how many tensors the base holds under the same name, dtype and shape
            (shared or not).
    """

    base: str
    entries: dict[str, TensorEntry] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    comparable: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data shared."""
        return sum(e.nbytes for e in self.entries.values())


def open_base(path: str, storage: Storage) -> Base:
    """Read the manifest of ``path`` and check every shard it names, before anything is written.

    Raises:
        ValueError: ``path`` names a one-file save (it cannot be a base).
        CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: the base is
            missing, never committed, or damaged.
    """
    if is_single_file(path):
        raise ValueError(
            f"{path}: a one-file save cannot be a base; a base is an earlier directory save "
            "(any path not ending in .safetensors)"
        )
    if not storage.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint to use as the base")
    files: dict[str | None, OpenedFile] = {}
    try:
        manifest = open_directory(storage, path, files)
        sizes = {name: opened.source.size for name, opened in files.items() if name is not None}
    finally:
        close_files(files)
    return Base(path, manifest, sizes)


def plan_sharing(
    base: Base,
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    *,
    chunk: int,
    threads: int,
    likely_changed: Callable[[str], bool] | None = None,
) -> Shared:
    """Find the tensors of ``tensors`` (stored as ``dtypes``) whose bytes ``base`` already holds
    under the same name.

    Tensors that ``likely_changed`` names are not hashed here: they are written, and their
    checksums computed then. Every other candidate is hashed, in pieces of ``chunk`` bytes on
    ``threads`` threads, and shared only if its checksum matches (and most of its shard is
    shared: ``SHARE_FRACTION``).
    """
    manifest = base.manifest
    candidates: list[WriteItem] = []
    comparable = 0
    for name, t in tensors.items():
        entry = manifest.tensors.get(name)
        if (
            entry is None
            or entry.file is None
            or entry.shape != tuple(t.shape)
            or entry.dtype != dtype_name(dtypes[name], where=name, shape=tuple(t.shape))
        ):
            continue
        comparable += 1
        # A shard of a save made before saves had ids cannot be shared: its header names none.
        hashed = likely_changed is None or not likely_changed(name)
        if hashed and SAVE_ID.fullmatch(manifest.origin(entry.file)):
            candidates.append(WriteItem(name, t, dtypes[name], entry.begin))
    if not candidates or manifest.checksum_chunk != chunk:
        # (checksums computed in pieces of another size cannot be compared)
        return Shared(base.path, comparable=comparable)
    checksums = write_tensors(_Discard(), candidates, threads=threads, chunk=chunk)
    unchanged = {
        name: manifest.tensors[name]
        for name, checksum in checksums.items()
        if checksum == manifest.tensors[name].checksum
    }
    by_file: dict[str, int] = {}
    for entry in unchanged.values():
        assert entry.file is not None
        by_file[entry.file] = by_file.get(entry.file, 0) + entry.nbytes
    links = {
        file: manifest.origin(file)
        for file, nbytes in by_file.items()
        if nbytes >= SHARE_FRACTION * base.file_bytes.get(file, 0)
    }
    entries = {name: e for name, e in unchanged.items() if e.file in links}
    return Shared(base.path, entries, links, comparable)


def share_with(
    base: str,
    path: str,
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    storage: Storage,
    *,
    chunk: int,
    threads: int,
) -> Shared:
    """Check ``base`` as the base of a directory save to ``path`` on ``storage``, and find what
    the save shares with it; all before anything is written.

    Raises:
        ValueError: ``path`` is a one-file save, ``base`` is ``path`` itself, on another
            storage, or a save that cannot be a base (see ``open_base``).
        StateMismatchError: ``base`` holds no tensor of this state's names, dtypes and shapes.
        CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: ``base`` is
            missing, never committed, or damaged.
    """
    check_base_path(base, path, storage)
    opened = open_base(base, storage)
    shared = plan_sharing(opened, tensors, dtypes, chunk=chunk, threads=threads)
    if tensors and not shared.comparable:
        raise unrelated(base)
    return shared


def check_base_path(base: str, path: str, storage: Storage) -> None:
    """Refuse, as a ``ValueError``, a base that cannot be one for a save to ``path``."""
    if is_single_file(path):
        raise ValueError(
            f"{path}: a one-file save cannot share tensors with a base; save to a directory "
            "(a path not ending in .safetensors)"
        )
    if _place(base) != _place(path):
        raise ValueError(f"{base}: a base must be on the storage the save goes to ({path})")
    if _normal(base) == _normal(path):
        raise ValueError(
            f"{path}: a save cannot be its own base; save to a new path, with base= naming "
            "the earlier save"
        )
    if not isinstance(storage, Linking):
        raise ValueError(f"{path}: this storage cannot share files between saves")


def unrelated(base: str) -> StateMismatchError:
    """The error for a base holding no tensor of the state's names, dtypes and shapes."""
    return StateMismatchError(
        f"{base}: holds no tensor of this state's names, dtypes and shapes; it is not an "
        "earlier save of this state. Pass the previous save of this state as base=, or save "
        "without one"
    )


def _place(path: str) -> str:
    return path.split("://", 1)[0] if is_url(path) else ""


def _normal(path: str) -> str:
    return path.rstrip("/") if is_url(path) else os.path.realpath(path)


# -- hints: which tensors probably changed since the last save
#
# A hint is where a tensor's data is and how often it was changed in place. It only guides how
# much work a save does: a tensor whose hint changed is written (its checksum computed then); one
# whose hint did not is hashed first and shared only if its checksum matches. Writes that bypass
# the version counter (through ``.data``, or numpy) therefore cost at most a second pass over the
# tensor, never a stale one.


def hint_of(t: torch.Tensor) -> Hint | None:
    """Where ``t``'s data is and how often it was changed in place; None when unknown."""
    local = getattr(t, "to_local", None)  # a DTensor: its part on this rank
    if callable(local):
        t = local()
    try:
        return (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            t.dtype,
            tuple(t.shape),
            t.stride(),
            t._version,
        )
    except (RuntimeError, NotImplementedError):  # inference tensors keep no version counter
        return None


def hints_of(tensors: Mapping[str, torch.Tensor]) -> Hints:
    return {name: hint_of(t) for name, t in tensors.items()}


def changed_since(earlier: Hints | None, now: Hints) -> Callable[[str], bool] | None:
    """Whether a tensor's hint differs from the earlier save's (None: nothing to compare with,
    so every tensor is hashed)."""
    if earlier is None:
        return None

    def changed(name: str) -> bool:
        before, after = earlier.get(name), now.get(name)
        return before is not None and after is not None and before != after

    return changed


class _Discard:
    """A sink that keeps nothing: the writer hashes what it would write."""

    def pwrite(self, data: memoryview, offset: int) -> None:
        pass

    def written(self, offset: int, nbytes: int) -> None:
        pass
