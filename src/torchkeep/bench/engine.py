"""The engine's cases beyond the core table: what checksums cost, many small tensors, lazy
opens, warm loads against memcpy, and the peak memory of a load.

Every case returns seconds for one run, like ``cases``; the runner interleaves them.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Mapping

import torch
from torch import nn

import torchkeep as tk
from torchkeep.bench.cases import TORCH, TORCHKEEP
from torchkeep.bench.workload import drop_cache, remove_file
from torchkeep.container import WriteOptions, write_container

CHECKSUMS_OFF = "torchkeep, checksums off"
MEMCPY = "memcpy, one thread"
CHECKSUM_COST = "durable save, checksums on and off"
SMALL_SAVE = "durable save, small tensors"
SMALL_LOAD = "cold load, small tensors, all bytes read"
LAZY_OPEN = "lazy open, cold"
WARM_LOAD_INTO = "warm load into existing tensors"
DIRECT_SAVE = "durable save: direct I/O or the page cache"
DIRECT_LOAD = "cold load: direct I/O or the page cache"
DIRECT_LOAD_INTO = "cold load into model: direct I/O or the page cache"
DIRECT_ON = "torchkeep, TORCHKEEP_DIRECT_IO=on"
SMALL_TENSORS = 10_000
SMALL_MIN_BYTES = 4 << 10
SMALL_MAX_BYTES = 64 << 10


def make_small_state_dict(count: int = SMALL_TENSORS, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return ``count`` float32 tensors of 4 KiB to 64 KiB each (sizes spread evenly, in a
    shuffled order), as in a model of many small layers or an optimizer's per-parameter state."""
    generator = torch.Generator().manual_seed(seed)
    low, high = SMALL_MIN_BYTES // 4, SMALL_MAX_BYTES // 4
    sizes = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    pool = torch.empty(high, dtype=torch.float32).uniform_(-1, 1, generator=generator)
    state = {}
    for i, n in enumerate(sizes):
        state[f"blocks.{i // 10}.p{i % 10}"] = pool[:n].clone().add_(i)
    return state


def time_save_without_checksums(state: Mapping[str, torch.Tensor], path: str) -> float:
    """Time one durable save like ``tk.save_weights`` with the checksums not computed."""
    remove_file(path)
    started = time.perf_counter()
    write_container(path, state, kind="weights", options=WriteOptions(checksums=False))
    return time.perf_counter() - started


def time_lazy_open(library: str, path: str) -> float:
    """Drop ``path`` from the page cache, then time opening it lazily: torchkeep's
    ``load_state_dict(lazy=True)`` (header and manifest read and checked, tensors mapped) or
    ``torch.load(mmap=True)``."""
    drop_cache(path)
    started = time.perf_counter()
    if library == TORCHKEEP:
        tk.load_state_dict(path, lazy=True)
    elif library == TORCH:
        torch.load(path, mmap=True)
    else:
        raise ValueError(f"unknown library {library!r}")
    return time.perf_counter() - started


def warm(path: str) -> None:
    """Read ``path`` once, so that it is in the page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def time_warm_load_into(model: nn.Module, path: str) -> float:
    """Time ``tk.load_weights`` of a file already in the page cache into ``model``."""
    warm(path)
    started = time.perf_counter()
    tk.load_weights(model, path)
    return time.perf_counter() - started


def time_memcpy(source: torch.Tensor, dest: torch.Tensor) -> float:
    """Time one ``memmove`` of ``source`` into ``dest`` (both faulted in) on one thread."""
    nbytes = source.numel() * source.element_size()
    if not (source.is_contiguous() and dest.is_contiguous()) or nbytes != dest.numel() * (
        dest.element_size()
    ):
        raise ValueError("memcpy needs two contiguous buffers of one size")
    started = time.perf_counter()
    ctypes.memmove(dest.data_ptr(), source.data_ptr(), nbytes)
    return time.perf_counter() - started
