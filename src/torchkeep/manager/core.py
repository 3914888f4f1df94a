"""The facade: ``CheckpointManager`` saves, restores and lists a run's steps, and applies the
retention policy; ``steps``, ``records``, ``background`` and ``preemption`` do the rest."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from torchkeep import distributed
from torchkeep.checkpoint import load_from
from torchkeep.container import (
    WRITE_THREADS,
    SaveInfo,
    WriteOptions,
    open_container,
    write_container,
)
from torchkeep.container.share import (
    Hints,
    Shared,
    changed_since,
    hints_of,
    open_base,
    plan_sharing,
)
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format import CHECKSUM_CHUNK
from torchkeep.manager.background import Background
from torchkeep.manager.preemption import Preemption
from torchkeep.manager.records import METADATA_KEY, check_metrics, step_metadata
from torchkeep.manager.steps import claim_writer, delete_step, scan, step_path
from torchkeep.retention import Policy, Record, best, retained
from torchkeep.storage import Linking, Storage, is_url, storage_for
from torchkeep.tree import flatten, is_dtensor

log = logging.getLogger("torchkeep.manager")


class CheckpointManager:
    """Checkpoints of a training run, one directory per step, with retention.

    Args:
        root: the directory holding the steps (created if missing): local, or an fsspec URL.
        keep_last: keep the newest N steps (None keeps every step). The newest committed step
            is never deleted.
        keep_best: also keep the N best steps by ``monitor``.
        monitor: the metric (passed to ``save(metrics=)``) that ranks steps for ``keep_best``
            and ``best_step``.
        mode: ``"min"`` or ``"max"``: whether lower or higher ``monitor`` values are better.
        keep_every: also keep every step that is a multiple of this.
        async_save: ``save()`` copies the state to reusable staging buffers (pinned memory for
            CUDA tensors), writes it in a background thread and returns a Future. At most one
            save is in flight; an error in the background is raised by the next ``save()``,
            ``wait()`` or ``close()``.
        preemption: handle SIGTERM (True), or the given signals, the way cluster schedulers
            preempt jobs: the signal sets ``should_stop``, so that the loop saves at the next
            step boundary and exits. The previous handlers come back on ``close()``.
        storage_options: for a URL root (``s3://bucket/run1``), the options of its fsspec
            file system. On object storage each step commits when its manifest is written
            (last); retention deletes a step's manifest first, then its data. Object stores
            have no locks: run one saving manager per root.
        storage: read and write the steps through this storage instead of the one ``root``
            names (a storage that injects faults, for example).
        policy: the retention policy as one value (``tk.Policy(keep_last=…, keep_best=…,
            monitor=…, mode=…, keep_every=…)``), instead of the five arguments above.
        incremental: each step writes only the tensors whose bytes changed since the newest
            committed step, and shares that step's files for the rest (hard links on a local
            file system, copies made by the store itself on object storage), so that a
            fine-tune of a frozen base writes only what it trains. Every step stays a whole
            directory: deleting one never affects another. False writes every step whole.

    Example:
        ```python
        with tk.CheckpointManager("checkpoints", keep_last=3, preemption=True) as mgr:
            state = {"model": model, "optimizer": optimizer, "rng": tk.RNGState()}
            start = mgr.restore(state) or 0
            for step in range(start + 1, steps + 1):
                train_one_step()
                if step % 100 == 0 or mgr.should_stop:
                    mgr.save(step, state, metrics={"loss": loss})
                if mgr.should_stop:
                    break
        ```
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        async_save: bool = False,
        preemption: bool | Iterable[int] = False,
        storage_options: Mapping[str, Any] | None = None,
        storage: Storage | None = None,
        policy: Policy | None = None,
        incremental: bool = True,
    ) -> None:
        storage, where = storage_for(root, storage_options, storage)
        self.root = where.rstrip("/") if is_url(where) else os.path.abspath(where)
        given = Policy(keep_last, keep_best, monitor, mode, keep_every)
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a tk.Policy, not {type(policy).__name__}")
        if policy is not None and given != Policy():
            raise ValueError(
                "give the retention policy either as policy= or as keep_last/keep_best/monitor/"
                "mode/keep_every, not both"
            )
        self.policy = policy if policy is not None else given
        self.async_save = async_save
        self.incremental = incremental
        # The step of the last save this manager made, and its tensors' hints.
        self._hints: tuple[int, Hints] | None = None
        self._storage = storage
        self._lock = threading.Lock()
        self._writing: int | None = None
        self._background = Background() if async_save else None
        self._closed = False
        self._preemption = Preemption()
        if storage.exists(self.root) and not storage.is_dir(self.root):
            raise StorageError(
                errno.ENOTDIR,
                f"{self.root}: exists and is not a directory; pass a directory for checkpoints",
            )
        storage.make_dirs(self.root)
        # In a process group, rank 0 holds the lock for the group, and deletes.
        self._rank = torch.distributed.get_rank() if distributed.active() else 0
        self._writer, self._lock_file = claim_writer(self.root, self._rank)
        self._records, self.problems = scan(
            self._storage, self.root, clean=self._lock_file is not None
        )
        if preemption:
            signals = (signal.SIGTERM,) if preemption is True else tuple(preemption)
            try:
                self._preemption.install(signals)
            except ValueError:
                self.close()  # puts back the handlers installed so far, releases the lock
                raise

    # -- what is there

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        with self._lock:
            return sorted(self._records)

    @property
    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    @property
    def best_step(self) -> int | None:
        """The best committed step by ``monitor``, or None (no monitor, or no step has it)."""
        with self._lock:
            ranked = best(self._records.values(), self.policy)
        return ranked[0].step if ranked else None

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``."""
        with self._lock:
            record = self._records.get(step)
        if record is None:
            raise CheckpointNotFoundError(self._not_found(step))
        return dict(record.metrics)

    def path(self, step: int) -> str:
        """The directory of ``step`` (whether or not it exists)."""
        return step_path(self.root, step)

    # -- saving

    def save(
        self, step: int, state: Any, *, metrics: Mapping[str, float] | None = None
    ) -> SaveInfo | Future[SaveInfo]:
        """Save ``state`` as ``step``; return what was written, or a Future with async saves.

        ``state`` is what ``tk.save`` takes: a dict of modules, optimizers, schedulers, tensors,
        values and ``tk.RNGState()``. With ``async_save`` the state is copied before this
        returns: the caller may change the model at once.

        Raises:
            ValueError: a negative step or non-numeric metrics.
            UnsupportedObjectError: the state holds a value that cannot be saved.
            StorageError, TorchkeepError: this save failed, or (async) the previous one did.
        """
        self._check_open()
        if distributed.active() and self._background is None and distributed.holds_dtensor(state):
            # Every rank saves its part: a rank that cannot (a bad step, a held lock, a value
            # that cannot be stored) makes every rank raise, rather than leave them waiting.
            failure: BaseException | None = None
            try:
                metadata = self._prepare(step, metrics)
                flat = flatten(state, dtensors=True)
            except Exception as e:
                failure = e
            distributed.agree(self.path(step), failure)
            hints = hints_of(flat.tensors) if self.incremental else None
            return self._write(step, flat.tree, flat.tensors, flat.aliases, metadata, hints)
        metadata = self._prepare(step, metrics)
        if self._background is not None and self._rank:
            raise StorageError(
                f"{self.root}: rank {self._rank}: asynchronous saves are made by rank 0 alone, "
                "of plain state; DTensor state needs async_save=False (every rank writes its part)"
            )
        if self._background is None:
            if self._rank:
                raise StorageError(
                    f"{self.root}: rank {self._rank} of a process group saves only its part of "
                    "DTensor state; this state has none. Save plain (replicated) state from "
                    "rank 0 alone"
                )
            flat = flatten(state)
            hints = hints_of(flat.tensors) if self.incremental else None
            return self._write(step, flat.tree, flat.tensors, flat.aliases, metadata, hints)
        staged = self._background.stage(state)
        hints = hints_of(staged.originals) if self.incremental else None
        return self._background.submit(
            self._write,
            step,
            staged.flat.tree,
            staged.tensors,
            staged.flat.aliases,
            metadata,
            hints,
        )

    def _prepare(self, step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
        """Check that ``step`` can be saved now; return the metadata of its save."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer of 0 or more, not {step!r}")
        clean = check_metrics(metrics)
        if not self._writer and not self._rank:
            raise StorageError(
                errno.EWOULDBLOCK,
                f"{self.root}: another CheckpointManager is saving to this directory; this one "
                "can list and restore steps but not save (one writer per directory)",
            )
        self.wait()  # at most one save in flight; raises the previous one's error
        latest = self.latest_step
        if latest is not None and step < latest:
            raise ValueError(
                f"step {step} is older than the newest committed step {latest} in {self.root}; "
                "after going back to an earlier step, save to a new directory (or delete the "
                "newer steps first), so that retention does not keep the abandoned ones"
            )
        return step_metadata(step, clean)

    def _write(
        self,
        step: int,
        tree: Any,
        tensors: Mapping[str, torch.Tensor],
        aliases: Mapping[str, str],
        metadata: dict[str, Any],
        hints: Hints | None = None,
    ) -> SaveInfo:
        with self._lock:
            self._writing = step
        try:
            if any(is_dtensor(t) for t in tensors.values()):
                info = distributed.save(
                    self.path(step),
                    tensors,
                    kind="state",
                    tree=tree,
                    aliases=aliases,
                    metadata=metadata,
                    storage=self._storage,
                    threads=WRITE_THREADS,
                    sharing=self._sharing(step, hints),
                )
            else:
                shared = self._shared(step, tensors, hints)
                info = write_container(
                    self.path(step),
                    tensors,
                    kind="state",
                    storage=self._storage,
                    options=WriteOptions(
                        tree=tree, aliases=aliases, metadata=metadata, shared=shared
                    ),
                )
            entry = metadata[METADATA_KEY]
            with self._lock:
                self._records[step] = Record(step, entry["time"], entry["metrics"])
                self._hints = (step, hints) if hints is not None else None
        finally:
            with self._lock:
                self._writing = None
        self._apply_retention()
        return info

    def _base(self, step: int, hints: Hints | None) -> tuple[str, Hints | None] | None:
        """The newest committed step before ``step`` as the base of an incremental save, and
        the hints of this manager's save of it (None after a restart); None: write it whole."""
        with self._lock:
            base_step = max((s for s in self._records if s != step), default=None)
            previous = self._hints
        if hints is None or base_step is None or not isinstance(self._storage, Linking):
            return None  # (a storage written before incremental saves writes every step whole)
        earlier = previous[1] if previous is not None and previous[0] == base_step else None
        changed = changed_since(earlier, hints)
        if changed is not None and all(changed(name) for name in hints):
            return None  # every tensor changed (a full fine-tune): nothing to look for
        return self.path(base_step), earlier

    def _sharing(self, step: int, hints: Hints | None) -> distributed.Sharing | None:
        """How a distributed step shares with the newest committed one."""
        base = self._base(step, hints)
        if base is None or hints is None:
            return None
        return distributed.Sharing(base[0], likely_changed=changed_since(base[1], hints))

    def _shared(
        self, step: int, tensors: Mapping[str, torch.Tensor], hints: Hints | None
    ) -> Shared | None:
        """What ``step`` can share with the newest committed step: the tensors whose checksums
        match. A newest step that cannot be a base (damaged) is logged, and this step written
        whole."""
        found = self._base(step, hints)
        if found is None or hints is None or not tensors:
            return None
        base, earlier = found
        try:
            return plan_sharing(
                open_base(base, self._storage),
                tensors,
                {n: t.dtype for n, t in tensors.items()},
                chunk=CHECKSUM_CHUNK,
                threads=WRITE_THREADS,
                likely_changed=changed_since(earlier, hints),
            )
        except (TorchkeepError, ValueError) as e:
            log.warning(
                "step %d shares nothing with %s, which cannot be a base (%s); writing it whole",
                step,
                base,
                e,
            )
            return None

    def _apply_retention(self) -> None:
        with self._lock:
            keep = retained(self._records.values(), self.policy)
            newest = max(self._records, default=None)
            doomed = [s for s in sorted(self._records) if s not in keep and s != newest]
        for step in doomed:
            self._delete(step)

    def _delete(self, step: int) -> None:
        with self._lock:
            self._records.pop(step, None)
        if self._rank:
            return  # rank 0 deletes for the group
        delete_step(self._storage, self.path(step))

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        if self._background is not None:
            self._background.wait()

    # -- restoring

    def restore(self, state: Any, *, step: int | str = "latest") -> int | None:
        """Restore ``state`` in place from a committed step; return that step, or None when
        there is none (a fresh start).

        Args:
            state: the same structure that was saved (modules and optimizers are filled in
                place; tensors of the right shape are read straight into their memory).
            step: ``"latest"``, ``"best"`` (by ``monitor``) or a step number.

        Raises:
            CheckpointNotFoundError: that step is not committed (the message lists those that
                are).
            CorruptCheckpointError: the step does not verify; the message names the tensor.
            IncompleteCheckpointError: the step lacks a file it shares with an earlier step
                (``"latest"`` then warns and restores the newest whole step instead).
        """
        self._check_open()
        self.wait()
        if step == "latest":
            chosen = self.latest_step
        elif step == "best":
            if not self.policy.monitor:
                raise ValueError('restore(step="best") needs the manager\'s monitor= metric')
            chosen = self.best_step
        elif isinstance(step, int) and not isinstance(step, bool):
            if step not in self.steps():
                raise CheckpointNotFoundError(self._not_found(step))
            chosen = step
        else:
            raise ValueError(f'step must be "latest", "best" or a step number, not {step!r}')
        if distributed.active() and distributed.holds_dtensor(state):
            # Every rank restores its part of the same step: rank 0's choice, made whole first.
            if step == "latest" and chosen is not None:
                chosen = self._newest_whole(chosen)
            choice: list[Any] = [chosen]
            torch.distributed.broadcast_object_list(choice, src=0)
            chosen = choice[0]
        if chosen is None:
            return None
        while True:
            try:
                load_from(self._storage, self.path(chosen), into=state)
                return chosen
            except IncompleteCheckpointError as e:
                # Found when the step is opened, before anything is read into the state.
                if step != "latest":
                    raise
                chosen = self._instead(chosen, e)
            except CorruptCheckpointError as e:
                older = [s for s in self.steps() if s < chosen]
                hint = f" Restore an older step: restore(state, step={older[-1]})." if older else ""
                raise CorruptCheckpointError(f"{e}.{hint}") from e

    def _newest_whole(self, step: int) -> int:
        """``step``, or the newest step before it whose files are all there (its files are
        opened, nothing is read from them)."""
        while True:
            try:
                open_container(self.path(step), storage=self._storage).close()
                return step
            except IncompleteCheckpointError as e:
                step = self._instead(step, e)
            except TorchkeepError:
                return step  # the load reports it, with its hint

    def _instead(self, step: int, error: IncompleteCheckpointError) -> int:
        """The step before ``step``, which lost a file it shares with an earlier one; warned."""
        older = [s for s in self.steps() if s < step]
        if not older:
            raise error
        log.warning("%s; restoring step %d instead", error, older[-1])
        return older[-1]

    def _not_found(self, step: int) -> str:
        steps = self.steps()
        shown = ", ".join(map(str, steps[-10:])) or "none"
        return f"{self.path(step)}: step {step} is not a committed checkpoint (committed: {shown})"

    # -- preemption

    @property
    def should_stop(self) -> bool:
        """True once a preemption signal arrived: save at this step boundary, then exit."""
        return self._preemption.stop_signal is not None

    @property
    def stop_signal(self) -> int | None:
        """The preemption signal received, if any."""
        return self._preemption.stop_signal

    # -- closing

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the checkpoint manager of {self.root} is closed")

    def close(self) -> None:
        """Finish the save in flight (raising its error), and restore the signal handlers."""
        if self._closed:
            return
        self._closed = True
        self._preemption.close()
        try:
            self.wait()
        finally:
            if self._background is not None:
                self._background.close()
            self._preemption.restore()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # the error already propagating matters more
            log.error("while closing the checkpoint manager of %s: %s", self.root, e)
