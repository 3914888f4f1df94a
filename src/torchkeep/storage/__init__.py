"""Where bytes go: the ``Storage`` seam and its implementations.

``base`` holds the protocols and the operations written once over any storage; ``local`` the
atomic local files (and the only code that makes or recognises temporary names), with
``direct`` for their direct I/O; ``fsspec`` and
``s3`` the object stores; ``route`` picks the storage of a path or URL.
"""

from torchkeep.storage.base import Leftover, Linking, Sink, Source, Storage, recover_leftovers
from torchkeep.storage.fsspec import FsspecSource, FsspecStorage
from torchkeep.storage.local import (
    DEFAULT_STORAGE,
    LocalSource,
    LocalStorage,
    fsync_dir,
    hidden_target,
)
from torchkeep.storage.route import check_storage, is_url, join, storage_for
from torchkeep.storage.s3 import S3Storage

__all__ = [
    "DEFAULT_STORAGE",
    "FsspecSource",
    "FsspecStorage",
    "Leftover",
    "Linking",
    "LocalSource",
    "LocalStorage",
    "S3Storage",
    "Sink",
    "Source",
    "Storage",
    "check_storage",
    "fsync_dir",
    "hidden_target",
    "is_url",
    "join",
    "recover_leftovers",
    "storage_for",
]
