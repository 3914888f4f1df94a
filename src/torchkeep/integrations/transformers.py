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

import errno
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep._optional import importing, installed, missing
from torchkeep.checkpoint import load_from
from torchkeep.container import (
    Container,
    SaveInfo,
    WriteOptions,
    open_container,
    read_manifest,
    write_container,
)
from torchkeep.errors import (
    CorruptCheckpointError,
    StateMismatchError,
    StorageError,
    UnsupportedFormatError,
)
from torchkeep.format import MANIFEST_FILE
from torchkeep.storage import DEFAULT_STORAGE, Leftover, Sink, Storage, recover_leftovers
from torchkeep.tree import RNGState, flatten
from torchkeep.weights import load_state_dict, load_weights, save_weights

with importing(
    "transformers",
    "the Trainer integration needs transformers 5.17 or later, which cannot be imported ({error})",
):
    import transformers
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints
# The Trainer imports accelerate only when it first places the model: say so now.
if not installed("accelerate"):
    raise missing(
        "transformers", "the transformers Trainer needs accelerate, which is not installed"
    )

__all__ = ["TorchkeepTrainer"]

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.json"
# What the stock Trainer writes with torch.save; read here only through the safe unpickler.
_STOCK_OPTIMIZER = "optimizer.pt"
_STOCK_SCHEDULER = "scheduler.pt"
_STOCK_SCALER = "scaler.pt"
_STOCK_RNG = re.compile(r"rng_state(_\d+)?\.pth")
_STOCK_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_STOCK_ARGS = "training_args.bin"
_BEST_REFUSED = "The best model is not loaded and no step was deleted; load another step"
_STEP = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")


@dataclass
class _Resumed:
    """The pieces of a checkpoint the Trainer restores after the model, each in its own hook
    (the optimizer exists only once training is prepared, the random generators are set only
    when the first batch is due)."""

    path: str
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    rng: Any = None


class TorchkeepTrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints are atomic, verified torchkeep saves.

    Takes exactly the arguments of ``transformers.Trainer``. See the module's documentation for
    what each checkpoint holds and what is refused.

    Raises:
        ValueError: a set-up this integration does not support (several processes, DeepSpeed,
            FSDP, SageMaker model parallelism, TPUs, ``push_to_hub=True``).

    Example::

        trainer = TorchkeepTrainer(model=model, args=TrainingArguments("out", save_steps=500),
                                   train_dataset=train)
        trainer.train(resume_from_checkpoint=True)
    """

    def __init__(self, *args: Any, storage: Storage | None = None, **kwargs: Any) -> None:
        self._storage = DEFAULT_STORAGE if storage is None else storage
        self._resumed: _Resumed | None = None
        super().__init__(*args, **kwargs)
        self._check_supported()

    def _check_supported(self) -> None:
        from transformers.utils.import_utils import (
            is_sagemaker_mp_enabled,
            is_torch_xla_available,
        )

        refused = {
            "several processes (DDP)": self.args.world_size > 1,
            "DeepSpeed": self.is_deepspeed_enabled,
            "FSDP": self.is_fsdp_enabled or self.is_fsdp_xla_enabled,
            "a model sharded by transformers at load time": getattr(
                self, "is_distributed_loading_by_transformers", False
            ),
            "SageMaker model parallelism": is_sagemaker_mp_enabled(),
            "TPUs (XLA)": is_torch_xla_available(),
        }
        for what, present in refused.items():
            if present:
                raise ValueError(
                    f"TorchkeepTrainer does not support {what}: its checkpoints would not hold "
                    "the state of every process. Use transformers.Trainer for this run"
                )

    def init_hf_repo(self, *args: Any, **kwargs: Any) -> None:
        """Refuse ``push_to_hub=True``: each checkpoint push writes ``training_args.bin``."""
        if self.args.push_to_hub:
            raise ValueError(
                "TorchkeepTrainer does not push checkpoints to the Hub (the Trainer's push writes "
                "training_args.bin, a pickle); set push_to_hub=False and call "
                "trainer.push_to_hub() after training, which uploads the final model"
            )
        super().init_hf_repo(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, after dealing with what an interrupted run left in the output
        directory: before the Trainer looks for the last checkpoint, so that
        ``resume_from_checkpoint=True`` finds a step put back from ``….old``."""
        if self.args.should_save and self.args.output_dir is not None:
            self._clean_leftovers(self.args.output_dir)
        return super().train(*args, **kwargs)

    # -- saving

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-<global_step>`` as one torchkeep save, then rotate old steps."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step and (best == output_dir or os.path.isdir(best)):
                self.state.best_model_checkpoint = best
        # A dict once TrainerState is built, whatever its annotation says.
        stateful: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name = type(callback).__name__
                saved = callback.state()
                if isinstance(stateful.get(name), list):
                    stateful[name].append(saved)
                else:
                    stateful[name] = saved
        self._clean_leftovers(run_dir)
        if _is_stock_step(output_dir):
            self._replace_stock_step(output_dir)
        else:
            self.write_checkpoint(output_dir)
        self._rotate(run_dir)

    def _replace_stock_step(self, path: str) -> None:
        """Write the step over one the stock Trainer wrote, as the stock Trainer would: the old
        directory is moved aside whole (under the name of a two-rename replacement's previous
        version, which the next clean-up puts back if this process dies before the new step is
        in place), and deleted once the new one is."""
        try:
            aside = self._storage.retire_dir(path, previous=True)
        except StorageError as e:
            raise StorageError(
                e.errno or errno.EIO,
                f"{path}: could not move the stock Trainer's checkpoint aside to replace it "
                f"({e.__cause__ or e}); remove it, or resume from a later step",
            ) from e
        try:
            self.write_checkpoint(path)
        except BaseException:
            # Back in place if the new step is not; the save's own error matters more, and the
            # next clean-up retries what fails here.
            self._storage.recover(Leftover(aside, path, moved_aside=True), lambda _: True)
            raise
        log.info("replaced %s, a checkpoint of the stock Trainer, with a torchkeep save", path)
        self._storage.remove_dir(aside)

    def write_checkpoint(self, path: str | os.PathLike[str]) -> SaveInfo:
        """Write the whole training state to the directory ``path`` as one atomic save.

        The Trainer calls this for every checkpoint; call it to save one elsewhere. ``path``
        must not hold anything but an earlier torchkeep save, which it replaces whole.

        Returns:
            What was written.

        Raises:
            UnsupportedObjectError: a piece of the state has no safe representation (the
                message names it); nothing was written.
            StorageError: the write failed; the previous save at ``path``, if any, is unchanged.
        """
        model = self._unwrapped_model()
        files = self._trainer_files(model)
        state: dict[str, Any] = {"model": model}
        if not self.args.save_only_model:
            state["optimizer"] = self.optimizer
            state["scheduler"] = self.lr_scheduler
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            # Flattened last, after everything else this save does: the generators' state is
            # the one training continues from.
            state["rng"] = RNGState()
        flat = flatten(state)
        return write_container(
            os.fspath(path),
            flat.tensors,
            kind="state",
            storage=self._storage,
            options=WriteOptions(
                tree=flat.tree,
                aliases=flat.aliases,
                metadata={
                    "trainer": "transformers",
                    "transformers_version": transformers.__version__,
                    "global_step": self.state.global_step,
                },
                files=files,
            ),
        )

    def _trainer_files(self, model: Any) -> dict[str, bytes]:
        """The small files of a checkpoint, as the Trainer's own writers make them."""
        with tempfile.TemporaryDirectory(prefix="torchkeep-trainer-") as scratch:
            self._save_model_files(model, scratch)
            self.state.save_to_json(os.path.join(scratch, TRAINER_STATE))
            files = {TRAINING_ARGS: self._training_args_json()}
            for entry in sorted(os.scandir(scratch), key=lambda e: e.name):
                if entry.is_file(follow_symlinks=False):
                    files[entry.name] = Path(entry.path).read_bytes()
                else:
                    log.warning(
                        "%s, written by the model's or tokenizer's save_pretrained, is not a "
                        "plain file: left out of the checkpoint (training resumes without it)",
                        entry.name,
                    )
        return files

    def _save_model_files(self, model: Any, directory: str) -> None:
        """Write the model's configuration and the tokenizer's files (not the weights)."""
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(directory)
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation is not None and callable(can_generate) and can_generate():
            generation.save_pretrained(directory)
        processor = self._processor()
        if processor is not None:
            processor.save_pretrained(directory)

    def _processor(self) -> Any:
        """The tokenizer or processor the Trainer saves with the model, if any."""
        if self.processing_class is not None:
            return self.processing_class
        return getattr(self.data_collator, "tokenizer", None)

    def _training_args_json(self) -> bytes:
        args: Any = self.args  # to_json_string is not annotated
        return str(args.to_json_string()).encode()

    def _save(
        self, output_dir: str | None = None, state_dict: dict[Any, Any] | None = None
    ) -> None:
        """Save the model for ``from_pretrained`` (``trainer.save_model()``), with the training
        arguments as JSON instead of the stock ``training_args.bin`` pickle."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save or output_dir is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        log.info("saving the model to %s", output_dir)
        model = self._unwrapped_model()
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
        else:  # a plain module: its weights, as a standard safetensors file
            weights = model.state_dict() if state_dict is None else state_dict
            save_weights(weights, os.path.join(output_dir, "model.safetensors"))
        processor = self._processor()
        if processor is not None:
            processor.save_pretrained(output_dir)
        data = self._training_args_json()

        def fill(sink: Sink) -> None:
            sink.pwrite(memoryview(data), 0)

        self._storage.write_file(os.path.join(output_dir, TRAINING_ARGS), len(data), fill)

    def _tune_save_checkpoint(self, checkpoint_dir: str) -> None:
        """A Ray Tune trial's checkpoint: the same save as every other."""
        stateful: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]
        stateful["TrainerControl"] = self.control.state()
        self.write_checkpoint(
            os.path.join(checkpoint_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        )

    def _rotate(self, run_dir: str) -> None:
        """Keep ``save_total_limit`` steps: the Trainer's choice (the newest step and the best
        one are kept), each deleted step first renamed out of the ``checkpoint-*`` names."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        steps = sort_checkpoints(run_dir, use_mtime=True)
        if len(steps) <= limit:
            return
        protected = {steps[-1]}
        if self.state.best_model_checkpoint is not None:
            protected.add(str(Path(self.state.best_model_checkpoint)))
        remaining = len(steps)
        for step in steps:
            if remaining <= max(limit, len(protected)):
                break
            if step not in protected:
                self._delete_step(step)
                remaining -= 1

    def _delete_step(self, path: str) -> None:
        try:
            doomed = self._storage.retire_dir(path)
        except StorageError as e:  # the new step is committed: only space is lost
            log.warning("could not delete %s: %s", path, e.__cause__ or e)
            return
        log.info("deleted %s (save_total_limit=%s)", path, self.args.save_total_limit)
        self._storage.remove_dir(doomed)

    def _clean_leftovers(self, run_dir: str) -> None:
        """Deal with what saves and deletions killed in the middle left behind (one run writes
        a directory at a time): a step's previous version moved aside (``….old``) goes back
        when its step is missing and it is whole, everything else is removed."""

        def whole(leftover: str) -> bool:
            if _is_stock_step(leftover):
                return True
            read_manifest(leftover, self._storage)
            return True

        def ours(leftover: Leftover) -> bool:
            return bool(_STEP.fullmatch(os.path.basename(leftover.target)))

        for leftover, restored in recover_leftovers(self._storage, run_dir, whole, belongs=ours):
            name = os.path.basename(leftover.path)
            if restored:
                log.info(
                    "restored %s from %s, left by an interrupted replacement",
                    leftover.target,
                    name,
                )
            else:
                log.info("removed %s, left by an interrupted save or deletion", name)

    def _finalize_training(self, trial: Any, num_train_samples: Any, start_time: Any) -> Any:
        """``Trainer._finalize_training``, with the steps it deletes deleted the safe way
        first: with ``save_total_limit=1`` and a best step, every other step goes."""
        best = self.state.best_model_checkpoint
        if (
            self.args.should_save
            and self.args.save_total_limit == 1
            and best is not None
            and os.path.isdir(best)
        ):
            if self.args.load_best_model_at_end and self._is_torchkeep(best):
                # It is about to be loaded, and will be the only step left: a damaged one is
                # refused now, while the other steps are still there.
                with open_container(best, storage=self._storage) as container:
                    self._check_checksums(container, _BEST_REFUSED)
            for step in sort_checkpoints(self._get_output_dir(trial)):
                if not os.path.samefile(step, best):
                    self._delete_step(step)
        return super()._finalize_training(  # type: ignore[no-untyped-call]
            trial, num_train_samples, start_time
        )

    # -- resuming: the Trainer calls these in this order

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Check the whole checkpoint, restore the model and keep the rest for the next hooks.

        Runs before the Trainer reads ``trainer_state.json``, whose checksum is checked here.
        """
        if model is None:
            model = self._unwrapped_model()
        self._resumed = self._read_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        resumed = self._resumed_from(checkpoint)
        if resumed.optimizer is not None:
            _restore(self.optimizer, resumed.optimizer, f"{checkpoint}: optimizer")
        if resumed.scheduler is not None:
            _restore(self.lr_scheduler, resumed.scheduler, f"{checkpoint}: scheduler")
        resumed.optimizer = resumed.scheduler = None  # applied: free the memory

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        resumed = self._resumed_from(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if resumed.scaler is not None and scaler is not None:
            _restore(scaler, resumed.scaler, f"{checkpoint}: scaler")
        resumed.scaler = None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        resumed = self._resumed_from(checkpoint)
        if resumed.rng is None:
            log.info(
                "%s holds no random generator state; they go on from where they are", checkpoint
            )
        else:
            RNGState().load_state_dict(resumed.rng)
        self._resumed = None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            return
        log.info("loading the best model from %s (score: %s)", best, self.state.best_metric)
        if self._is_torchkeep(best):
            with open_container(best, storage=self._storage) as container:
                self._check_checksums(container, _BEST_REFUSED)
            load_weights(self._unwrapped_model(), best)
        else:
            self._load_stock_weights(best, self._unwrapped_model())

    def _unwrapped_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _is_torchkeep(self, path: str) -> bool:
        return self._storage.exists(os.path.join(path, MANIFEST_FILE))

    def _resumed_from(self, checkpoint: str) -> _Resumed:
        if self._resumed is None or self._resumed.path != checkpoint:
            # Restored piece by piece without the model (a caller's own order of hooks).
            self._resumed = self._read_checkpoint(checkpoint, None)
        return self._resumed

    def _read_checkpoint(self, path: str, model: Any) -> _Resumed:
        if not self._is_torchkeep(path) and _is_stock(path):
            return self._read_stock_checkpoint(path, model)
        # Every member (the Trainer reads trainer_state.json itself, next) and every tensor is
        # checked before the model, filled in place, receives a byte; the load checks again.
        with open_container(path, storage=self._storage) as container:
            members = container.manifest.files if container.manifest is not None else {}
            if TRAINER_STATE not in members:
                raise UnsupportedFormatError(
                    f"{path}: a torchkeep save without {TRAINER_STATE}: not a checkpoint of a "
                    "Trainer. Load it with tk.load"
                )
            self._check_checksums(container, "Resume from another checkpoint-<step>")
        loaded = load_from(self._storage, path, into=None if model is None else {"model": model})
        log.info("resuming from %s", path)
        return _Resumed(
            path,
            optimizer=loaded.get("optimizer"),
            scheduler=loaded.get("scheduler"),
            scaler=loaded.get("scaler"),
            rng=loaded.get("rng"),
        )

    def _check_checksums(self, container: Container, then: str) -> None:
        """Check every tensor and member file before anything is read into the model."""
        problems = container.verify()
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CorruptCheckpointError(
                f"{container.path}: damaged, nothing was loaded from it (the model keeps its "
                f"weights): {'; '.join(problems[:3])}{more}. {then} (`torchkeep verify` "
                "checks each)"
            )

    def _read_stock_checkpoint(self, path: str, model: Any) -> _Resumed:
        """A checkpoint of ``transformers.Trainer``: no pickle runs, no checksum is checked."""
        log.warning(
            "%s was written by transformers.Trainer: it has no checksums to check; its pickles "
            "are read by torchkeep's restricted unpickler",
            path,
        )
        if model is not None:
            self._load_stock_weights(path, model)
        resumed = _Resumed(path)
        for attribute, name in (
            ("optimizer", _STOCK_OPTIMIZER),
            ("scheduler", _STOCK_SCHEDULER),
            ("scaler", _STOCK_SCALER),
        ):
            if os.path.isfile(os.path.join(path, name)):
                setattr(resumed, attribute, load_from(self._storage, os.path.join(path, name)))
        if any(_STOCK_RNG.fullmatch(name) for name in self._storage.list_dir(path)):
            log.warning(
                "%s: the random generators' state not restored: rng_state.pth pickles numpy "
                "arrays, which torchkeep does not unpickle. The generators go on from their "
                "current state, so dropout and other random draws differ from the original run",
                path,
            )
        return resumed

    def _load_stock_weights(self, path: str, model: Any) -> None:
        """Load weights saved by ``save_pretrained`` as the stock Trainer does: keys the save
        left out (tied weights) stay as they are."""
        result = model.load_state_dict(load_state_dict(path), strict=False)
        self._issue_warnings_after_load(result)


def _is_stock(path: str) -> bool:
    """Whether ``path`` looks like a checkpoint of the stock Trainer."""
    return os.path.isfile(os.path.join(path, TRAINER_STATE)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (*_STOCK_WEIGHTS, _STOCK_OPTIMIZER)
    )


def _is_stock_step(path: str) -> bool:
    """Whether ``path`` is, beyond doubt, a step directory the stock Trainer wrote (and so one
    a save of the same step may replace): no manifest, and nothing but plain files, among them
    the ones the stock Trainer always writes."""
    if os.path.islink(path) or not os.path.isdir(path) or not _is_stock(path):
        return False
    names = os.listdir(path)
    return (
        _STOCK_ARGS in names
        and MANIFEST_FILE not in names
        and all(
            os.path.isfile(p) and not os.path.islink(p)
            for p in (os.path.join(path, n) for n in names)
        )
    )


def _restore(obj: Any, state: Any, where: str) -> None:
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise StateMismatchError(
            f"{where}: the saved state does not fit this {type(obj).__name__}: {e}. Resume "
            "with the same model, optimizer and scheduler settings as the run that saved it"
        ) from e
