"""What is at a path: the one answer that every reader and every command uses, and how to read
it (the formats parsed from local files are downloaded from object stores first).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
from collections.abc import Iterator

from torchkeep.errors import CheckpointNotFoundError, TorchkeepError
from torchkeep.format.names import (
    DCP_METADATA_FILE,
    HF_INDEX_FILES,
    HF_WEIGHT_FILES,
    LIGHTNING_CHECKPOINT_FILE,
    MANIFEST_FILE,
    pickle_kind,
)
from torchkeep.storage import DEFAULT_STORAGE, FsspecStorage, Storage, join

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    """The kinds of checkpoint torchkeep reads."""

    SAFETENSORS = "safetensors"  # a torchkeep file, or a plain one another tool wrote
    DIRECTORY = "torchkeep directory"  # committed, or not (reading it says what is missing)
    TORCH_ZIP = "torch zip"  # torch.save since torch 1.6
    TORCH_LEGACY = "torch legacy"  # torch.save before 1.6, or another pickle
    DCP = "torch.distributed.checkpoint"
    HUGGINGFACE = "Hugging Face directory"  # an index and its shards, or one weights file

    @property
    def pickled(self) -> bool:
        """Whether it is a ``torch.save`` file (read by the restricted unpickler)."""
        return self in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY)

    @property
    def parsed_locally(self) -> bool:
        """Whether torchkeep reads it from a local copy (downloaded first from object stores)."""
        return self not in (Kind.SAFETENSORS, Kind.DIRECTORY)


def detect(storage: Storage, path: str) -> Kind:
    """Say what kind of checkpoint is at ``path``, from its names or its first bytes.

    A directory holding ``manifest.json`` is torchkeep's, whatever else it holds; so is one
    holding none of the names other writers use (reading it then says what is missing).

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
    """
    if storage.is_dir(path):
        names = set(storage.list_dir(path))
        if MANIFEST_FILE in names:
            return Kind.DIRECTORY
        if DCP_METADATA_FILE in names:
            return Kind.DCP
        if names & {*HF_INDEX_FILES, *HF_WEIGHT_FILES}:
            return Kind.HUGGINGFACE
        return Kind.DIRECTORY
    try:
        source = storage.open(path)
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file or directory") from e
    try:
        head = source.read(0, min(16, source.size))
    finally:
        source.close()
    return {"zip": Kind.TORCH_ZIP, "torch-legacy": Kind.TORCH_LEGACY}.get(
        pickle_kind(head) or "", Kind.SAFETENSORS
    )


def checkpoint_inside(storage: Storage, path: str) -> str:
    """The path to read for ``path``: the file inside, for a directory that the Lightning plugin
    saved a checkpoint as (no manifest, its ``checkpoint.safetensors``); else ``path``."""
    if not storage.is_dir(path):
        return path
    names = set(storage.list_dir(path))
    if LIGHTNING_CHECKPOINT_FILE in names and MANIFEST_FILE not in names:
        return join(path, LIGHTNING_CHECKPOINT_FILE)
    return path


@contextlib.contextmanager
def readable(
    storage: Storage, path: str, *, download: bool = False
) -> Iterator[tuple[Storage, str, Kind]]:
    """Yield the storage and path to read ``path`` through, and what it holds.

    torchkeep's own saves and safetensors files are read from the store in place (unless
    ``download``). The formats parsed from local files (``torch.save`` pickles, Hugging Face
    and torch.distributed directories) are first downloaded to a temporary directory, removed
    afterwards. The directory the Lightning plugin saves a checkpoint as is read as the file
    it holds.
    """
    path = checkpoint_inside(storage, path)
    kind = detect(storage, path)
    if not isinstance(storage, FsspecStorage) or not (download or kind.parsed_locally):
        yield storage, path, kind
        return
    with tempfile.TemporaryDirectory(prefix="torchkeep-download-") as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1] or "download")
        log.info("downloading %s to %s to read it", path, local)
        size = storage.call(path, "sizing", "du", path)
        storage.call(path, "downloading", "get", path, local, recursive=True, nbytes=size)
        try:
            yield DEFAULT_STORAGE, local, kind
        except TorchkeepError as e:
            # Errors name the object, not the temporary copy they were found in.
            if not any(isinstance(a, str) and local in a for a in e.args):
                raise
            args = [a.replace(local, path) if isinstance(a, str) else a for a in e.args]
            raise type(e)(*args) from e
