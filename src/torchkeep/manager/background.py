"""Asynchronous saves: the state is copied to staging buffers kept from one save to the next,
then written by a thread of its own at a lower priority. At most one save is in flight; its
error is raised once, by the next wait (which the next save, restore and close begin with).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.container import SaveInfo
from torchkeep.tree import Flat, flatten

BACKGROUND_NICE = 10


@dataclass(frozen=True)
class Staged:
    """A flattened state whose tensors were copied to staging buffers (``originals``: the
    tensors they were copied from)."""

    flat: Flat
    tensors: dict[str, torch.Tensor]
    originals: dict[str, torch.Tensor]


class Background:
    """The thread that writes asynchronous saves, the save in flight and the staging buffers."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torchkeep-save", initializer=_lower_priority
        )
        self._inflight: Future[SaveInfo] | None = None
        self.staging: dict[str, torch.Tensor] = {}

    def stage(self, state: Any) -> Staged:
        """Copy the state's tensors into staging buffers kept from one save to the next (pinned
        memory for CUDA tensors); return when every copy is done. Each copy starts as soon as
        its tensor is found, so collecting the rest of the state overlaps the device copies."""
        previous = self.staging
        staged: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor] = {}

        devices: set[torch.device] = set()

        def copy(name: str, t: torch.Tensor) -> None:
            buffer = previous.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            buffer.copy_(t, non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            staged[name] = buffer
            originals[name] = t

        flat = flatten(state, on_tensor=copy)
        for device in devices:  # every GPU the state is on, not only the current one
            torch.cuda.synchronize(device)
        self.staging = staged
        return Staged(flat, staged, originals)

    def submit(self, write: Callable[..., SaveInfo], *args: Any) -> Future[SaveInfo]:
        """Run ``write(*args)`` in the background; the caller waits for the previous save first."""
        future = self._executor.submit(write, *args)
        self._inflight = future
        return future

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        future, self._inflight = self._inflight, None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Let the thread finish (after ``wait``), and drop the staging buffers."""
        self._executor.shutdown(wait=True)
        self.staging.clear()


def _lower_priority() -> None:
    """Lower the priority of the thread writing async saves (and of the I/O threads it starts,
    which inherit it): the training thread keeps the processor when both want it."""
    # Not Linux, or not permitted: the thread runs at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, max(current, BACKGROUND_NICE))
