"""The zip archive of ``torch.save``: one validated table of its entries, read from a whole file
or from a payload that a torch.distributed.checkpoint file holds at a span of its own.

Every entry is checked before anything is allocated from it: stored (``torch.save`` never
compresses), named once, behind its local header, inside the archive, and sharing no byte with
another entry, so that what is allocated for the entries never exceeds the file's size. The
archive holds one ``data.pkl`` (its directory is the prefix of every name). A whole file may be
big-endian (written on such a machine; its storages are byte-swapped as they are read); a DCP
payload must be little-endian.

Whole files and DCP payloads have always worded their refusals differently, and a few checks
were made for one of them only (TorchScript code, names escaping the archive, local headers naming
another entry, a stored entry of two sizes: files; a second ``data.pkl`` deeper in the archive:
payloads). The caller passes its wording (``TORCH_FILE`` or ``DCP_PAYLOAD``); a check without
words there is not made.
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping

from torchkeep.errors import (
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.format import pickle_kind
from torchkeep.storage import LocalSource, Source

LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field

# Refusal -> (error class, message). The message may name {where}, the entry's {name} (in full,
# or as {entry} without the archive's prefix), its header {offset} and the parser's {error}.
Wording = Mapping[str, tuple[type[TorchkeepError], str]]
Refuse = Callable[..., None]  # raises the worded refusal; returns where the wording has none

_COMPRESSED_FILE = (
    UnsupportedFormatError,
    "{where}: entry '{name}' is compressed; torch.save never compresses, so the file was not "
    "written by torch.save and is refused",
)
TORCH_FILE: Wording = {
    "unreadable": (CorruptCheckpointError, "{where}: not a readable zip archive ({error})"),
    "code": (
        UnsafeFileError,
        "{where}: a TorchScript archive; it holds code ({name}) that runs when it is loaded. "
        "torchkeep does not load TorchScript; save the model's state_dict from trusted code "
        "instead",
    ),
    "twice": (CorruptCheckpointError, "{where}: the archive holds '{name}' twice"),
    "escapes": (CorruptCheckpointError, "{where}: archive entry '{name}' escapes the archive"),
    "compressed": _COMPRESSED_FILE,
    "sizes differ": _COMPRESSED_FILE,
    "outside": (
        CorruptCheckpointError,
        "{where}: entry '{name}' starts at {offset}, outside the file; the archive is corrupt",
    ),
    "no local header": (CorruptCheckpointError, "{where}: entry '{name}' has no local header"),
    "local name": (
        CorruptCheckpointError,
        "{where}: entry '{name}' has a mismatched local header",
    ),
    "cut": (
        CorruptCheckpointError,
        "{where}: entry '{name}' runs past the end of the file; it was truncated",
    ),
    "overlap": (
        CorruptCheckpointError,
        "{where}: entry '{name}' overlaps the previous entry; the archive is corrupt or crafted",
    ),
    "pickles": (
        UnsupportedFormatError,
        "{where}: a zip archive without exactly one data.pkl; not a torch.save file",
    ),
    "byteorder": (
        CorruptCheckpointError,
        "{where}: its byteorder entry says {value}, neither 'little' nor 'big'; the archive is "
        "corrupt",
    ),
}

_CUT_PAYLOAD = (CorruptCheckpointError, "{where}: entry '{entry}' is repeated, compressed or cut")
_PICKLES_PAYLOAD = (CorruptCheckpointError, "{where}: a zip without exactly one data.pkl")
DCP_PAYLOAD: Wording = {
    "unreadable": (CorruptCheckpointError, "{where}: not a torch.save payload ({error})"),
    "twice": _CUT_PAYLOAD,
    "compressed": _CUT_PAYLOAD,
    "outside": _CUT_PAYLOAD,
    "no local header": _CUT_PAYLOAD,
    "cut": _CUT_PAYLOAD,
    "overlap": (CorruptCheckpointError, "{where}: two entries of the payload overlap"),
    "pickles": _PICKLES_PAYLOAD,
    "nested pickle": _PICKLES_PAYLOAD,
    "big-endian": (UnsupportedFormatError, "{where}: big-endian payloads are not supported"),
}


@dataclasses.dataclass(frozen=True)
class ZipEntry:
    """One stored entry: ``size`` bytes at ``offset`` of the file, with their CRC-32 (None in an
    archive written without them, ``torch.serialization.set_crc32_options(False)``)."""

    name: str
    offset: int
    size: int
    crc: int | None


@dataclasses.dataclass(frozen=True)
class ZipTable:
    """The validated entries of a ``torch.save`` archive, by name."""

    where: str
    prefix: str  # the directory of data.pkl, such as "archive/"
    entries: dict[str, ZipEntry]
    big_endian: bool = False  # written on a big-endian machine: storages' bytes are swapped

    @property
    def checksummed(self) -> bool:
        """Whether the entries carry CRC-32s to check their bytes against."""
        return any(e.crc is not None for e in self.entries.values())

    def get(self, name: str) -> ZipEntry | None:
        """Return the entry ``name`` of the archive's directory (``data.pkl``, ``data/0``)."""
        return self.entries.get(self.prefix + name)


class _Window:
    """``length`` bytes at ``offset`` of a source, as the seekable file ``zipfile`` parses."""

    def __init__(self, source: Source, offset: int, length: int) -> None:
        self.source, self.base, self.length, self.pos = source, offset, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.length)[whence]
        if self.pos < 0:
            raise OSError("seek before the start of the payload")
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n < 0 else min(n, self.length - self.pos)
        data = self.source.read(self.base + self.pos, max(n, 0))
        self.pos += len(data)
        return data


def read_zip_table(
    source: Source,
    where: str,
    wording: Wording,
    *,
    offset: int = 0,
    length: int | None = None,
) -> ZipTable:
    """Return the validated table of the archive at ``offset`` of ``source`` (``length`` bytes;
    the whole file by default).

    Raises:
        CorruptCheckpointError, UnsupportedFormatError, UnsafeFileError: as ``wording`` says.
    """
    window = _Window(source, offset, source.size - offset if length is None else length)

    def refuse(refusal: str, **facts: object) -> None:
        if refusal in wording:
            error, message = wording[refusal]
            raise error(message.format(where=where, **facts))

    infos = _central_directory(window, refuse)
    code = [
        i.filename for i in infos if i.filename.split("/")[1:2] in (["code"], ["constants.pkl"])
    ]
    if code:
        refuse("code", name=code[0])
    every_pickle = [i.filename for i in infos if i.filename.endswith("data.pkl")]
    pickles = [n for n in every_pickle if n.count("/") == 1]
    prefix = pickles[0][: -len("data.pkl")] if len(pickles) == 1 else ""
    entries: dict[str, ZipEntry] = {}
    for info in infos:
        name = info.filename
        facts: dict[str, object] = {
            "name": name,
            "entry": name.removeprefix(prefix),
            "offset": info.header_offset,
        }
        if name in entries:
            refuse("twice", **facts)
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            refuse("escapes", **facts)
        if info.compress_type != zipfile.ZIP_STORED:
            refuse("compressed", **facts)
        if info.compress_size != info.file_size:
            refuse("sizes differ", **facts)
        start = _data_start(window, info, refuse, facts)
        if start + info.file_size > window.length:
            refuse("cut", **facts)
        entries[name] = ZipEntry(name, offset + start, info.file_size, info.CRC)
    _check_disjoint(entries.values(), prefix, refuse)
    if all(e.crc == 0 for e in entries.values() if e.size):
        # torch.save with set_crc32_options(False) writes 0 for every CRC-32: nothing to check.
        entries = {n: dataclasses.replace(e, crc=None) for n, e in entries.items()}
    if len(pickles) != 1:
        refuse("pickles")
    if len(every_pickle) != 1:
        refuse("nested pickle")  # another data.pkl, deeper in the archive
    order = entries.get(prefix + "byteorder")
    big_endian = False
    if order is not None:
        value = source.read(order.offset, min(order.size, 16)).strip()
        if value != b"little":
            if value != b"big":
                refuse("byteorder", value=repr(value.decode("ascii", "replace")))
            refuse("big-endian")  # where the caller does not read big-endian payloads
            big_endian = True
    return ZipTable(where, prefix, entries, big_endian)


def _central_directory(window: _Window, refuse: Refuse) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(window) as z:
            return z.infolist()
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        struct.error,
        NotImplementedError,
    ) as e:
        refuse("unreadable", error=e)
        raise  # every wording words it


def _check_disjoint(entries: Iterable[ZipEntry], prefix: str, refuse: Refuse) -> None:
    end = 0
    for entry in sorted(entries, key=lambda e: e.offset):
        # Disjoint entries: no byte of the file may back two storages, so what is allocated
        # for them never exceeds the file's size.
        if entry.offset < end:
            refuse("overlap", name=entry.name, entry=entry.name.removeprefix(prefix))
        end = entry.offset + entry.size


def _data_start(
    window: _Window, info: zipfile.ZipInfo, refuse: Refuse, facts: dict[str, object]
) -> int:
    """Where the entry's bytes start in the window: after its local header, which must be
    there, inside the window, and (where the wording checks it) name the same entry."""
    head = info.header_offset
    if not 0 <= head <= window.length - LOCAL_HEADER:
        refuse("outside", **facts)
        return window.length + 1  # not checked by this wording: the entry cannot fit
    window.seek(head)
    local = window.read(LOCAL_HEADER)
    if local[:4] != b"PK\x03\x04":
        refuse("no local header", **facts)
        return window.length + 1
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    if window.read(name_len).decode("utf-8", "replace") != info.filename:
        refuse("local name", **facts)
    start: int = head + LOCAL_HEADER + name_len + extra_len
    return start


def read_zip_file(path: str) -> ZipTable:
    """Return the validated table of the ``torch.save`` zip file at ``path``."""
    source = LocalSource(path)
    try:
        return read_zip_table(source, path, TORCH_FILE)
    finally:
        source.close()


def carries_crcs(path: str) -> bool:
    """Whether the ``torch.save`` file at ``path`` carries CRC-32s to check (a zip archive
    written with them; pre-1.6 files have none)."""
    with open(path, "rb") as f:
        if pickle_kind(f.read(16)) != "zip":
            return False
    return read_zip_file(path).checksummed


def read_file_entry(path: str, entry: ZipEntry) -> bytes:
    """Return the bytes of ``entry`` of the zip file at ``path``."""
    with open(path, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.size)
    if len(data) != entry.size:
        raise CorruptCheckpointError(f"{path}: entry '{entry.name}' is truncated")
    return data
