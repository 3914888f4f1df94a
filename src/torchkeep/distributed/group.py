"""This process as one rank of a process group: whether there is a group, the part of a DTensor
this rank holds, and how the ranks of a save talk.

Every collective of a save carries one picklable value per rank. A rank that fails sends a
``Failure`` (the error's class and message, never the exception) instead of its value, so that
every rank takes part in every collective and then raises alike: the error class is chosen by
``kind``, and whether the path may hold the save by ``committed``, never by a message's text.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from torchkeep import errors
from torchkeep.errors import StorageError, TorchkeepError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # offsets, shape


def active() -> bool:
    """Whether this process is a rank of an initialized process group."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def local_box(t: Any) -> Box:
    """The part of DTensor ``t``'s global tensor held by this rank: (offsets, shape)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offsets), tuple(shape)


@dataclass(frozen=True)
class Failure:
    """A rank's failure, as it crosses ranks: the name of its ``TorchkeepError`` class (any
    other error is a ``StorageError``) and its message."""

    rank: int
    kind: str
    message: str
    committed: bool = False  # the path may hold this save: the commit's outcome is unknown

    @classmethod
    def of(cls, rank: int, e: BaseException) -> Failure:
        """``e``, raised on ``rank``, as it crosses ranks."""
        kind = type(e).__name__ if isinstance(e, TorchkeepError) else "StorageError"
        return cls(rank, kind, str(e))


def raise_failure(path: str, failure: Failure) -> NoReturn:
    """Raise ``failure`` on this rank, as the error of class ``failure.kind``; its message says
    which rank failed and, unless ``failure.committed``, that nothing was committed."""
    cls = getattr(errors, failure.kind, StorageError)
    if not (isinstance(cls, type) and issubclass(cls, TorchkeepError)):
        cls = StorageError
    message = f"{path}: the distributed save failed on rank {failure.rank}: {failure.message}"
    if not failure.committed:
        message += "; nothing was committed (the previous save, if any, is intact)"
    if issubclass(cls, OSError):
        raise cls(errno.EIO, message)
    raise cls(message)


class Group:
    """The collectives of a save, each over the default process group, with one picklable
    value per rank (a ``Failure`` where a rank failed)."""

    def __init__(self) -> None:
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, on every rank, in rank order."""
        everyone: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(everyone, value)
        return everyone

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order, on rank 0; None on the others."""
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (the others pass None)."""
        box: list[Any] = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def agree(path: str, failure: BaseException | None) -> None:
    """Raise on every rank if any rank failed before a collective save (every rank calls this,
    so that a rank that cannot go on never leaves the others waiting)."""
    group = Group()
    mine = None if failure is None else Failure.of(group.rank, failure)
    failed = [f for f in group.all_gather(mine) if isinstance(f, Failure)]
    if failed:
        if failure is not None and failed[0].rank == group.rank:
            raise failure
        raise_failure(path, failed[0])
