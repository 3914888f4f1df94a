"""Committing a directory save: one protocol for single saves, distributed saves and the Hugging
Face writer.

A ``DirectoryWrite`` builds the directory beside its path under a temporary name (where the
storage renames) or in place under names no earlier save used (object stores), writes the commit
marker (``manifest.json``, or a Hugging Face index) last, and commits. On failure it removes
what this save wrote and nothing else; once the commit went through, it removes the files of
the save it replaced (in place only: a rename replaced them whole).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable

from torchkeep.container.open import OpenedFile, close_files, open_file
from torchkeep.errors import CorruptCheckpointError, StorageError, TorchkeepError
from torchkeep.format import MANIFEST_FILE, SHARD_NAME, SHARD_SAVE_KEY
from torchkeep.storage import Linking, Sink, Storage

log = logging.getLogger("torchkeep.container")


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


def uncertain_commit(error: BaseException) -> str:
    """What to say when the write of an in-place commit marker failed: the store may have kept
    it before the error (a timeout, an interrupted answer), so either save may be the one."""
    return (
        f"writing the manifest that commits this save failed ({error}); the path holds either "
        "this save or the previous one, whole"
    )


class DirectoryWrite:
    """The files of one directory save, from staging to commit.

    Make one with ``begin`` (it checks the path and creates the staging directory); other
    processes of a distributed save write into the same ``staging`` through their own
    ``DirectoryWrite(path, storage, staging)``.
    """

    def __init__(self, path: str, storage: Storage, staging: str) -> None:
        self.path = path
        self.storage = storage
        self.staging = staging
        self.in_place = not storage.atomic_dirs
        self.written: list[str] = []
        self.kept: list[str] = []  # in place: files of the save at path this one also holds
        self.committing = False

    @classmethod
    def begin(
        cls,
        path: str,
        storage: Storage,
        *,
        marker: str = MANIFEST_FILE,
        members: Iterable[str] = (),
    ) -> DirectoryWrite:
        """Check that ``path`` may be replaced and create the staging directory.

        Raises:
            StorageError: ``path`` holds something that is not a save; or, in place, a save
                whose ``members`` the new one would overwrite before it commits.
        """
        check_replaceable(path, storage, (marker,))
        if not storage.atomic_dirs:
            _check_members_free(path, set(members), storage, marker)
        return cls(path, storage, storage.staging_dir(path))

    def write(self, name: str, size: int, fill: Callable[[Sink], None]) -> None:
        """Write the member ``name`` (see ``Storage.write_file``)."""
        self.written.append(name)
        self.storage.write_file(f"{self.staging}/{name}", size, fill)

    def link(self, name: str, source: str, origin: str) -> bool:
        """Make the member ``name`` hold the shard ``source`` of another save, written by the
        save ``origin`` (see ``Linking.link_file``); return whether it was linked. In place, a
        save at ``path`` may hold that file already (a shard's name carries the id of the save
        that wrote it, so it holds the same bytes): it is kept as it is (False), and not
        removed if this save fails.

        Raises:
            CorruptCheckpointError: the linked file's header names another save: ``source``
                was replaced since the save planned to share it.
        """
        storage = self.storage
        if not isinstance(storage, Linking):
            raise ValueError(f"{self.path}: this storage cannot share files between saves")
        if self.in_place and storage.exists(f"{self.path}/{name}"):
            self.kept.append(name)
            return False
        self.written.append(name)
        storage.link_file(source, f"{self.staging}/{name}")
        files: dict[str | None, OpenedFile] = {}
        try:
            found = open_file(storage, self.staging, name, files).header.metadata.get(
                SHARD_SAVE_KEY
            )
        finally:
            close_files(files)
        if found != origin:
            raise CorruptCheckpointError(
                f"{self.staging}/{name}: the base's file was replaced while this save shared "
                f"it (its header names save {found!r:.40}, not {origin}); nothing was "
                "committed. Save again"
            )
        return True

    def put(self, name: str, data: bytes) -> None:
        """Write the member ``name`` holding ``data``."""
        self.write(name, len(data), lambda sink: sink.pwrite(memoryview(data), 0))

    def wrote(self, names: Iterable[str]) -> None:
        """Record members written by others (the other ranks, or a nested save)."""
        self.written.extend(n for n in names if n not in self.written)

    def commit(self, text: bytes, *, marker: str = MANIFEST_FILE) -> None:
        """Write the commit marker, last, and make the directory the save at ``path``."""
        self.committing = True
        self.put(marker, text)
        self.storage.commit_dir(self.staging, self.path)

    def failed(self, error: BaseException) -> BaseException:
        """The error to report for ``error``, raised while writing or committing: in place, a
        failed write of the commit marker may have stored it, which the error then says."""
        if self.in_place and self.committing and isinstance(error, OSError):
            return StorageError(error.errno or errno.EIO, f"{self.path}: {uncertain_commit(error)}")
        return error

    def discard(self) -> None:
        """Remove what this save wrote, after a failure; the previous save stays whole. (In
        place, once the commit marker is being written, nothing is removed: the marker there
        is this save's or the previous one's.)"""
        if not self.in_place:
            self.storage.remove_dir(self.staging)
            return
        if self.committing:
            return
        for name in self.written:
            try:
                self.storage.remove_file(f"{self.path}/{name}")
            except TorchkeepError as e:  # the save's own error matters more
                log.warning("could not delete %s/%s: %s", self.path, name, e)

    def finish(self) -> None:
        """After the commit, in place: delete the shards of earlier (and interrupted) saves."""
        if not self.in_place:
            return
        kept = {*self.written, *self.kept}
        for name in self.storage.list_dir(self.path):
            if name not in kept and SHARD_NAME.fullmatch(name):
                try:
                    self.storage.remove_file(f"{self.path}/{name}")
                except StorageError as e:  # the new save is committed: only space is lost
                    log.warning("could not delete the replaced %s/%s: %s", self.path, name, e)


def _check_members_free(path: str, members: set[str], storage: Storage, marker: str) -> None:
    """In place, a member file (an exported program) would overwrite the committed save's copy
    before the new manifest commits: refuse before writing anything."""
    if not members or not storage.exists(f"{path}/{marker}"):
        return
    taken = sorted(members & set(storage.list_dir(path)))
    if taken:
        raise StorageError(
            errno.EEXIST,
            f"{path}: holds a committed save with {taken[0]}; in object storage a new save "
            "cannot replace that file without a moment where neither save is whole. Save to a "
            "new path (a CheckpointManager does), or delete this one first",
        )

