"""Checkpoint directories on disk: swapped in whole, and what crashed saves left put right.

A save builds the directory under a hidden name beside its path and swaps it in for whatever the
path held; before that it puts back or removes what crashed saves and removals left there.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from typing import Any

from torchkeep.checkpoint import save
from torchkeep.container import check_replaceable
from torchkeep.errors import StorageError
from torchkeep.format import LIGHTNING_CHECKPOINT_FILE, MANIFEST_FILE
from torchkeep.inspect import describe
from torchkeep.storage import Leftover, LocalStorage, recover_leftovers

log = logging.getLogger("torchkeep.integrations.lightning")

CHECKPOINT_FILE = LIGHTNING_CHECKPOINT_FILE


def save_local(
    storage: LocalStorage, target: str, checkpoint: Mapping[str, Any], metadata: dict[str, Any]
) -> None:
    """Save ``checkpoint`` as the directory ``target``, built beside it and swapped in whole."""
    target = os.path.abspath(target.rstrip("/"))
    _clean_leftovers(storage, target)
    if os.path.isdir(target) and not os.path.islink(target):
        _check_replaceable(storage, target)
    staging = storage.staging_dir(target)
    try:
        save(checkpoint, os.path.join(staging, CHECKPOINT_FILE), metadata=metadata)
        # One step swaps the new directory in for the checkpoint, torch.save file or link at
        # the path (the link itself): removing the old entry first would leave nothing there,
        # and Lightning's ckpt_path="last" would start a crashed run afresh.
        storage.commit_dir(staging, target, replace_entry=True)
    except BaseException:
        # A failed commit may have left the old entry at the staging name (after the exchange)
        # or moved aside (between the two renames): remove the one, put back the other.
        recover_leftovers(
            storage, os.path.dirname(target), _whole, belongs=lambda x: x.path.startswith(staging)
        )
        raise


def _check_replaceable(storage: LocalStorage, target: str) -> None:
    """Refuse to replace a directory that holds anything but one checkpoint: replacing it would
    delete the rest (``remove_checkpoint`` keeps it too)."""
    names = storage.list_dir(target)
    if CHECKPOINT_FILE not in names:
        # Empty, the shards of a save that never committed, or a torchkeep directory save.
        check_replaceable(target, storage, (MANIFEST_FILE,))
        return
    others = other_files(names)
    if others:
        raise StorageError(
            errno.EEXIST,
            f"{target}: holds files besides the checkpoint's {CHECKPOINT_FILE} "
            f"({', '.join(others[:5])}); saving there would delete them, so nothing was saved. "
            "Move them out of the directory, or save under another name",
        )


def other_files(names: list[str]) -> list[str]:
    """The names in a checkpoint's directory that are not its file."""
    return [n for n in names if n != CHECKPOINT_FILE]


def _clean_leftovers(storage: LocalStorage, target: str) -> None:
    """Put back or remove what interrupted saves and removals left beside ``target``: the hidden
    entries of its name, and of every name with its suffix (the other ``.ckpt`` checkpoints,
    whose names Lightning may never save again)."""
    name = os.path.basename(target)
    suffix = os.path.splitext(name)[1]

    def ours(leftover: Leftover) -> bool:
        # Not another writer's temporary file beside the checkpoints.
        of = os.path.basename(leftover.target)
        return of == name or bool(suffix and of.endswith(suffix))

    for leftover, restored in recover_leftovers(
        storage, os.path.dirname(target), _whole, belongs=ours
    ):
        if restored:
            log.warning(
                "%s: put the previous checkpoint back, left aside by an interrupted save",
                leftover.target,
            )
        else:
            log.info("removed %s, left by an interrupted save or removal", leftover.path)


def put_back(storage: LocalStorage, target: str) -> None:
    """Put back the previous version of the missing ``target`` that an interrupted two-rename
    replacement left aside. Nothing else is touched: a save may be in flight."""
    target = os.path.abspath(target.rstrip("/"))

    def aside(leftover: Leftover) -> bool:
        return leftover.moved_aside and leftover.target == target

    for _, restored in recover_leftovers(storage, os.path.dirname(target), _whole, belongs=aside):
        if restored:
            log.warning(
                "%s: put the previous checkpoint back, left aside by an interrupted save", target
            )
            return


def _whole(leftover: str) -> bool:
    """Whether a previous version moved aside is worth putting back: a torch.save file or a
    link as it was, or a directory whose checkpoint's header reads."""
    if os.path.islink(leftover) or not os.path.isdir(leftover):
        return os.path.lexists(leftover)
    inner = os.path.join(leftover, CHECKPOINT_FILE)
    describe(inner if os.path.exists(inner) else leftover)  # raises if it is not a checkpoint
    return True
