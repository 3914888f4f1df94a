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

from torchkeep._optional import importing

# The framework first, so that a missing one raises MissingDependencyError here.
with importing(
    "lightning",
    "torchkeep.integrations.lightning needs Lightning, which cannot be imported ({error})",
):
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO  # noqa: F401

from torchkeep.integrations.lightning.files import CHECKPOINT_FILE
from torchkeep.integrations.lightning.plugin import TorchkeepCheckpointIO

TorchkeepCheckpointIO.__module__ = __name__  # where users import it from, as its repr says

__all__ = ["CHECKPOINT_FILE", "TorchkeepCheckpointIO"]
