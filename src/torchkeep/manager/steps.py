"""Step directories under a manager's root: their names, the listing of committed steps (after
removing what interrupted saves left), the writer lock, and deleting a step through the Storage.
"""

from __future__ import annotations

import logging
import os
import re
from typing import IO

from torchkeep.container import read_manifest
from torchkeep.errors import IncompleteCheckpointError, TorchkeepError
from torchkeep.format import MANIFEST_FILE
from torchkeep.manager.records import record_of
from torchkeep.retention import Record
from torchkeep.storage import Leftover, Storage, is_url, join, recover_leftovers

log = logging.getLogger("torchkeep.manager")

STEP_DIGITS = 9
STEP_DIR = re.compile(r"step_(\d{9,})")
LOCK_FILE = ".torchkeep-writer.lock"


def step_path(root: str, step: int) -> str:
    """The directory of ``step`` under ``root`` (whether or not it exists)."""
    return join(root, f"step_{step:0{STEP_DIGITS}d}")


# -- what is there


def scan(storage: Storage, root: str, *, clean: bool) -> tuple[dict[int, Record], list[str]]:
    """The records of the committed steps under ``root``, and the problems seen with the other
    step directories (which are left alone). With ``clean``, first remove the temporary
    directories left by interrupted saves."""
    records: dict[int, Record] = {}
    problems: list[str] = []
    # Temporary directories left by interrupted saves go first (one may put a step back),
    # unless another manager is writing now (known only where the writer lock exists).
    if clean:
        _clean_stale(storage, root)
    for name in storage.list_dir(root):
        path = join(root, name)
        match = STEP_DIR.fullmatch(name)
        if match is None or not storage.is_dir(path):
            continue  # not ours: left alone
        if name != os.path.basename(step_path(root, int(match.group(1)))):
            problems.append(f"{path}: not a step directory name torchkeep writes")
            continue
        record = _read_record(storage, path, int(match.group(1)), problems)
        if record is not None:
            records[record.step] = record
    return records, problems


def _clean_stale(storage: Storage, root: str) -> None:
    """Remove the directories of steps that interrupted saves and deletions left (the only
    things the manager deletes besides its own old steps). One exception: the previous
    version of a step, moved aside by a two-rename replacement (where the atomic exchange
    is not available) that was interrupted before the new version took its place, goes
    back."""

    def ours(leftover: Leftover) -> bool:
        name = os.path.basename(leftover.target)
        return bool(STEP_DIR.fullmatch(name)) and storage.is_dir(leftover.path)

    def whole(leftover: str) -> bool:
        read_manifest(leftover, storage)
        return True

    for leftover, restored in recover_leftovers(storage, root, whole, belongs=ours):
        if restored:
            log.info(
                "restored %s from %s, left by an interrupted replacement",
                leftover.target,
                leftover.path,
            )
        else:
            log.info("removed %s, left by an interrupted save", leftover.path)


def _read_record(storage: Storage, path: str, step: int, problems: list[str]) -> Record | None:
    try:
        parsed = read_manifest(path, storage)
    except IncompleteCheckpointError:
        problems.append(f"{path}: no {MANIFEST_FILE}, not a committed step (left alone)")
        return None
    except (TorchkeepError, OSError) as e:
        problems.append(f"{path}: not usable ({e}); left alone")
        return None
    record = record_of(parsed.metadata, step)
    if record is None:
        problems.append(
            f"{path}: not a step written by the checkpoint manager (or renamed); left alone"
        )
    return record


# -- the writer lock


def claim_writer(root: str, rank: int) -> tuple[bool, IO[bytes] | None]:
    """Whether a manager of ``rank`` may write to ``root``, and the open lock file to keep."""
    # Object stores have no locks: there, one writer per root is the caller's to ensure.
    # In a process group, rank 0 holds the lock for the group (every rank writes its part of
    # each save), and deletes.
    if is_url(root):
        return True, None
    if rank:
        return False, None  # writes only its part of DTensor state
    return _writer_lock(root)


def _writer_lock(root: str) -> tuple[bool, IO[bytes] | None]:
    """Take the root's writer lock (released on close, or when the process dies). Return
    whether this manager may write, and the open lock file to keep; where file locks are not
    available the manager writes without one."""
    try:
        import fcntl
    except ImportError:  # the manager writes, but cannot tell whether another one does
        return True, None
    handle = open(os.path.join(root, LOCK_FILE), "ab")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False, None
    return True, handle


# -- deleting


def delete_step(storage: Storage, path: str) -> None:
    """Delete the step directory at ``path``; a failure is logged, not raised."""
    # Taken out of use first (renamed aside, or on an object store its manifest removed): a
    # crash while deleting leaves a hidden directory, removed when the root is next opened,
    # or data no manifest lists, never a step that looks committed but is not whole.
    try:
        remains = storage.retire_dir(path, commit_marker=MANIFEST_FILE)
    except TorchkeepError as e:
        log.warning("could not delete old checkpoint %s: %s", path, e)
        return
    _finish_delete(
        storage,
        remains,
        "it is no longer a checkpoint and is removed when the root is next opened"
        if storage.atomic_dirs
        else "it is no longer a checkpoint; its data stays until "
        "a later save of that step replaces it",
    )


def _finish_delete(storage: Storage, path: str, state: str) -> None:
    # The save that called for this deletion is committed: a failure here costs only space.
    try:
        storage.remove_dir(path)
    except (OSError, TorchkeepError) as e:
        log.warning("could not finish deleting old checkpoint %s (%s): %s", path, state, e)
