"""Which storage a path is on: ``storage_for(path, storage_options)``, ``is_url`` and ``join``.

Local paths get ``LocalStorage``; URLs get an ``FsspecStorage`` on the URL's fsspec file system
(an ``S3Storage`` on S3). fsspec and the backend, such as s3fs, are the optional ``remote`` extra,
imported here and only for URLs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from torchkeep._optional import importing
from torchkeep.errors import UnsupportedFormatError
from torchkeep.storage.base import Storage
from torchkeep.storage.fsspec import FsspecStorage
from torchkeep.storage.local import DEFAULT_STORAGE
from torchkeep.storage.s3 import S3Storage

# Object stores, where an object appears whole when its upload completes. Other fsspec file
# systems (sftp, hdfs, ftp, …) write a file in place, so a crash could leave a torn one: mount
# them and use a local path instead.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://…``) rather than a local path."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and (_SCHEME.fullmatch(scheme) is not None or "::" in scheme)


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def storage_for(
    path: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
) -> tuple[Storage, str]:
    """Return the storage for ``path`` and the path as that storage names it: ``storage``
    itself when one is given (the public seam where tests inject faults).

    Raises:
        MissingDependencyError: a URL whose fsspec backend is not installed.
        UnsupportedFormatError: a URL scheme fsspec does not know.
        ValueError: ``storage_options`` for a local path, or with ``storage``.
    """
    text = os.fspath(path)
    if storage is not None:
        if storage_options:
            raise ValueError(
                f"{text}: storage_options configure the storage a URL names; give them or a "
                "storage, not both"
            )
        return storage, text
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_url(text):
        scheme, sep, rest = text.partition(":/")
        if sep and scheme.lower() in OBJECT_STORES and not isinstance(path, str):
            raise UnsupportedFormatError(
                f"{text}: looks like the URL {scheme}://{rest} made into a pathlib.Path, which "
                "drops a slash; pass URLs as strings"
            )
        if storage_options:
            raise ValueError(
                f"{text}: storage_options apply to URLs (s3://…, gs://…); this is a local path"
            )
        return DEFAULT_STORAGE, text
    protocol = text.partition("://")[0]
    if protocol.lower() not in OBJECT_STORES:
        raise UnsupportedFormatError(
            f"{text}: torchkeep writes checkpoints to object stores ({', '.join(OBJECT_STORES)}"
            f"://), where an object appears whole or not at all; {protocol}:// is not one. "
            "Mount it and use a local path"
        )
    if any(c in text for c in "*?["):
        raise UnsupportedFormatError(
            f"{text}: '*', '?' and '[' in a URL are wildcards to fsspec; rename the path"
        )
    fs = _filesystem(text, protocol, dict(storage_options or {}))
    cls = S3Storage if S3Storage.fits(fs) else FsspecStorage
    return cls(fs, protocol), text.rstrip("/")


def _filesystem(url: str, protocol: str, options: dict[str, Any]) -> Any:
    with importing(
        "remote", f"{url}: URLs are read and written through fsspec, which is not installed"
    ):
        import fsspec
    try:
        with importing(
            "remote",
            f"{url}: the {protocol}:// backend of fsspec is not installed ({{error}})",
            also="" if protocol in ("s3", "s3a") else f" and {protocol}'s backend",
        ):
            return fsspec.filesystem(protocol, **options)
    except ValueError as e:
        raise UnsupportedFormatError(f"{url}: fsspec knows no {protocol}:// storage ({e})") from e
    except TypeError as e:
        raise ValueError(f"{url}: storage_options not accepted by {protocol}:// ({e})") from e


def check_storage(path: str, storage: Storage) -> None:
    """Refuse a URL given with local storage: it must reach its store, never a local directory
    named like it."""
    if is_url(path) and storage.atomic_dirs:
        raise UnsupportedFormatError(
            f"{path}: a URL given with local storage; pass it to a torchkeep function, which "
            "picks the storage from the URL (with storage_options=)"
        )
