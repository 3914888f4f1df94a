"""Incremental distributed saves: the base a save shares with (opened by rank 0 and sent to
every rank), and what each rank's chunks share with it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from torchkeep.container.share import (
    Base,
    Shared,
    check_base_path,
    open_base,
    plan_sharing,
    unrelated,
)
from torchkeep.format import CHECKSUM_CHUNK, Manifest, dtype_name
from torchkeep.storage import Storage

log = logging.getLogger("torchkeep.distributed")

# Each sharded tensor of a rank: its dtype, global shape, and the chunk it writes (name, offsets).
ShardedInfo = dict[str, tuple[str, tuple[int, ...], tuple[str, tuple[int, ...]] | None]]


@dataclass(frozen=True)
class Sharing:
    """How a distributed save shares unchanged tensors with an earlier save.

    Attributes:
        base: the earlier save (rank 0's choice is every rank's).
        strict: a base that cannot be one fails the save on every rank (``tk.save(base=)``);
            otherwise it is logged and the save written whole (a manager's step).
        likely_changed: by the state's names, the tensors this rank's hints say changed: they
            are written without being hashed first.
    """

    base: str
    strict: bool = False
    likely_changed: Callable[[str], bool] | None = None


def open_base_for(
    path: str, storage: Storage, sharing: Sharing | None, tensors: Mapping[str, torch.Tensor]
) -> Base | None:
    """The base of an incremental save, checked (rank 0); None to write the save whole."""
    if sharing is None:
        return None
    try:
        check_base_path(sharing.base, path, storage)
        base = open_base(sharing.base, storage)
        if sharing.strict and tensors and not _related(base.manifest, tensors):
            raise unrelated(sharing.base)
    except Exception as e:
        if sharing.strict:
            raise
        log.warning("%s: %s cannot be a base (%s); writing the save whole", path, sharing.base, e)
        return None
    return base


def _related(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the base holds a tensor of the state's names, dtypes and (global) shapes."""
    for name, t in tensors.items():
        held = (manifest.distributed or {}).get(name) or manifest.tensors.get(name)
        if held is not None and held.dtype == dtype_name(t.dtype, where=name) and tuple(
            held.shape
        ) == tuple(t.shape):
            return True
    return False


def plan_rank(
    rank: int,
    base: Base,
    claimed: tuple[dict[str, torch.Tensor], ShardedInfo],
    threads: int,
    likely_changed: Callable[[str], bool] | None,
) -> Shared:
    """What this rank's tensors share with the base; nothing where that cannot be found."""
    owned, sharded = claimed
    # A chunk's hint is its DTensor's.
    of = {chunk[0]: name for name, (_, _, chunk) in sharded.items() if chunk is not None}
    changed = None
    if likely_changed is not None:
        hinted = likely_changed

        def changed(name: str) -> bool:
            return hinted(of.get(name, name))

    try:
        dtypes = {n: t.dtype for n, t in owned.items()}
        return plan_sharing(
            base,
            owned,
            dtypes,
            chunk=CHECKSUM_CHUNK,
            threads=threads,
            likely_changed=changed,
        )
    except Exception as e:
        log.warning("rank %d shares nothing with %s (%s); writes it all", rank, base.path, e)
        return Shared("")
