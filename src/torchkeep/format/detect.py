"""What is at a path, and how to read it: the formats parsed from local files are downloaded
from object stores first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.format import MANIFEST_FILE, SHARD_NAME, pickle_kind
from torchkeep.storage import DEFAULT_STORAGE, FsspecStorage, Storage

log = logging.getLogger(__name__)


@contextlib.contextmanager
def readable(
    storage: Storage, path: str, *, download: bool = False
) -> Iterator[tuple[Storage, str]]:
    """Yield the storage and path to read ``path`` through.

    torchkeep's own saves and safetensors files are read from the store in place (unless
    ``download``). The formats parsed from local files (``torch.save`` pickles, Hugging Face
    and torch.distributed directories) are first downloaded to a temporary directory, removed
    afterwards.
    """
    if not isinstance(storage, FsspecStorage) or (not download and _in_place(storage, path)):
        yield storage, path
        return
    with tempfile.TemporaryDirectory(prefix="torchkeep-download-") as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1] or "download")
        log.info("downloading %s to %s to read it", path, local)
        size = storage.call(path, "sizing", "du", path)
        storage.call(path, "downloading", "get", path, local, recursive=True, nbytes=size)
        try:
            yield DEFAULT_STORAGE, local
        except TorchkeepError as e:
            # Errors name the object, not the temporary copy they were found in.
            if not any(isinstance(a, str) and local in a for a in e.args):
                raise
            args = [a.replace(local, path) if isinstance(a, str) else a for a in e.args]
            raise type(e)(*args) from e


def _in_place(storage: FsspecStorage, path: str) -> bool:
    if storage.is_dir(path):
        names = storage.list_dir(path)
        # A torchkeep directory, committed or (shards only) not: read where it is, so that an
        # uncommitted one is reported as such without downloading it.
        return MANIFEST_FILE in names or all(SHARD_NAME.fullmatch(n) for n in names)
    try:
        source = storage.open(path)
    except CheckpointNotFoundError:
        return True  # reading it raises the error that says so
    try:
        head = source.read(0, min(16, source.size))
    finally:
        source.close()
    return pickle_kind(head) is None
