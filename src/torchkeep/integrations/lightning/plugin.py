"""The plugin: Lightning's ``CheckpointIO``, its saves, loads and removals through torchkeep."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from torchkeep.checkpoint import load, save
from torchkeep.errors import (
    IncompleteCheckpointError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.inspect import describe
from torchkeep.integrations.lightning.contents import (
    lightning_metadata,
    refuse_objects,
    restore_module_metadata,
    type_name,
)
from torchkeep.integrations.lightning.files import (
    CHECKPOINT_FILE,
    other_files,
    put_back,
    save_local,
)
from torchkeep.storage import LocalStorage, is_url, join, storage_for

log = logging.getLogger("torchkeep.integrations.lightning")

# LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: named here so that fabric-only users do not import
# lightning.pytorch for it.
_HPARAMS_KEY = "hyper_parameters"
_METADATA_KEY = "lightning"


def _checkpoint_io_bases() -> tuple[type, ...]:
    """Lightning's ``CheckpointIO``, and ``pytorch_lightning``'s (``lightning_fabric``) when it
    is installed: each Trainer accepts only plugins derived from its own."""
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as Standalone
    except ImportError:
        return (CheckpointIO,)
    return (CheckpointIO,) if issubclass(CheckpointIO, Standalone) else (CheckpointIO, Standalone)


if TYPE_CHECKING:
    _Base = CheckpointIO
else:

    class _Base(*_checkpoint_io_bases()):
        pass


class TorchkeepCheckpointIO(_Base):
    """Lightning's ``CheckpointIO`` through torchkeep: safe, atomic, verified checkpoints.

    Args:
        storage_options: the fsspec options (credentials, ``endpoint_url``, …) of checkpoint
            paths that are URLs (``s3://…``); local paths take none.

    Example::

        trainer = pl.Trainer(plugins=[TorchkeepCheckpointIO()])
        trainer.fit(model, ckpt_path="checkpoints/last.ckpt")
    """

    def __init__(self, *, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.storage_options = dict(storage_options) if storage_options else None

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Save Lightning's checkpoint dict as the directory ``path`` holding one torchkeep file.

        Args:
            checkpoint: what Lightning saves (weights, optimizer, loops, callbacks, …).
            path: the checkpoint's path as Lightning names it (``…/epoch=0-step=10.ckpt``).
            storage_options: for a URL, fsspec options for this save (else the plugin's).

        Raises:
            UnsupportedObjectError: a value cannot be stored; the message names its key, and
                nothing was written.
            StorageError: the write failed; any previous checkpoint at ``path`` is unchanged,
                or ``path`` is a directory that is not a checkpoint, or holds other files too.
        """
        if not isinstance(checkpoint, Mapping):
            raise UnsupportedObjectError(
                f"{os.fspath(path)}: a Lightning checkpoint is a dict (as the Trainer and "
                f"fabric.save build it); got a value of type {type_name(checkpoint)}, and nothing "
                "was written. Pass a dict"
            )
        options = self._options(path, storage_options)
        storage, target = storage_for(path, options)
        metadata = {_METADATA_KEY: lightning_metadata(checkpoint)}
        try:
            refuse_objects(checkpoint, ())
            if isinstance(storage, LocalStorage):
                save_local(storage, target, checkpoint, metadata)
            else:
                # Object stores: the file's upload commits it (there is no directory to rename).
                save(
                    checkpoint,
                    join(target, CHECKPOINT_FILE),
                    metadata=metadata,
                    storage_options=options,
                )
        except UnsupportedObjectError as e:
            raise UnsupportedObjectError(
                f"{target}: Lightning's checkpoint was not saved: {e}{_hint(str(e))}"
            ) from e
        log.debug("saved Lightning checkpoint %s", target)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint saved by the plugin, or any checkpoint ``tk.load`` reads (a
        ``torch.save`` ``.ckpt`` file through the restricted unpickler), checking every checksum.

        Where ``path`` is missing because a save was interrupted between its two renames (where
        the atomic exchange is unavailable), the previous checkpoint it left aside is put back
        first.

        Args:
            path: the checkpoint's path as Lightning names it.
            map_location: the device tensors are loaded to (the CPU by default).
            weights_only: ignored: a torchkeep load never runs code from the file.

        Returns:
            The checkpoint dict.

        Raises:
            CheckpointNotFoundError: nothing at ``path`` (also a ``FileNotFoundError``).
            CorruptCheckpointError: the checkpoint is damaged; nothing was returned from it.
            IncompleteCheckpointError: a save that never finished is at ``path``.
            UnsafeFileError: a pickle ``.ckpt`` file names code that loading would run.
            UnsupportedFormatError: the file is of a format or version torchkeep cannot read.
        """
        device = _device(map_location)
        options = self._options(path, None)
        storage, target = storage_for(path, options)
        if isinstance(storage, LocalStorage) and not os.path.lexists(target):
            put_back(storage, target)
        inner = join(target, CHECKPOINT_FILE)
        source = inner if storage.exists(inner) else target
        try:
            checkpoint = load(source, map_location=device, storage_options=options)
        except IncompleteCheckpointError as e:
            if source == inner:
                raise
            raise IncompleteCheckpointError(
                f"{target}: not a checkpoint: the directory holds no {CHECKPOINT_FILE} (a save "
                "is built under a hidden name beside its path, so an interrupted one is never "
                f"there). Pass the path of another checkpoint. ({e})"
            ) from e
        if not isinstance(checkpoint, dict):
            raise UnsupportedFormatError(
                f"{source}: holds a value of type {type_name(checkpoint)}, not a Lightning "
                "checkpoint (a dict)"
            )
        if source == inner:
            saved = describe(source, storage_options=options).metadata.get(_METADATA_KEY)
            return restore_module_metadata(checkpoint, saved)
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path``. Locally its directory is first renamed to a hidden
        name, so an interrupted removal leaves no half-removed checkpoint at ``path``.

        A directory holding anything else keeps it and loses only the checkpoint's file (a
        warning says so); a link is removed, not what it points to.

        Raises:
            StorageError: the checkpoint could not be removed.
        """
        storage, target = storage_for(path, self._options(path, None))
        local = isinstance(storage, LocalStorage)
        if (local and os.path.islink(target)) or not storage.is_dir(target):
            storage.remove_file(target)  # a link, a torch.save file, or nothing
            return
        others = other_files(storage.list_dir(target))
        if others:
            storage.remove_file(join(target, CHECKPOINT_FILE))
            log.warning(
                "%s: kept the directory, which holds files that are not the checkpoint's: %s",
                target,
                ", ".join(others[:5]),
            )
            return
        # Out of use first (locally renamed to a hidden name, on an object store its file
        # removed): a removal cut short leaves a hidden directory, which the next save removes,
        # not an empty checkpoint directory that Lightning counts as taken.
        storage.remove_dir(storage.retire_dir(target, commit_marker=CHECKPOINT_FILE))
        log.debug("removed Lightning checkpoint %s", target)

    def _options(self, path: str | os.PathLike[str], given: Any | None) -> Mapping[str, Any] | None:
        if given is not None:
            if not isinstance(given, Mapping):
                raise TypeError(
                    f"{os.fspath(path)}: storage_options are fsspec options (a dict); got a "
                    f"value of type {type_name(given)}"
                )
            return given
        # The plugin's options are for its URLs; a local path beside them takes none.
        return self.storage_options if is_url(os.fspath(path)) else None


def _hint(message: str) -> str:
    if message.startswith(f"{_HPARAMS_KEY}."):
        name = message.partition(":")[0].split(".")[1]
        return (
            f". It is a hyperparameter: leave it out with "
            f"self.save_hyperparameters(ignore=[{name!r}])"
        )
    return ""


def _device(map_location: Any) -> str | torch.device | None:
    if map_location is None or isinstance(map_location, (str, torch.device)):
        return map_location
    raise TypeError(
        "map_location: torchkeep loads to a device (a str or torch.device), not through a "
        f"value of type {type_name(map_location)}; load to the CPU (the default) and move the "
        "tensors"
    )
