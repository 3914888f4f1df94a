"""The training-loop manager: one checkpoint directory per step, retention, async saves and
preemption.

A root holds ``step_000001000/`` directories, each a torchkeep directory save committed by its
manifest (written last, the directory then renamed into place). The manager lists only
committed steps, deletes old ones only after a newer one is durable (and never the newest, nor
one being written), and on opening removes the temporary directories a crash left behind. The
step, its time and its metrics are kept in each step's manifest, so retention by best metric
survives restarts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
import types
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import torch

from torchkeep import distributed
from torchkeep.checkpoint import load_from
from torchkeep.container import WRITE_THREADS, SaveInfo, read_manifest, write_container
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    TorchkeepError,
)
from torchkeep.format import MANIFEST_FILE
from torchkeep.retention import Policy, Record, best, retained
from torchkeep.storage import Leftover, Storage, is_url, join, recover_leftovers, storage_for
from torchkeep.tree import Flat, flatten, is_dtensor

log = logging.getLogger(__name__)

STEP_DIGITS = 9
_STEP_DIR = re.compile(r"step_(\d{9,})")
METADATA_KEY = "checkpoint_manager"
BACKGROUND_NICE = 10
LOCK_FILE = ".torchkeep-writer.lock"


@dataclass(frozen=True)
class _Staged:
    """A flattened state whose tensors were copied to staging buffers."""

    flat: Flat
    tensors: dict[str, torch.Tensor]


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
    ) -> None:
        if storage is None:
            storage, where = storage_for(root, storage_options)
        else:
            where = os.fspath(root)
        self.root = where.rstrip("/") if is_url(where) else os.path.abspath(where)
        self.policy = Policy(keep_last, keep_best, monitor, mode, keep_every)
        self.async_save = async_save
        self._storage = storage
        self._lock = threading.Lock()
        self._records: dict[int, Record] = {}
        self.problems: list[str] = []
        self._writing: int | None = None
        self._inflight: Future[SaveInfo] | None = None
        self._staging: dict[str, torch.Tensor] = {}
        self._executor = (
            ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="torchkeep-save", initializer=_background
            )
            if async_save
            else None
        )
        self._closed = False
        self._stop_signal: int | None = None
        self._handlers: dict[int, Any] = {}
        self._previous: dict[int, Any] = {}
        if storage.exists(self.root) and not storage.is_dir(self.root):
            raise StorageError(
                f"{self.root}: exists and is not a directory; pass a directory for checkpoints"
            )
        storage.make_dirs(self.root)
        # Object stores have no locks: there, one writer per root is the caller's to ensure.
        # In a process group, rank 0 holds the lock for the group (every rank writes its part of
        # each save), and deletes.
        self._rank = torch.distributed.get_rank() if distributed.active() else 0
        self._writer: bool
        self._lock_file: IO[bytes] | None
        if is_url(self.root):
            self._writer, self._lock_file = True, None
        elif self._rank:
            self._writer, self._lock_file = False, None  # writes only its part of DTensor state
        else:
            self._writer, self._lock_file = _writer_lock(self.root)
        self._scan()
        if preemption:
            signals = (signal.SIGTERM,) if preemption is True else tuple(preemption)
            self._install(signals)

    # -- what is there

    def _scan(self) -> None:
        # Temporary directories left by interrupted saves go first (one may put a step back),
        # unless another manager is writing now (known only where the writer lock exists).
        if self._lock_file is not None:
            self._clean_stale()
        for name in self._storage.list_dir(self.root):
            path = join(self.root, name)
            match = _STEP_DIR.fullmatch(name)
            if match is None or not self._storage.is_dir(path):
                continue  # not ours: left alone
            if name != os.path.basename(self.path(int(match.group(1)))):
                self.problems.append(f"{path}: not a step directory name torchkeep writes")
                continue
            record = self._read_record(path, int(match.group(1)))
            if record is not None:
                self._records[record.step] = record

    def _clean_stale(self) -> None:
        """Remove the directories of steps that interrupted saves and deletions left (the only
        things the manager deletes besides its own old steps). One exception: the previous
        version of a step, moved aside by a two-rename replacement (where the atomic exchange
        is not available) that was interrupted before the new version took its place, goes
        back."""

        def ours(leftover: Leftover) -> bool:
            name = os.path.basename(leftover.target)
            return bool(_STEP_DIR.fullmatch(name)) and self._storage.is_dir(leftover.path)

        def whole(leftover: str) -> bool:
            read_manifest(leftover, self._storage)
            return True

        for leftover, restored in recover_leftovers(self._storage, self.root, whole, belongs=ours):
            if restored:
                log.info(
                    "restored %s from %s, left by an interrupted replacement",
                    leftover.target,
                    leftover.path,
                )
            else:
                log.info("removed %s, left by an interrupted save", leftover.path)

    def _read_record(self, path: str, step: int) -> Record | None:
        try:
            parsed = read_manifest(path, self._storage)
        except IncompleteCheckpointError:
            self.problems.append(f"{path}: no {MANIFEST_FILE}, not a committed step (left alone)")
            return None
        except (TorchkeepError, OSError) as e:
            self.problems.append(f"{path}: not usable ({e}); left alone")
            return None
        info = parsed.metadata.get(METADATA_KEY)
        if not isinstance(info, dict) or info.get("step") != step:
            self.problems.append(
                f"{path}: not a step written by the checkpoint manager (or renamed); left alone"
            )
            return None
        metrics = info.get("metrics")
        when = info.get("time")
        return Record(
            step,
            float(when) if isinstance(when, (int, float)) else 0.0,
            dict(metrics) if isinstance(metrics, dict) else {},
        )

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
        return join(self.root, f"step_{step:0{STEP_DIGITS}d}")

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
        if distributed.active() and self._executor is None and distributed.holds_dtensor(state):
            # Every rank saves its part: a rank that cannot (a bad step, a held lock, a value
            # that cannot be stored) makes every rank raise, rather than leave them waiting.
            failure: BaseException | None = None
            try:
                metadata = self._prepare(step, metrics)
                flat = flatten(state, dtensors=True)
            except Exception as e:
                failure = e
            distributed.agree(self.path(step), failure)
            return self._write(step, flat.tree, flat.tensors, flat.aliases, metadata)
        metadata = self._prepare(step, metrics)
        if self._executor is not None and self._rank:
            raise StorageError(
                f"{self.root}: rank {self._rank}: asynchronous saves are made by rank 0 alone, "
                "of plain state; DTensor state needs async_save=False (every rank writes its part)"
            )
        if self._executor is None:
            if self._rank:
                raise StorageError(
                    f"{self.root}: rank {self._rank} of a process group saves only its part of "
                    "DTensor state; this state has none. Save plain (replicated) state from "
                    "rank 0 alone"
                )
            flat = flatten(state)
            return self._write(step, flat.tree, flat.tensors, flat.aliases, metadata)
        staged = self._stage(state)
        future = self._executor.submit(
            self._write, step, staged.flat.tree, staged.tensors, staged.flat.aliases, metadata
        )
        self._inflight = future
        return future

    def _prepare(self, step: int, metrics: Mapping[str, float] | None) -> dict[str, Any]:
        """Check that ``step`` can be saved now; return the metadata of its save."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer of 0 or more, not {step!r}")
        clean = _check_metrics(metrics)
        if not self._writer and not self._rank:
            raise StorageError(
                f"{self.root}: another CheckpointManager is saving to this directory; this one "
                "can list and restore steps but not save (one writer per directory)"
            )
        self.wait()  # at most one save in flight; raises the previous one's error
        latest = self.latest_step
        if latest is not None and step < latest:
            raise ValueError(
                f"step {step} is older than the newest committed step {latest} in {self.root}; "
                "after going back to an earlier step, save to a new directory (or delete the "
                "newer steps first), so that retention does not keep the abandoned ones"
            )
        return {METADATA_KEY: {"step": step, "time": time.time(), "metrics": clean}}

    def _stage(self, state: Any) -> _Staged:
        """Copy the state's tensors into staging buffers kept from one save to the next (pinned
        memory for CUDA tensors); return when every copy is done. Each copy starts as soon as
        its tensor is found, so collecting the rest of the state overlaps the device copies."""
        previous = self._staging
        staged: dict[str, torch.Tensor] = {}

        devices: set[torch.device] = set()

        def copy(name: str, t: torch.Tensor) -> None:
            buffer = previous.get(name)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
                buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            buffer.copy_(t, non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            staged[name] = buffer

        flat = flatten(state, on_tensor=copy)
        for device in devices:  # every GPU the state is on, not only the current one
            torch.cuda.synchronize(device)
        self._staging = staged
        return _Staged(flat, staged)

    def _write(
        self,
        step: int,
        tree: Any,
        tensors: Mapping[str, torch.Tensor],
        aliases: Mapping[str, str],
        metadata: dict[str, Any],
    ) -> SaveInfo:
        with self._lock:
            self._writing = step
        try:
            write = (
                partial(distributed.save, threads=WRITE_THREADS)
                if any(is_dtensor(t) for t in tensors.values())
                else write_container
            )
            info = write(
                self.path(step),
                tensors,
                kind="state",
                tree=tree,
                aliases=aliases,
                metadata=metadata,
                storage=self._storage,
            )
            entry = metadata[METADATA_KEY]
            with self._lock:
                self._records[step] = Record(step, entry["time"], entry["metrics"])
        finally:
            with self._lock:
                self._writing = None
        self._apply_retention()
        return info

    def _apply_retention(self) -> None:
        with self._lock:
            keep = retained(self._records.values(), self.policy)
            newest = max(self._records, default=None)
            doomed = [s for s in sorted(self._records) if s not in keep and s != newest]
        for step in doomed:
            self._delete(step)

    def _delete(self, step: int) -> None:
        # Taken out of use first (renamed aside, or on an object store its manifest removed): a
        # crash while deleting leaves a hidden directory, removed when the root is next opened,
        # or data no manifest lists, never a step that looks committed but is not whole.
        path = self.path(step)
        with self._lock:
            self._records.pop(step, None)
        if self._rank:
            return  # rank 0 deletes for the group
        try:
            remains = self._storage.retire_dir(path, commit_marker=MANIFEST_FILE)
        except TorchkeepError as e:
            log.warning("could not delete old checkpoint %s: %s", path, e)
            return
        self._finish_delete(
            remains,
            "it is no longer a checkpoint and is removed when the root is next opened"
            if self._storage.atomic_dirs
            else "it is no longer a checkpoint; its data stays until "
            "a later save of that step replaces it",
        )

    def _finish_delete(self, path: str, state: str) -> None:
        # The save that called for this deletion is committed: a failure here costs only space.
        try:
            self._storage.remove_dir(path)
        except (OSError, TorchkeepError) as e:
            log.warning("could not finish deleting old checkpoint %s (%s): %s", path, state, e)

    def wait(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        future, self._inflight = self._inflight, None
        if future is not None:
            future.result()

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
            # Every rank restores its part of the same step: rank 0's choice.
            choice: list[Any] = [chosen]
            torch.distributed.broadcast_object_list(choice, src=0)
            chosen = choice[0]
        if chosen is None:
            return None
        try:
            load_from(self._storage, self.path(chosen), into=state)
        except CorruptCheckpointError as e:
            older = [s for s in self.steps() if s < chosen]
            hint = f" Restore an older step: restore(state, step={older[-1]})." if older else ""
            raise CorruptCheckpointError(f"{e}.{hint}") from e
        return chosen

    def _not_found(self, step: int) -> str:
        steps = self.steps()
        shown = ", ".join(map(str, steps[-10:])) or "none"
        return f"{self.path(step)}: step {step} is not a committed checkpoint (committed: {shown})"

    # -- preemption

    def _install(self, signals: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.close()
            raise ValueError("preemption handlers can only be installed from the main thread")
        for signum in signals:
            try:
                self._handlers[signum] = signal.signal(signum, self._on_signal)
            except (OSError, ValueError, TypeError) as e:
                self.close()  # puts back the handlers installed so far, releases the lock
                raise ValueError(f"cannot handle signal {signum!r} for preemption: {e}") from e
        self._previous = dict(self._handlers)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if not self._closed:
            self._stop_signal = signum
            return
        # Still installed after close() (a manager opened later put its own handler on top and
        # then restored this one): behave as the handler that was there before.
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def should_stop(self) -> bool:
        """True once a preemption signal arrived: save at this step boundary, then exit."""
        return self._stop_signal is not None

    @property
    def stop_signal(self) -> int | None:
        """The preemption signal received, if any."""
        return self._stop_signal

    # -- closing

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the checkpoint manager of {self.root} is closed")

    def close(self) -> None:
        """Finish the save in flight (raising its error), and restore the signal handlers."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            for signum, handler in self._handlers.items():
                # Only a handler that is still ours is replaced: one installed later stays.
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, handler)
            self._handlers.clear()
            self._staging.clear()
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


def _background() -> None:
    """Lower the priority of the thread writing async saves (and of the I/O threads it starts,
    which inherit it): the training thread keeps the processor when both want it."""
    # Not Linux, or not permitted: the thread runs at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, max(current, BACKGROUND_NICE))


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError("metrics must be a dict of names to numbers")
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(name, str) or not number:
            raise ValueError(f"metrics must map names to numbers; {name!r} is {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"metric {name!r} is {value}; only finite numbers can be saved")
        clean[name] = value
    return clean
