"""Lightning's checkpoints through torchkeep: ``Trainer(plugins=[TorchkeepCheckpointIO()])``.

With the plugin, every checkpoint the Trainer writes (``ModelCheckpoint``'s top-k and ``last``
checkpoints, ``trainer.save_checkpoint``, ``OnExceptionCheckpoint``) is a torchkeep save: no
pickle, committed atomically, every tensor checksummed. ``trainer.fit(model, ckpt_path=...)``,
``ckpt_path="last"`` and ``"best"`` (and ``validate``/``test``/``predict``) read it back, and a
damaged checkpoint raises ``CorruptCheckpointError`` instead of loading::

    import lightning.pytorch as pl
    from torchkeep.integrations.lightning import TorchkeepCheckpointIO

    trainer = pl.Trainer(plugins=[TorchkeepCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(model, ckpt_path="last")

The plugin also works with ``pytorch_lightning.Trainer`` when that package is installed, and
with Fabric: ``Fabric(plugins=[TorchkeepCheckpointIO()])`` makes ``fabric.save`` and
``fabric.load`` go through it.

Paths
-----
Lightning names its checkpoints ``epoch=0-step=10.ckpt`` and ``last.ckpt``, tests them with
fsspec's ``exists``, finds ``last`` by listing its directory for ``.ckpt`` names and picks the
newest by modification time, and gives each path back to the plugin to remove. So every path
Lightning gives stays as it is, and names a directory that holds one torchkeep file::

    checkpoints/epoch=0-step=10.ckpt/checkpoint.safetensors

That file is a standard safetensors file (``tk.verify``, ``tk.describe``, ``tk.load`` and every
safetensors reader open it), and no ``.ckpt`` name ever holds pickle. Locally the directory is
built under a hidden name beside its target (``.last.ckpt.tmp-<hex>``), then renamed into place,
replacing an earlier one in one atomic exchange: Lightning, and a run resumed after a crash, see
the whole new checkpoint or the whole old one. Hidden directories left by a crash are removed by
the next save to the same path. On object stores (``s3://``, with ``storage_options=``) the
file's upload is the commit. Removing a checkpoint removes its file first, then the directory.
A link at the path (``ModelCheckpoint(save_last="link")``) is followed when loading, and replaced,
never written through, when saving; so is a file there (a ``torch.save`` checkpoint written
before the plugin was used).

Loading reads that layout, and anything ``tk.load`` reads, including a ``.ckpt`` file that
Lightning wrote with ``torch.save``: it goes through torchkeep's restricted unpickler, which runs
nothing from the file, so a run can switch to the plugin and resume from its old checkpoints.
``weights_only`` is ignored (nothing a torchkeep load does runs code); ``map_location`` may be a
device (tensors load to the CPU by default, as Lightning expects).

What is stored
--------------
The checkpoint dict exactly as Lightning builds it: nested dicts (keys of any type torchkeep
stores: str, int, float, bool, None, tuples), lists, tuples, tensors, ints, floats (inf and nan
included), bools, strings, bytes and None; so the model's weights, the optimizer states (their
int keys kept), the schedulers, the loops' progress, the callbacks' states, the hyperparameters
and the Lightning version all come back equal, with their types. The model's ``state_dict``
comes back as an ``OrderedDict`` with its ``_metadata`` (the modules' versions), as
``torch.save`` kept it; other ``OrderedDict``s come back as dicts, equal and in the same order.

A value with no safe representation is refused, naming its place in the checkpoint
(``hyper_parameters.config: cannot store a ...``), and nothing is written. So is an object with
``state_dict()``, such as a module kept as a hyperparameter: it would come back as a dict, not as
the object. Leave such values out of the checkpoint (``self.save_hyperparameters(ignore=[...])``).

Not covered: ``LightningModule.load_from_checkpoint`` reads with ``torch.load`` and never asks the
plugin; read the checkpoint with the plugin instead::

    ckpt = TorchkeepCheckpointIO().load_checkpoint("checkpoints/last.ckpt")
    model = Model(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])

On object stores, Lightning's ``ckpt_path="last"`` finds nothing, whichever plugin saved (it
lists the directory and drops the URL's scheme from the names found, then warns that there is no
last checkpoint and starts afresh): pass the checkpoint's URL instead.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from torchkeep.checkpoint import load, save
from torchkeep.container import check_replaceable
from torchkeep.errors import (
    IncompleteCheckpointError,
    MissingDependencyError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.format import MANIFEST_FILE, MAX_TREE_DEPTH
from torchkeep.inspect import describe
from torchkeep.remote import is_url, join, storage_for
from torchkeep.storage import Storage
from torchkeep.tree import Stateful, path_name

INSTALL = "pip install 'torchkeep[lightning]'"

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as e:
    raise MissingDependencyError(
        f"torchkeep.integrations.lightning needs Lightning, which cannot be imported ({e}); "
        f"install it with: {INSTALL}"
    ) from e

__all__ = ["CHECKPOINT_FILE", "TorchkeepCheckpointIO"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
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
                or ``path`` is a directory that is not a checkpoint.
        """
        if not isinstance(checkpoint, Mapping):
            raise TypeError(
                f"{os.fspath(path)}: a checkpoint is a dict; got a value of type "
                f"{_kind(checkpoint)}"
            )
        options = self._options(path, storage_options)
        storage, target = storage_for(path, options)
        metadata = {_METADATA_KEY: _lightning_metadata(checkpoint)}
        try:
            _refuse_objects(checkpoint, ())
            if storage.atomic_dirs:
                _save_local(storage, target, checkpoint, metadata)
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
                f"{source}: holds a value of type {_kind(checkpoint)}, not a Lightning checkpoint "
                "(a dict)"
            )
        if source == inner:
            saved = describe(source, storage_options=options).metadata.get(_METADATA_KEY)
            _restore_state_dict_metadata(checkpoint, saved)
        return checkpoint

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path``: its torchkeep file first, then its directory.

        A directory holding anything else keeps it (a warning says so); a link is removed,
        not what it points to.
        """
        storage, target = storage_for(path, self._options(path, None))
        if (storage.atomic_dirs and os.path.islink(target)) or not storage.is_dir(target):
            storage.remove_file(target)  # a link, a torch.save file, or nothing
            return
        # The file first: from then on the path no longer holds a checkpoint.
        storage.remove_file(join(target, CHECKPOINT_FILE))
        others = [n for n in storage.list_dir(target) if n != CHECKPOINT_FILE]
        if others:
            log.warning(
                "%s: kept the directory, which holds files that are not the checkpoint's: %s",
                target,
                ", ".join(others[:5]),
            )
            return
        storage.remove_dir(target)
        log.debug("removed Lightning checkpoint %s", target)

    def _options(self, path: str | os.PathLike[str], given: Any | None) -> Mapping[str, Any] | None:
        if given is not None:
            if not isinstance(given, Mapping):
                raise TypeError(
                    f"{os.fspath(path)}: storage_options are fsspec options (a dict); got a "
                    f"value of type {_kind(given)}"
                )
            return given
        # The plugin's options are for its URLs; a local path beside them takes none.
        return self.storage_options if is_url(os.fspath(path)) else None


def _save_local(
    storage: Storage, target: str, checkpoint: Mapping[str, Any], metadata: dict[str, Any]
) -> None:
    parent = os.path.dirname(os.path.abspath(target))
    _remove_stale(storage, parent, os.path.basename(os.path.abspath(target)))
    # A link (save_last="link") or a torch.save file at the path is replaced, not written
    # through; a directory must be a checkpoint (or empty) to be replaced.
    replaced = os.path.islink(target) or os.path.isfile(target)
    if not replaced:
        check_replaceable(target, storage, (CHECKPOINT_FILE, MANIFEST_FILE))
    staging = storage.staging_dir(target)
    try:
        save(checkpoint, os.path.join(staging, CHECKPOINT_FILE), metadata=metadata)
        if replaced:
            storage.remove_file(target)
        storage.commit_dir(staging, target)
    except BaseException:
        storage.remove_dir(staging)
        raise


def _remove_stale(storage: Storage, parent: str, name: str) -> None:
    """Remove the staging directories an interrupted save of ``name`` left in ``parent``."""
    # LocalStorage.staging_dir's names: ".<name>.tmp-<12 hex>", and "….old" from its commit.
    stale = re.compile(rf"\.{re.escape(name)}\.tmp-[0-9a-f]{{12}}(\.old)?")
    for entry in storage.list_dir(parent):
        if stale.fullmatch(entry):
            log.info("removing %s, left by an interrupted save", os.path.join(parent, entry))
            storage.remove_dir(os.path.join(parent, entry))


def _refuse_objects(obj: Any, path: tuple[str, ...]) -> None:
    """Refuse Stateful objects, which torchkeep would store as their state dicts: Lightning
    would get a dict back where it saved an object."""
    if isinstance(obj, torch.Tensor) or len(path) > MAX_TREE_DEPTH:
        return  # too deep: torchkeep's own walk refuses it
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _refuse_objects(value, (*path, str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _refuse_objects(value, (*path, str(i)))
    elif isinstance(obj, Stateful) and not isinstance(obj, type):
        raise UnsupportedObjectError(
            f"{path_name(path)}: an object of type {_kind(obj)} would be stored as its state "
            "dict and come back as a dict, not as the object; keep plain values in a Lightning "
            "checkpoint"
        )


def _hint(message: str) -> str:
    if message.startswith(f"{_HPARAMS_KEY}."):
        name = message.partition(":")[0].split(".")[1]
        return (
            f". It is a hyperparameter: leave it out with "
            f"self.save_hyperparameters(ignore=[{name!r}])"
        )
    return ""


def _lightning_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What the tree cannot hold: the ``_metadata`` attribute of the model's state dict (each
    module's version, read by ``load_state_dict`` to upgrade old states)."""
    versions = getattr(checkpoint.get("state_dict"), "_metadata", None)
    if not isinstance(versions, Mapping):
        return {}
    entries = {str(k): dict(v) for k, v in versions.items() if isinstance(v, Mapping)}
    return {"state_dict_metadata": entries}


def _restore_state_dict_metadata(checkpoint: dict[str, Any], saved: Any) -> None:
    if not isinstance(saved, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return
    versions = saved.get("state_dict_metadata")
    if not isinstance(versions, dict):
        return
    state_dict: Any = OrderedDict(checkpoint["state_dict"])
    state_dict._metadata = OrderedDict(versions)
    checkpoint["state_dict"] = state_dict


def _device(map_location: Any) -> str | torch.device | None:
    if map_location is None or isinstance(map_location, (str, torch.device)):
        return map_location
    raise TypeError(
        "map_location: torchkeep loads to a device (a str or torch.device), not through a "
        f"value of type {_kind(map_location)}; load to the CPU (the default) and move the tensors"
    )


def _kind(obj: Any) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
