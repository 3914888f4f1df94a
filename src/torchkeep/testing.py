"""Test doubles for code that saves with torchkeep: the ones torchkeep's own tests use.

* ``FaultyStorage``: a local storage that fails one named step of the write path: it raises
  there, or ends the process on the spot (``os._exit``, as a kill would), for the fault tests.
  ``CheckpointManager`` takes it as ``storage=``:

    ```python
    from torchkeep.testing import FaultyStorage

    storage = FaultyStorage("commit")
    storage.armed = False  # the first save goes through
    with tk.CheckpointManager(root, keep_last=1, storage=storage) as manager:
        manager.save(1, state)
        storage.armed = True
        with pytest.raises(OSError, match="injected"):
            manager.save(2, state)
    ```

* ``MotoServer``: moto's S3 server on loopback, for the remote-storage benchmark and tests
  (``moto[server]``, a development dependency, runs in its own process, started only when a
  server is), and ``options``, the ``storage_options`` that reach it.

``import torchkeep`` does not import this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

from torchkeep.storage import LocalStorage, Sink

__all__ = [
    "CREDENTIALS",
    "DIRECTORY_STEPS",
    "EXIT_CODE",
    "FILE_STEPS",
    "INCREMENTAL_STEPS",
    "MANAGER_STEPS",
    "FaultyStorage",
    "InjectedFault",
    "MotoServer",
    "free_port",
    "options",
]

# ---------------------------------------------------------------------------------------------
# a storage that fails at a named step

EXIT_CODE = 75  # the process ended at the named step (and not elsewhere)

# The steps of the write paths, in the order a save meets them.
FILE_STEPS = ["open", "write-first", "write-middle", "fsync", "rename", "dir-fsync"]
DIRECTORY_STEPS = ["mkdir", *FILE_STEPS, "manifest", "manifest-fsync", "commit"]
MANAGER_STEPS = [*DIRECTORY_STEPS, "delete"]
# An incremental save links the shards it shares before it writes its own.
INCREMENTAL_STEPS = ["mkdir", "link", *DIRECTORY_STEPS[1:], "delete"]


class InjectedFault(OSError):
    """The failure a ``FaultyStorage`` raises at its step (an OSError, EIO)."""


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
        if step not in INCREMENTAL_STEPS:
            raise ValueError(
                f"{step!r} is not a step of the write path; one of {', '.join(MANAGER_STEPS)}, "
                "or link (of an incremental save)"
            )
        if action not in ("raise", "exit"):
            raise ValueError(f"action {action!r} is neither 'raise' nor 'exit'")
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

    def _link(self, source: str, path: str) -> None:
        self._at("link")
        super()._link(source, path)

    def staging_dir(self, path: str) -> str:
        self._at("mkdir")
        return super().staging_dir(path)

    def commit_dir(self, staging: str, path: str, *, replace_entry: bool = False) -> None:
        self._at("commit")
        super().commit_dir(staging, path, replace_entry=replace_entry)

    def remove_dir(self, path: str) -> None:
        self._at("delete")
        super().remove_dir(path)


# ---------------------------------------------------------------------------------------------
# moto's S3 server on loopback

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def options(endpoint: str, *, fast_fail: bool = False) -> dict[str, Any]:
    """s3fs storage_options for ``endpoint``; ``fast_fail``: one attempt, short timeouts."""
    opts: dict[str, Any] = {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    if fast_fail:
        opts["config_kwargs"] = {
            "connect_timeout": 1,
            "read_timeout": 1,
            "retries": {"max_attempts": 1, "mode": "standard"},
        }
    return opts


class MotoServer:
    """moto's S3 server on a free 127.0.0.1 port, for as long as the test session runs."""

    def __init__(self) -> None:
        env = {**os.environ, **CREDENTIALS}
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError("moto's S3 server did not start")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return True
            time.sleep(0.1)
        return False

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        """Create a bucket through the S3 API; return its name."""
        name = f"tk-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
