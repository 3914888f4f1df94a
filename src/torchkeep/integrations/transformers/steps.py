"""The checkpoint-<step> directories of a run: replaced, rotated, deleted, kills undone."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from torchkeep.container import read_manifest
from torchkeep.errors import StorageError
from torchkeep.integrations.transformers.stock import is_stock_step
from torchkeep.storage import Leftover, Storage, recover_leftovers

log = logging.getLogger("torchkeep.integrations.transformers")

_STEP = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")


def replace_stock_step(storage: Storage, path: str, write: Callable[[str], object]) -> None:
    """Write the step over one the stock Trainer wrote, as the stock Trainer would: the old
    directory is moved aside whole (under the name of a two-rename replacement's previous
    version, which the next clean-up puts back if this process dies before the new step is
    in place), and deleted once ``write`` has put the new one in place."""
    try:
        aside = storage.retire_dir(path, previous=True)
    except StorageError as e:
        raise StorageError(
            e.errno or errno.EIO,
            f"{path}: could not move the stock Trainer's checkpoint aside to replace it "
            f"({e.__cause__ or e}); remove it, or resume from a later step",
        ) from e
    try:
        write(path)
    except BaseException:
        # Back in place if the new step is not; the save's own error matters more, and the
        # next clean-up retries what fails here.
        storage.recover(Leftover(aside, path, moved_aside=True), lambda _: True)
        raise
    log.info("replaced %s, a checkpoint of the stock Trainer, with a torchkeep save", path)
    storage.remove_dir(aside)


def steps_to_delete(run_dir: str, limit: int, best: str | None) -> list[str]:
    """The steps to delete to keep ``limit`` of them: the Trainer's choice (the newest step and
    the best one are kept), oldest first."""
    steps = sort_checkpoints(run_dir, use_mtime=True)
    if len(steps) <= limit:
        return []
    protected = {steps[-1]}
    if best is not None:
        protected.add(str(Path(best)))
    remaining = len(steps)
    doomed: list[str] = []
    for step in steps:
        if remaining <= max(limit, len(protected)):
            break
        if step not in protected:
            doomed.append(step)
            remaining -= 1
    return doomed


def delete_step(storage: Storage, path: str, limit: int | None) -> None:
    """Delete the step ``path``, first renamed out of the ``checkpoint-*`` names; a step that
    cannot be renamed is kept, with a warning."""
    try:
        doomed = storage.retire_dir(path)
    except StorageError as e:  # the new step is committed: only space is lost
        log.warning("could not delete %s: %s", path, e.__cause__ or e)
        return
    log.info("deleted %s (save_total_limit=%s)", path, limit)
    storage.remove_dir(doomed)


def clean_leftovers(storage: Storage, run_dir: str) -> None:
    """Deal with what saves and deletions killed in the middle left behind (one run writes
    a directory at a time): a step's previous version moved aside (``….old``) goes back
    when its step is missing and it is whole, everything else is removed."""

    def whole(leftover: str) -> bool:
        if is_stock_step(leftover):
            return True
        read_manifest(leftover, storage)
        return True

    def ours(leftover: Leftover) -> bool:
        return bool(_STEP.fullmatch(os.path.basename(leftover.target)))

    for leftover, restored in recover_leftovers(storage, run_dir, whole, belongs=ours):
        name = os.path.basename(leftover.path)
        if restored:
            log.info(
                "restored %s from %s, left by an interrupted replacement",
                leftover.target,
                name,
            )
        else:
            log.info("removed %s, left by an interrupted save or deletion", name)
