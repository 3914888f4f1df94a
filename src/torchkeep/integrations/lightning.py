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
safetensors reader open it), and no ``.ckpt`` name ever holds pickle.

Locally the directory is built under a hidden name beside its target (``.last.ckpt.tmp-<hex>``),
then swapped in for whatever the path held in one atomic exchange (``renameat2``): an earlier
checkpoint, a ``torch.save`` file (a checkpoint written before the plugin was used) or a link
(``ModelCheckpoint(save_last="link")``: the link is replaced, never written through; loading
follows it). Lightning, and a run resumed after a crash, see the whole new checkpoint or the whole
old one. A directory holding anything besides the checkpoint's file is never replaced: the save
raises ``StorageError`` and deletes nothing. Removing a checkpoint first renames its directory to
a hidden name, then deletes it, so a removal cut short leaves no half-removed ``.ckpt`` behind (a
directory holding other files loses only the checkpoint's file, with a warning). Before writing,
each save puts back or removes what crashes left in its directory: the hidden entries of its own
name and of every name with the same suffix (``.ckpt``), such as the staging directory of a
top-k checkpoint whose save was killed. Only rank 0 saves, so there is one writer per directory;
give two runs two directories. On object stores (``s3://``, with ``storage_options=``) the file's
upload is the commit.

Where the exchange is unavailable (macOS, some network file systems), the entry at the path is
first renamed aside (``.last.ckpt.tmp-<hex>.old``), then the new checkpoint into place. A crash
between those two renames leaves the path missing and the previous checkpoint aside: loading the
path (``trainer.fit(model, ckpt_path="checkpoints/last.ckpt")``, ``fabric.load``) or the next
save puts it back first. ``ckpt_path="last"`` cannot: Lightning lists the directory for ``last``
before it asks the plugin, finds none, warns and starts afresh. Resume such a run by its path.

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
``torch.save`` kept it, and so does every other module state dict in the checkpoint, such as the
models ``fabric.save`` turns into theirs (``{"model": model, ...}``), under str or int keys and in
lists; one inside a tuple or under another kind of key, and other ``OrderedDict``s, come back as
dicts, equal and in the same order.

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

import errno
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from torchkeep._optional import importing
from torchkeep.checkpoint import load, save
from torchkeep.container import check_replaceable
from torchkeep.errors import (
    IncompleteCheckpointError,
    StorageError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.format import MANIFEST_FILE, MAX_TREE_DEPTH
from torchkeep.inspect import describe
from torchkeep.storage import (
    Leftover,
    LocalStorage,
    is_url,
    join,
    recover_leftovers,
    storage_for,
)
from torchkeep.tree import Stateful, path_name

with importing(
    "lightning",
    "torchkeep.integrations.lightning needs Lightning, which cannot be imported ({error})",
):
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

__all__ = ["CHECKPOINT_FILE", "TorchkeepCheckpointIO"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
# LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: named here so that fabric-only users do not import
# lightning.pytorch for it.
_HPARAMS_KEY = "hyper_parameters"
_METADATA_KEY = "lightning"
# Hidden names beside a checkpoint: LocalStorage.staging_dir's and a removal's,


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
                f"fabric.save build it); got a value of type {_kind(checkpoint)}, and nothing was "
                "written. Pass a dict"
            )
        options = self._options(path, storage_options)
        storage, target = storage_for(path, options)
        metadata = {_METADATA_KEY: _lightning_metadata(checkpoint)}
        try:
            _refuse_objects(checkpoint, ())
            if isinstance(storage, LocalStorage):
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
            _put_back(storage, target)
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
            return _restore_module_metadata(checkpoint, saved)
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
        others = _others(storage.list_dir(target))
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
                    f"value of type {_kind(given)}"
                )
            return given
        # The plugin's options are for its URLs; a local path beside them takes none.
        return self.storage_options if is_url(os.fspath(path)) else None


def _save_local(
    storage: LocalStorage, target: str, checkpoint: Mapping[str, Any], metadata: dict[str, Any]
) -> None:
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
    others = _others(names)
    if others:
        raise StorageError(
            errno.EEXIST,
            f"{target}: holds files besides the checkpoint's {CHECKPOINT_FILE} "
            f"({', '.join(others[:5])}); saving there would delete them, so nothing was saved. "
            "Move them out of the directory, or save under another name",
        )


def _others(names: list[str]) -> list[str]:
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


def _put_back(storage: LocalStorage, target: str) -> None:
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
    """What the tree cannot hold: the ``_metadata`` attribute of each module state dict (each
    module's version, read by ``load_state_dict`` to upgrade old states), by its place."""
    found: list[dict[str, Any]] = []
    _find_module_metadata(checkpoint, [], found)
    return {"module_metadata": found} if found else {}


def _find_module_metadata(obj: Any, at: list[str | int], found: list[dict[str, Any]]) -> None:
    if isinstance(obj, torch.Tensor) or len(at) > MAX_TREE_DEPTH:
        return
    if isinstance(obj, Mapping):
        versions = getattr(obj, "_metadata", None)
        if isinstance(versions, Mapping):
            entries = {
                str(k): {n: x for n, x in v.items() if isinstance(n, str) and _json_scalar(x)}
                for k, v in versions.items()
                if isinstance(v, Mapping)
            }
            found.append({"at": list(at), "versions": entries})
        for key, value in obj.items():
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                _find_module_metadata(value, [*at, key], found)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _find_module_metadata(value, [*at, i], found)


def _json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int))


def _restore_module_metadata(checkpoint: dict[str, Any], saved: Any) -> dict[str, Any]:
    """Make each module state dict recorded in ``saved`` an ``OrderedDict`` with its
    ``_metadata`` again; return the checkpoint (itself one, when it was saved as one)."""
    root: Any = {"": checkpoint}  # so that the checkpoint has a parent like every other value
    found = saved.get("module_metadata") if isinstance(saved, dict) else None
    for entry in found if isinstance(found, list) else []:
        at = entry.get("at") if isinstance(entry, dict) else None
        versions = entry.get("versions") if isinstance(entry, dict) else None
        if not (isinstance(at, list) and isinstance(versions, dict)):
            continue
        at = ["", *at]
        parent = root
        for key in at[:-1]:
            parent = _child(parent, key)
        value = _child(parent, at[-1])
        if not isinstance(value, dict):
            continue  # the checkpoint does not have the saved shape: leave it as it is
        state_dict: Any = OrderedDict(value)
        state_dict._metadata = OrderedDict(versions)
        parent[at[-1]] = state_dict
    result: dict[str, Any] = root[""]
    return result


def _child(obj: Any, key: Any) -> Any:
    if isinstance(obj, dict) and key in obj:
        return obj[key]
    if isinstance(obj, list) and isinstance(key, int) and 0 <= key < len(obj):
        return obj[key]
    return None


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
