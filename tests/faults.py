"""A local storage that fails one named step of the write path: it raises there, or ends the
process on the spot (``os._exit``, as a kill would), for the fault tests."""

from __future__ import annotations

import errno
import os
from typing import Any

from torchkeep.storage import LocalStorage, Sink

EXIT_CODE = 75  # the process ended at the named step (and not elsewhere)

# The steps of the write paths, in the order a save meets them.
FILE_STEPS = ["open", "write-first", "write-middle", "fsync", "rename", "dir-fsync"]
DIRECTORY_STEPS = ["mkdir", *FILE_STEPS, "manifest", "manifest-fsync", "commit"]
MANAGER_STEPS = [*DIRECTORY_STEPS, "delete"]


class InjectedFault(OSError):
    pass


class _Sink:
    def __init__(self, sink: Sink, storage: FaultyStorage) -> None:
        self._sink = sink
        self._storage = storage

    def pwrite(self, data: memoryview, offset: int) -> None:
        at = self._storage.byte
        if at is not None and offset <= at < offset + len(data):
            self._sink.pwrite(data[: at - offset], offset)  # the bytes before it land
            self._storage.act()
        self._sink.pwrite(data, offset)

    def written(self, offset: int, nbytes: int) -> None:
        self._sink.written(offset, nbytes)


class FaultyStorage(LocalStorage):
    """Fails ``step`` of every file written after ``armed`` is set (by default at once):
    ``action`` "raise" raises an OSError (EIO), "exit" ends the process with EXIT_CODE."""

    def __init__(self, step: str, action: str = "raise", *, middle: int = 1 << 20) -> None:
        assert step in MANAGER_STEPS and action in ("raise", "exit"), (step, action)
        self.step = step
        self.action = action
        self.middle = middle
        self.armed = True
        self.byte: int | None = None
        self._manifest = False

    def act(self) -> None:
        if not self.armed:
            return
        if self.action == "exit":
            os._exit(EXIT_CODE)
        raise InjectedFault(errno.EIO, f"injected failure at {self.step}")

    def _at(self, *steps: str) -> None:
        if self.step in steps:
            self.act()

    def write_file(self, path: str, size: int, fill: Any) -> None:
        self._manifest = path.endswith("/manifest.json")
        if self._manifest:
            self._at("manifest")
        else:
            self._at("open")
        super().write_file(path, size, fill)

    def _sink(self, fd: int, path: str) -> Sink:
        sink = super()._sink(fd, path)
        self.byte = None
        if not self._manifest and self.step == "write-first":
            self.byte = 0
        elif not self._manifest and self.step == "write-middle":
            self.byte = self.middle
        return _Sink(sink, self) if self.byte is not None else sink

    def _fsync(self, fd: int) -> None:
        self._at("manifest-fsync" if self._manifest else "fsync")
        super()._fsync(fd)

    def _replace(self, tmp: str, path: str) -> None:
        self._at("rename")
        super()._replace(tmp, path)

    def _fsync_dir(self, directory: str) -> None:
        self._at("dir-fsync")
        super()._fsync_dir(directory)

    def staging_dir(self, path: str) -> str:
        self._at("mkdir")
        return super().staging_dir(path)

    def commit_dir(self, staging: str, path: str) -> None:
        self._at("commit")
        super().commit_dir(staging, path)

    def remove_dir(self, path: str) -> None:
        self._at("delete")
        super().remove_dir(path)
