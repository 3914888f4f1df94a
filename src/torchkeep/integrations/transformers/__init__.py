"""Hugging Face ``transformers``: a ``Trainer`` whose checkpoints are torchkeep saves.

``TorchkeepTrainer`` is a drop-in for ``transformers.Trainer``. Each checkpoint it writes is one
torchkeep directory, ``checkpoint-<step>`` as the Trainer names it, holding the model, the
optimizer, the learning-rate scheduler, the gradient scaler and every random number generator
in safetensors shards, and the Trainer's small files (``trainer_state.json``, ``config.json``,
the tokenizer's files, the training arguments as ``training_args.json``) as members whose sizes
and checksums the manifest records. ``trainer.train(resume_from_checkpoint=True)`` (or a path)
checks every checksum and restores all of it, so that the resumed run ends with the same
weights, bit for bit, as one that never stopped::

    from torchkeep.integrations.transformers import TorchkeepTrainer

    trainer = TorchkeepTrainer(model=model, args=args, train_dataset=train)
    trainer.train(resume_from_checkpoint=True)   # the latest checkpoint-<step>, verified

What changes from the stock Trainer:

- No pickle is written or read. The stock Trainer writes ``optimizer.pt``, ``scheduler.pt``,
  ``scaler.pt``, ``rng_state.pth`` and ``training_args.bin`` with ``torch.save`` and reads them
  back with ``torch.load``; here their tensors are in the step's shards and everything else
  is typed JSON in its manifest.
- A step appears whole or not at all. It is built in a hidden directory beside the others
  (``.checkpoint-<step>.tmp-…``, which neither ``get_last_checkpoint`` nor the Trainer's
  ``checkpoint-*`` pattern matches), its manifest written last, and renamed into place. A step
  the Trainer deletes (by rotation, ``save_total_limit``; at the end of training with
  ``save_total_limit=1``, every step but the best) is first renamed out of those names, so no
  ``checkpoint-<step>`` is ever half deleted. ``train()`` and every save first deal with what a
  kill left: hidden directories are removed, except a step's previous version that a
  replacement in two renames (where the file system cannot swap two directories at once, as on
  macOS) left moved aside (``….old``) in place of its step: it goes back if its manifest reads,
  before the Trainer looks for the last checkpoint.
- Every tensor and member file is checked against its checksum when training resumes (and by
  ``tk.verify``), before a byte is read into the model: a damaged step raises
  ``CorruptCheckpointError``, training does not start and the model keeps its weights (the
  member files are checked before the Trainer reads ``trainer_state.json``). Resuming thus
  reads the step twice. The best step (``load_best_model_at_end``) is checked the same way
  before it is loaded and before the other steps are deleted.
- ``from_pretrained`` does not read a checkpoint directory: its weights lie in torchkeep shards,
  beside the optimizer's state. Build the model from the checkpoint's ``config.json`` and load
  them with torchkeep (the final ``trainer.save_model()`` directory is the stock one)::

      model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("out/checkpoint-500"))
      tk.load_weights(model, "out/checkpoint-500")

- Checkpoints the stock Trainer wrote still resume: their model through torchkeep's safetensors
  reader, their optimizer and scheduler through its restricted unpickler, which runs no code.
  Their ``rng_state.pth`` pickles numpy arrays, which that unpickler refuses, so the random
  generators go on from their current state and a warning says so. The resumed run's steps
  are torchkeep saves; one the stock Trainer also wrote in that output directory
  (``checkpoint-4`` after resuming from ``checkpoint-2``) is replaced, as the stock Trainer
  would: moved aside whole, and put back if the new save fails or is killed. Only a directory
  that is clearly the stock Trainer's step is replaced (``trainer_state.json``,
  ``training_args.bin``, model or optimizer files, nothing but plain files); any other directory
  in the way stays as it is and the save fails with a ``StorageError``.

Why a ``Trainer`` subclass and not a ``TrainerCallback``: a callback's ``on_save`` runs after the
Trainer has written its pickles, and no callback hook runs when it reads them back. The
subclass replaces ``_save_checkpoint`` as a whole (the step must be one commit, so saving piece
by piece through ``_save_optimizer_and_scheduler`` and friends into the final directory cannot
work) and the hooks the Trainer's ``train()`` calls to restore each piece
(``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler``,
``_load_rng_state``, ``_load_best_model``). It wraps ``train()``, to clean the output directory
before the Trainer looks for the last checkpoint, and ``_finalize_training``, to delete the
steps it deletes with a plain ``shutil.rmtree`` the safe way first. It keeps the Trainer's own
bookkeeping (the best checkpoint, stateful callbacks, ``TrainerState``) and its
``checkpoint-<step>`` names. To add this to another Trainer subclass, put it first:
``class MyTrainer(TorchkeepTrainer, Seq2SeqTrainer)``.

Supported: one process, on the CPU or on one or more GPUs of one machine (DataParallel).
Refused with a ``ValueError`` at construction: several processes (DDP, FSDP, DeepSpeed),
SageMaker model parallelism, TPUs and ``push_to_hub=True``, whose checkpoint pushes write
``training_args.bin``.

``transformers`` and ``accelerate`` are the ``transformers`` extra:
``pip install 'torchkeep[transformers]'``.
"""

from __future__ import annotations

from torchkeep._optional import importing, installed, missing

# The framework first, so that a missing one raises MissingDependencyError here.
with importing(
    "transformers",
    "the Trainer integration needs transformers 5.17 or later, which cannot be imported ({error})",
):
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401
    from transformers.trainer_callback import ExportableState  # noqa: F401
    from transformers.trainer_utils import (  # noqa: F401
        PREFIX_CHECKPOINT_DIR,
        SaveStrategy,
        sort_checkpoints,
    )
# The Trainer imports accelerate only when it first places the model: say so now.
if not installed("accelerate"):
    raise missing(
        "transformers", "the transformers Trainer needs accelerate, which is not installed"
    )

from torchkeep.integrations.transformers.saving import TRAINING_ARGS as TRAINING_ARGS
from torchkeep.integrations.transformers.stock import TRAINER_STATE as TRAINER_STATE
from torchkeep.integrations.transformers.trainer import TorchkeepTrainer

TorchkeepTrainer.__module__ = __name__  # where users import it from, as its repr says

__all__ = ["TorchkeepTrainer"]
