"""The storage seam: what torchkeep needs from a file system or an object store.

A ``Storage`` writes whole files atomically (``write_file``), opens files for positional reads
(``open``), and commits directories built under a temporary name (``commit_dir``). The engine in
``torchkeep.io`` only sees ``Sink`` and ``Source`` objects, so tests inject faults by wrapping a
storage rather than patching internals.

Taking a committed directory out of use before deleting it (``Storage.retire_dir``) and dealing
with what interrupted saves left (``recover_leftovers``) are storage operations too: only the
storage knows the temporary names it made.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Sink(Protocol):
    """A file being written: positional writes from any thread."""

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""

    def written(self, offset: int, nbytes: int) -> None:
        """Hint that a range is complete, so the storage may start flushing it."""


class Source(Protocol):
    """A file being read: positional reads from any thread."""

    name: str
    size: int

    def readinto(self, buffers: list[memoryview], offset: int) -> None:
        """Fill ``buffers`` with consecutive bytes from ``offset``; raise on a short read."""

    def read(self, offset: int, nbytes: int) -> bytes:
        """Return ``nbytes`` bytes from ``offset``; raise on a short read."""

    def map(self) -> mmap.mmap:
        """Return a private copy-on-write mapping of the whole file."""

    def close(self) -> None:
        """Release the file."""


class Storage(Protocol):
    """The operations torchkeep needs from a file system or object store.

    ``atomic_dirs`` says whether ``commit_dir`` swaps a whole directory in at once (a local
    rename); where it does not (object stores), a directory save is built in place under
    object names no earlier save used, and its manifest, written last, commits it.
    """

    atomic_dirs: bool

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        """Create ``path`` holding ``size`` bytes written by ``fill``, atomically and durably."""

    def open(self, path: str) -> Source:
        """Open ``path`` for reading."""

    def exists(self, path: str) -> bool:
        """Return whether ``path`` exists."""

    def is_dir(self, path: str) -> bool:
        """Return whether ``path`` is a directory."""

    def staging_dir(self, path: str) -> str:
        """Create and return an empty directory beside ``path`` to build it in."""

    def commit_dir(self, staging: str, path: str) -> None:
        """Make the staging directory ``path`` atomically, replacing any previous one."""

    def remove_dir(self, path: str) -> None:
        """Remove a directory and everything in it."""

    def remove_file(self, path: str) -> None:
        """Remove one file, if it exists."""

    def make_dirs(self, path: str) -> None:
        """Create directory ``path`` and its parents, if missing."""

    def list_dir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted (none if it does not exist)."""

    def retire_dir(
        self, path: str, *, commit_marker: str | None = None, previous: bool = False
    ) -> str:
        """Take the committed directory ``path`` out of use in one durable step, so that no
        reader ever sees it half deleted, and return where its remains are (delete them with
        ``remove_dir``). Where the storage renames, the directory moves to a hidden name beside
        it (with ``previous``, that of a replacement's previous version, which
        ``recover_leftovers`` puts back if nothing takes ``path``'s place); elsewhere (object
        stores) its ``commit_marker`` file is removed. Raises ``StorageError`` when it could not
        be done: the directory is then still whole."""

    def leftovers(self, directory: str) -> list[Leftover]:
        """What interrupted saves, replacements and deletions left in ``directory``."""

    def recover(self, leftover: Leftover, whole: Callable[[str], bool]) -> bool:
        """Put back a previous version moved aside, if ``whole`` says it is intact, or remove
        the leftover; return whether it was put back."""


@runtime_checkable
class Linking(Protocol):
    """A storage whose saves can share files with earlier saves (incremental saves):
    ``LocalStorage`` and ``FsspecStorage`` are. Saves through a storage without ``link_file``
    (one written for an earlier torchkeep) are written whole."""

    def link_file(self, source: str, path: str) -> None:
        """Make ``path``, in a directory being built, hold the same bytes as the committed file
        ``source``, owned by both: a hard link where the storage has them, else a copy (made by
        the store itself where it can)."""


@dataclass(frozen=True)
class Leftover:
    """An entry an interrupted save, replacement or deletion left beside ``target``.

    ``moved_aside`` marks the previous version of ``target``, moved aside by a two-rename
    replacement (where the atomic exchange is unavailable) that may have died before the new
    version took its place.
    """

    path: str
    target: str
    moved_aside: bool


def recover_leftovers(
    storage: Storage,
    directory: str,
    whole: Callable[[str], bool],
    *,
    belongs: Callable[[Leftover], bool] = lambda leftover: True,
) -> list[tuple[Leftover, bool]]:
    """Deal with every leftover in ``directory`` that ``belongs`` to the caller: a previous
    version moved aside goes back when its target is missing and ``whole(path)`` says it is
    intact; everything else is removed. Returns each leftover dealt with, and whether it was put
    back. Call it only while no save into ``directory`` is in flight."""
    done = []
    for leftover in storage.leftovers(directory):
        if belongs(leftover):
            done.append((leftover, storage.recover(leftover, whole)))
    return done
