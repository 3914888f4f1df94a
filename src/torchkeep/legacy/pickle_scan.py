"""``scan``: every global a file's pickles name, listed without running any of them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedFormatError
from torchkeep.format.detect import Kind, readable
from torchkeep.legacy.torch_save import MAX_SCANNED_BYTES
from torchkeep.legacy.torch_zip import ZipTable, read_file_entry, read_zip_file
from torchkeep.legacy.unpickler import classify, scan_pickles
from torchkeep.storage import storage_for


@dataclass(frozen=True)
class ScanReport:
    """What loading a file would import and call.

    Attributes:
        format: ``safetensors``, ``torch zip``, ``torch legacy``, ``torchscript`` or ``unknown``.
        globals: every global the file's pickles name (module.name), sorted.
        unsafe: those that loading with pickle would import and call, outside torch's own
            (torch's tensor-rebuilding functions are never listed here).
        safe: True when torchkeep can load the file without running any of its code.
    """

    path: str
    format: str
    globals: tuple[str, ...]
    unsafe: tuple[str, ...]
    safe: bool
    verdict: str


def _iter_zip_pickles(archive: ZipTable) -> Iterator[tuple[str, bytes]]:
    for name, record in archive.entries.items():
        if name.endswith(".pkl"):
            yield name, read_file_entry(archive.where, record)


def scan(
    source: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> ScanReport:
    """List every global a file's pickles would import and call, without running any of them.

    ``source`` may be a URL (``s3://…``, downloaded first) with its fsspec ``storage_options``.

    Example:
        ```python
        report = tk.scan("downloaded.pth")
        if not report.safe:
            print("would run:", report.unsafe)
        ```
    """
    storage, url = storage_for(source, storage_options)
    if storage.is_dir(url):
        raise UnsupportedFormatError(f"{url}: scan takes a file, not a directory")
    with readable(storage, url, download=True) as (_, path, kind):
        report = _scan(path, kind)
        return replace(report, path=url, verdict=report.verdict.replace(path, url))


def _scan(path: str, kind: Kind) -> ScanReport:
    names: list[str] = []
    problems: list[str] = []
    fmt = kind.value if kind.pickled else "safetensors"
    if kind is Kind.TORCH_ZIP:
        try:
            archive = read_zip_file(path)
            for _, data in _iter_zip_pickles(archive):
                names += scan_pickles(data, problems)
        except UnsafeFileError as e:
            return ScanReport(path, "torchscript", (), (), False, f"unsafe: {e}")
        except (CorruptCheckpointError, UnsupportedFormatError) as e:
            return ScanReport(path, "zip", (), (), False, f"refused: {e}")
    elif kind is Kind.TORCH_LEGACY:
        with open(path, "rb") as f:
            # The pickles come first; the storage bytes after them need not be read.
            names = scan_pickles(f.read(MAX_SCANNED_BYTES), problems)
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        if len(head) < 16 or head[8:9] != b"{":
            return ScanReport(path, "unknown", (), (), False, "not a checkpoint torchkeep knows")
        return ScanReport(path, "safetensors", (), (), True, "safe: no pickle, no code")
    found = tuple(sorted(set(names)))
    dangerous, unread = classify(found)
    unsafe = tuple(dangerous)
    if unsafe:
        verdict = f"unsafe: loading with pickle would import and call {', '.join(unsafe)}"
    elif unread:
        verdict = (
            f"unsupported: only torch's own functions ({', '.join(unread)}), which run no code "
            "of the file's, but torchkeep does not read what they rebuild yet"
        )
    elif problems:
        # Nothing to run was seen before the damage; what pickle makes of the rest is unknown.
        verdict = f"refused: a malformed pickle ({problems[0]}); torchkeep will not load it"
    else:
        verdict = "safe: only plain data; torchkeep loads it without running code"
    safe = not unsafe and not unread and not problems
    return ScanReport(path, fmt, found, unsafe, safe, verdict)
