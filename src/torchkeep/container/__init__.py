"""Containers: named tensors plus a manifest, as one safetensors file or a committed directory.

``write`` lays tensors out and writes them; ``commit`` is the one directory-commit protocol
(staging, members, the manifest last, commit, cleanup); ``read`` opens and validates a container
before anything is allocated from it, and reads, maps and verifies what it holds.
"""

from torchkeep.container.commit import DirectoryWrite, check_replaceable, uncertain_commit
from torchkeep.container.open import read_manifest
from torchkeep.container.read import READ_THREADS, Container, open_container
from torchkeep.container.write import (
    SHARD_BYTES,
    WRITE_THREADS,
    SaveInfo,
    WriteHooks,
    WriteOptions,
    layout,
    write_container,
    write_items,
)

__all__ = [
    "READ_THREADS",
    "SHARD_BYTES",
    "WRITE_THREADS",
    "Container",
    "DirectoryWrite",
    "SaveInfo",
    "WriteHooks",
    "WriteOptions",
    "check_replaceable",
    "layout",
    "open_container",
    "read_manifest",
    "uncertain_commit",
    "write_container",
    "write_items",
]
