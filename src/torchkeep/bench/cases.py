"""The timed cases (save, cold load, load into a model), the physical references they are
measured against (the raw device through ``O_DIRECT``, the first touch of fresh memory) and
peak memory."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

import torchkeep as tk
from torchkeep.bench.workload import (
    MIB,
    drop_cache,
    fsync_file,
    make_raw_buffer,
    remove_file,
    touch,
)
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.pool import IO_THREADS
from torchkeep.storage.direct import ENV, open_direct

SAVE_MEMORY = "save"
LOAD_MEMORY = "load"
RAW_CHUNK = 16 << 20
RAW_THREADS = 4
ALIGN = 4096
TORCHKEEP = "torchkeep"
TORCH = "torch"
SAFETENSORS = "safetensors"
SAVE = "durable save"
LOAD = "cold load, all bytes read"
LOAD_INTO = "cold load into model"
RAW = "raw device"
FIRST_TOUCH = "first touch"
CONVERT = "convert .pth to safetensors, durable"
READ_PTH = "cold read of a torch.save file, all bytes read"
TORCH_THEN_SAFETENSORS = "torch.load + save_file"
LIBRARIES = (TORCHKEEP, TORCH, SAFETENSORS)

# ---------------------------------------------------------------------------------------------
# cases: each times one run and returns seconds


def save_with(library: str, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Save durably with ``library``: torchkeep's own commit, or the call plus an fsync."""
    if library == TORCHKEEP:
        tk.save_weights(state, path)
    elif library == TORCH:
        torch.save(dict(state), path)
        fsync_file(path)
    elif library == SAFETENSORS:
        safetensors.torch.save_file(dict(state), path)
        fsync_file(path)
    else:
        raise ValueError(f"unknown library {library!r}")


def time_save(library: str, state: Mapping[str, torch.Tensor], path: str) -> float:
    """Delete ``path``, then time one durable save of ``state`` to it."""
    remove_file(path)
    started = time.perf_counter()
    save_with(library, state, path)
    return time.perf_counter() - started


def load_with(library: str, path: str) -> dict[str, torch.Tensor]:
    if library == TORCHKEEP:
        return tk.load_state_dict(path)
    if library == TORCH:
        loaded: dict[str, torch.Tensor] = torch.load(path)
        return loaded
    if library == SAFETENSORS:
        return safetensors.torch.load_file(path)
    raise ValueError(f"unknown library {library!r}")


def time_load(library: str, path: str) -> float:
    """Drop ``path`` from the page cache, then time one load plus a read of every byte."""
    drop_cache(path)
    started = time.perf_counter()
    touch(load_with(library, path))
    return time.perf_counter() - started


def load_into_with(library: str, model: nn.Module, path: str) -> None:
    if library == TORCHKEEP:
        tk.load_weights(model, path)
    elif library == TORCH:
        model.load_state_dict(torch.load(path))
    elif library == SAFETENSORS:
        safetensors.torch.load_model(model, path)
    else:
        raise ValueError(f"unknown library {library!r}")


def time_load_into(library: str, model: nn.Module, path: str) -> float:
    """Drop ``path`` from the page cache, then time one load of it into ``model``."""
    drop_cache(path)
    started = time.perf_counter()
    load_into_with(library, model, path)
    return time.perf_counter() - started


def time_convert(library: str, src: str, dst: str) -> float:
    """Drop ``src`` from the page cache, then time converting it to a durable safetensors file."""
    remove_file(dst)
    drop_cache(src)
    started = time.perf_counter()
    if library == TORCHKEEP:
        tk.convert(src, dst)
    elif library == TORCH_THEN_SAFETENSORS:
        safetensors.torch.save_file(torch.load(src, weights_only=True), dst)
        fsync_file(dst)
    else:
        raise ValueError(f"unknown library {library!r}")
    return time.perf_counter() - started


def time_read_pth(library: str, path: str) -> float:
    """Drop a ``torch.save`` file from the page cache, then time loading it and reading every
    byte: torchkeep's restricted loader against ``torch.load(weights_only=True)``."""
    drop_cache(path)
    started = time.perf_counter()
    if library == TORCHKEEP:
        touch(tk.load_state_dict(path))
    elif library == TORCH:
        touch(torch.load(path, weights_only=True))
    else:
        raise ValueError(f"unknown library {library!r}")
    return time.perf_counter() - started


def _spans(nbytes: int) -> list[tuple[int, int]]:
    return [(o, min(RAW_CHUNK, nbytes - o)) for o in range(0, nbytes, RAW_CHUNK)]


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """Return ``nbytes`` (rounded up to whole pages) of random bytes, faulted in, starting on a
    page boundary, as ``O_DIRECT`` needs."""
    size = -(-nbytes // ALIGN) * ALIGN
    memory = torch.empty(size + ALIGN, dtype=torch.uint8)
    start = -memory.data_ptr() % ALIGN
    buffer = memory[start : start + size]
    buffer.copy_(make_raw_buffer(size))
    return buffer


def _open(path: str, flags: int, *, direct: bool = True) -> tuple[int, bool]:
    """Open ``path`` with ``O_DIRECT`` (if ``direct``) where the file system takes it; say
    whether it did."""
    fd = open_direct(path, flags) if direct and hasattr(os, "O_DIRECT") else None
    if fd is not None:
        return fd, True
    return os.open(path, flags | os.O_CLOEXEC, 0o644), False


def direct_io_refused(directory: str) -> bool:
    """Whether the file system of ``directory`` refuses ``O_DIRECT`` (then the raw references
    go through the page cache, and the report says so)."""
    probe = os.path.join(directory, ".torchkeep-direct-probe")
    try:
        fd, direct = _open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            if direct:
                page = aligned_buffer(ALIGN)
                os.pwrite(fd, tensor_bytes(page), 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct = False
        finally:
            os.close(fd)
    finally:
        remove_file(probe)
    return not direct


def _parallel(
    fd: int, view: memoryview, io: Callable[[int, memoryview, int], int], threads: int
) -> int:
    """Run ``io`` over ``view`` in ``RAW_CHUNK`` requests, ``threads`` in flight; return the
    bytes moved (fewer than asked only where a read met the end of the file)."""

    def one(span: tuple[int, int]) -> int:
        offset, nbytes = span
        done = 0
        while done < nbytes:
            n = io(fd, view[offset + done : offset + nbytes], offset + done)
            if n == 0 or (io is _pread and n < nbytes - done):
                break  # the end of the file (a read asks again only from an aligned offset)
            done += n
        return done

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, _spans(len(view))))


def _pwrite(fd: int, view: memoryview, offset: int) -> int:
    return os.pwrite(fd, view, offset)


def _pread(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def time_raw_write(
    buffer: torch.Tensor,
    path: str,
    *,
    nbytes: int | None = None,
    threads: int = RAW_THREADS,
    direct: bool = True,
) -> float:
    """Time the disk's own durable write: the first ``nbytes`` of ``buffer`` (from
    ``aligned_buffer``; rounded up to whole pages) written to a fresh file with ``O_DIRECT``,
    ``RAW_CHUNK`` requests with ``threads`` in flight, then fsync (buffered without ``direct``,
    or where the file system refuses to open a file with ``O_DIRECT``)."""
    remove_file(path)
    size = -(-(buffer.numel() if nbytes is None else nbytes) // ALIGN) * ALIGN
    view = tensor_bytes(buffer)[:size]
    started = time.perf_counter()
    fd, _ = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct=direct)
    try:
        _parallel(fd, view, _pwrite, threads)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def time_raw_read(
    buffer: torch.Tensor, path: str, *, threads: int = RAW_THREADS, direct: bool = True
) -> float:
    """Drop ``path`` from the page cache, then time the disk's own read of the whole file into
    ``buffer`` (from ``aligned_buffer``, at least the file's size): ``O_DIRECT``, ``RAW_CHUNK``
    requests with ``threads`` in flight (buffered without ``direct``, or where the file system
    refuses to open a file with ``O_DIRECT``)."""
    size = -(-os.path.getsize(path) // ALIGN) * ALIGN
    if buffer.numel() < size:
        raise ValueError(f"{path}: the buffer holds {buffer.numel()} bytes, the file {size}")
    view = tensor_bytes(buffer)[:size]
    drop_cache(path)
    started = time.perf_counter()
    fd, _ = _open(path, os.O_RDONLY, direct=direct)
    try:
        _parallel(fd, view, _pread, threads)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def time_first_touch(nbytes: int, *, threads: int = IO_THREADS) -> float:
    """Time the first touch of ``nbytes`` of fresh memory: allocate it and write one byte of
    every page, ``threads`` at a time, as the kernel must map and zero every page a load into
    new tensors fills."""
    started = time.perf_counter()
    memory = torch.empty(nbytes, dtype=torch.uint8)

    def touch_pages(span: tuple[int, int]) -> None:
        offset, length = span
        memory[offset : offset + length : mmap.PAGESIZE].fill_(1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(touch_pages, _spans(nbytes)))
    return time.perf_counter() - started


@contextmanager
def direct_io(mode: str) -> Iterator[None]:
    """Run with ``TORCHKEEP_DIRECT_IO`` set to ``mode`` (see ``torchkeep.storage.direct``)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = before


# ---------------------------------------------------------------------------------------------
# peak memory, in a fresh process

_MEMORY_SCRIPT = """
import gc, json, resource, sys
from torchkeep.bench import load_with, make_state_dict, save_with


def peak_kib():
    # VmHWM is this process's own high-water mark. ru_maxrss is not enough on its own: after
    # exec it keeps the forked parent's peak, often larger than anything measured here.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


size, library, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
state = make_state_dict(size) if mode == "save" else None
gc.collect()
# Reset the high-water mark to the current RSS (Linux >= 4.0), so that transient memory of
# imports and of building the state dict is not counted as the save's.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = peak_kib()
if state is not None:
    save_with(library, state, path)
else:
    loaded = load_with(library, path)
after = peak_kib()
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@dataclass(frozen=True)
class MemoryResult:
    """Peak resident memory a save added on top of the state dict, or a load added to the
    process (high-water mark growth; for a load it includes the loaded tensors)."""

    library: str
    peak_extra_bytes: int
    mode: str = SAVE_MEMORY

    @property
    def mib(self) -> float:
        return self.peak_extra_bytes / MIB


def measure_memory(
    library: str, size_bytes: int, path: str, mode: str = SAVE_MEMORY
) -> subprocess.Popen[str]:
    """Start a process that builds the state dict and saves it to ``path`` with ``library``
    (``mode`` "save"), or loads ``path`` with it ("load"), and prints its peak-memory JSON."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size_bytes), library, path, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def collect_memory(
    library: str, process: subprocess.Popen[str], mode: str = SAVE_MEMORY
) -> MemoryResult:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{mode} memory measurement for {library} failed:\n{err}")
    values = json.loads(out.strip().splitlines()[-1])
    return MemoryResult(library, (values["after_kib"] - values["before_kib"]) * 1024, mode)
