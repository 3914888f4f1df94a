"""Direct I/O for local files: large reads and writes bypass the page cache.

A buffered write copies every byte into the page cache and leaves the kernel to flush it; a
buffered cold read goes through readahead. With ``O_DIRECT`` the disk moves the bytes to and
from memory itself, in requests as large as we make them. ``O_DIRECT`` needs the file offset,
the length and the memory address aligned (to the device's logical block; ``ALIGN`` covers
every common device), so bytes pass through an aligned buffer of each thread, ``BOUNCE_BYTES``
at a time: one copy in memory, far cheaper than the disk.

Only the page-aligned interior of a range goes direct. Its ragged ends, and every range under
``DIRECT_MIN_BYTES``, go through the page cache, so no page of the file is ever written both
ways at once. Where the file system refuses ``O_DIRECT`` (the open or a request fails with
EINVAL), everything goes through the page cache, as before.

``TORCHKEEP_DIRECT_IO=on`` turns it on: saves write direct, and loads read direct from files
not already in the page cache. The default, ``off``, is the page cache alone: on the machine the
benchmark runs on (a virtual disk), direct I/O made every case slower, measured in the same
runs; ``torchkeep bench`` measures both on yours (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

ALIGN = max(4096, mmap.PAGESIZE)  # a page: no page is ever written both ways at once
BOUNCE_BYTES = 4 << 20
DIRECT_MIN_BYTES = 1 << 20
ENV = "TORCHKEEP_DIRECT_IO"
_MODES = ("on", "off")
_RESIDENT_FRACTION = 0.5

_memmove = ctypes.memmove  # a foreign call: it releases the GIL while it copies
_pwrite = os.pwrite
_preadv = os.preadv


def _function(name: str, argtypes: tuple[type, ...], restype: type) -> Any:
    """A libc function with its types, or None where there is no such libc (not POSIX)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_size, _void, _int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
_mincore = _function("mincore", (_void, _size, _void), _int)
_mmap = _function("mmap", (_void, _size, _int, _int, _int, ctypes.c_long), _void)
_munmap = _function("munmap", (_void, _size), _int)
_MAP_FAILED = ctypes.c_void_p(-1).value
_BIT_0 = bytes(i & 1 for i in range(256))


def mode() -> str:
    """The direct-I/O mode from ``TORCHKEEP_DIRECT_IO``: ``on``, or ``off`` (also when unset or
    not a mode)."""
    value = os.environ.get(ENV, "off").strip().lower()
    return value if value in _MODES else "off"


def enabled() -> bool:
    """Whether large reads and writes of local files go direct."""
    return hasattr(os, "O_DIRECT") and mode() == "on"


def open_direct(path: str, flags: int, mode: int = 0o644) -> int | None:
    """Open ``path`` with ``O_DIRECT`` added to ``flags``; None where that is refused."""
    try:
        return os.open(path, flags | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


class _Bounce:
    """This thread's aligned buffer (an anonymous mapping: page-aligned)."""

    _local = threading.local()

    @classmethod
    def get(cls) -> tuple[memoryview, int]:
        found: tuple[mmap.mmap, memoryview, int] | None = getattr(cls._local, "buffer", None)
        if found is None:
            memory = mmap.mmap(-1, BOUNCE_BYTES)
            address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
            found = (memory, memoryview(memory), address)
            cls._local.buffer = found
        return found[1], found[2]


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def interior(offset: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned part ``[begin, end)`` of ``[offset, offset + nbytes)``."""
    begin = -(-offset // ALIGN) * ALIGN
    end = (offset + nbytes) // ALIGN * ALIGN
    return begin, max(begin, end)


class Refused(Exception):
    """The file system refused a direct request: go through the page cache instead."""


def _request(call: Callable[[int, Any, int], int], fd: int, data: Any, offset: int) -> int:
    """One direct request, retried when a signal interrupts it; EINVAL (the file system takes
    no such request) is ``Refused``."""
    while True:
        try:
            return call(fd, data, offset)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise Refused from e
            raise


def write_direct(fd: int, data: memoryview, offset: int) -> None:
    """Write ``data`` (writable memory; page-aligned ``offset`` and length) through this
    thread's buffer."""
    bounce, address = _Bounce.get()
    source = _address(data)
    done = 0
    while done < len(data):
        n = min(BOUNCE_BYTES, len(data) - done)
        _memmove(address, source + done, n)
        written = 0
        while written < n:
            moved = _request(_pwrite, fd, bounce[written:n], offset + done + written)
            if moved == 0:
                raise OSError(errno.EIO, "the disk accepted no bytes")
            written += moved
        done += n


def read_direct(fd: int, buffers: list[memoryview], offset: int, size: int) -> int:
    """Fill ``buffers`` with the bytes from ``offset`` on, read in aligned requests through this
    thread's buffer; return how many bytes were filled (fewer: the file ended, at ``size``)."""
    total = sum(len(b) for b in buffers)
    targets = [(_address(b), len(b)) for b in buffers if len(b)]
    bounce, address = _Bounce.get()
    position = offset // ALIGN * ALIGN  # the file offset of the bounce buffer's first byte
    end = min(offset + total, size)
    filled = 0
    index, within = 0, 0
    while offset + filled < end:
        want = min(BOUNCE_BYTES, -(-(end - position) // ALIGN) * ALIGN)
        got = _request(_preadv, fd, [bounce[:want]], position)
        skip = offset + filled - position
        usable = min(got, end - position) - skip
        while usable > 0:
            target, length = targets[index]
            n = min(usable, length - within)
            _memmove(target + within, address + skip, n)
            skip, usable, filled, within = skip + n, usable - n, filled + n, within + n
            if within == length:
                index, within = index + 1, 0
        if got < want:  # the end of the file, or a short read: the caller reads the rest
            break
        position += got
    return filled


def resident(fd: int, size: int) -> bool:
    """Whether most of the file is in the page cache already (then a buffered read is a copy
    from memory, faster than asking the disk again)."""
    if _mincore is None or _mmap is None or _munmap is None or size <= 0:
        return False
    address = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        return False
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        if _mincore(address, size, vector) != 0:
            return False
        # Bit 0 of each entry says the page is resident; the other bits are reserved.
        cached = bytes(vector).translate(_BIT_0).count(1)
        return cached >= _RESIDENT_FRACTION * pages
    finally:
        _munmap(address, size)
