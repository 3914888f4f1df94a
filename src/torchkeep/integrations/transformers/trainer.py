"""The Trainer: ``TorchkeepTrainer``, the hooks of ``transformers.Trainer`` that save and resume."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints

from torchkeep.container import Container, SaveInfo, open_container
from torchkeep.format import MANIFEST_FILE
from torchkeep.integrations.transformers.resume import (
    Resumed,
    check_checksums,
    read_checkpoint,
    restore,
)
from torchkeep.integrations.transformers.saving import (
    TRAINING_ARGS,
    plain_files,
    save_model,
    save_model_files,
    write_step,
)
from torchkeep.integrations.transformers.steps import (
    clean_leftovers,
    delete_step,
    replace_stock_step,
    steps_to_delete,
)
from torchkeep.integrations.transformers.stock import (
    TRAINER_STATE,
    is_stock,
    is_stock_step,
    read_stock_state,
)
from torchkeep.storage import DEFAULT_STORAGE, Storage
from torchkeep.tree import RNGState
from torchkeep.weights import load_state_dict, load_weights

log = logging.getLogger("torchkeep.integrations.transformers")

_BEST_REFUSED = "The best model is not loaded and no step was deleted; load another step"


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
        self._resumed: Resumed | None = None
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
        if is_stock_step(output_dir):
            self._replace_stock_step(output_dir)
        else:
            self.write_checkpoint(output_dir)
        self._rotate(run_dir)

    def _replace_stock_step(self, path: str) -> None:
        """Write the step over one the stock Trainer wrote, as the stock Trainer would: the old
        directory is moved aside whole, and deleted once the new one is in place."""
        replace_stock_step(self._storage, path, self.write_checkpoint)

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
        return write_step(self._storage, path, state, files, self.state.global_step)

    def _trainer_files(self, model: Any) -> dict[str, bytes]:
        """The small files of a checkpoint, as the Trainer's own writers make them."""
        with tempfile.TemporaryDirectory(prefix="torchkeep-trainer-") as scratch:
            self._save_model_files(model, scratch)
            self.state.save_to_json(os.path.join(scratch, TRAINER_STATE))
            return {TRAINING_ARGS: self._training_args_json(), **plain_files(scratch)}

    def _save_model_files(self, model: Any, directory: str) -> None:
        """Write the model's configuration and the tokenizer's files (not the weights)."""
        save_model_files(model, self._processor(), directory)

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
        save_model(
            self._storage,
            output_dir,
            self._unwrapped_model(),
            state_dict,
            self._processor(),
            self._training_args_json(),
        )

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
        for step in steps_to_delete(run_dir, limit, self.state.best_model_checkpoint):
            self._delete_step(step)

    def _delete_step(self, path: str) -> None:
        delete_step(self._storage, path, self.args.save_total_limit)

    def _clean_leftovers(self, run_dir: str) -> None:
        """Deal with what saves and deletions killed in the middle left behind (one run writes
        a directory at a time): a step's previous version moved aside (``….old``) goes back
        when its step is missing and it is whole, everything else is removed."""
        clean_leftovers(self._storage, run_dir)

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
            restore(self.optimizer, resumed.optimizer, f"{checkpoint}: optimizer")
        if resumed.scheduler is not None:
            restore(self.lr_scheduler, resumed.scheduler, f"{checkpoint}: scheduler")
        resumed.optimizer = resumed.scheduler = None  # applied: free the memory

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        resumed = self._resumed_from(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if resumed.scaler is not None and scaler is not None:
            restore(scaler, resumed.scaler, f"{checkpoint}: scaler")
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

    def _resumed_from(self, checkpoint: str) -> Resumed:
        if self._resumed is None or self._resumed.path != checkpoint:
            # Restored piece by piece without the model (a caller's own order of hooks).
            self._resumed = self._read_checkpoint(checkpoint, None)
        return self._resumed

    def _read_checkpoint(self, path: str, model: Any) -> Resumed:
        if not self._is_torchkeep(path) and is_stock(path):
            return self._read_stock_checkpoint(path, model)
        return read_checkpoint(self._storage, path, model)

    def _check_checksums(self, container: Container, then: str) -> None:
        """Check every tensor and member file before anything is read into the model."""
        check_checksums(container, then)

    def _read_stock_checkpoint(self, path: str, model: Any) -> Resumed:
        """A checkpoint of ``transformers.Trainer``: no pickle runs, no checksum is checked."""
        log.warning(
            "%s was written by transformers.Trainer: it has no checksums to check; its pickles "
            "are read by torchkeep's restricted unpickler",
            path,
        )
        if model is not None:
            self._load_stock_weights(path, model)
        return Resumed(path, **read_stock_state(self._storage, path))

    def _load_stock_weights(self, path: str, model: Any) -> None:
        """Load weights saved by ``save_pretrained`` as the stock Trainer does: keys the save
        left out (tied weights) stay as they are."""
        result = model.load_state_dict(load_state_dict(path), strict=False)
        self._issue_warnings_after_load(result)
