"""Writing a step: the training state as one torchkeep save, with the Trainer's files."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import transformers

from torchkeep.container import SaveInfo, WriteOptions, write_container
from torchkeep.storage import Sink, Storage
from torchkeep.tree import flatten
from torchkeep.weights import save_weights

log = logging.getLogger("torchkeep.integrations.transformers")

TRAINING_ARGS = "training_args.json"


def write_step(
    storage: Storage,
    path: str | os.PathLike[str],
    state: dict[str, Any],
    files: dict[str, bytes],
    global_step: int,
) -> SaveInfo:
    """Write ``state`` (the model, the optimizer, …), with ``files`` as members, as one atomic
    save at ``path``."""
    flat = flatten(state)
    return write_container(
        os.fspath(path),
        flat.tensors,
        kind="state",
        storage=storage,
        options=WriteOptions(
            tree=flat.tree,
            aliases=flat.aliases,
            metadata={
                "trainer": "transformers",
                "transformers_version": transformers.__version__,
                "global_step": global_step,
            },
            files=files,
        ),
    )


def plain_files(directory: str) -> dict[str, bytes]:
    """The plain files in ``directory``, by name; anything else is left out, with a warning."""
    files: dict[str, bytes] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False):
            files[entry.name] = Path(entry.path).read_bytes()
        else:
            log.warning(
                "%s, written by the model's or tokenizer's save_pretrained, is not a "
                "plain file: left out of the checkpoint (training resumes without it)",
                entry.name,
            )
    return files


def save_model_files(model: Any, processor: Any, directory: str) -> None:
    """Write the model's configuration and the tokenizer's files (not the weights)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)


def save_model(
    storage: Storage,
    output_dir: str,
    model: Any,
    state_dict: dict[Any, Any] | None,
    processor: Any,
    training_args: bytes,
) -> None:
    """Save ``model`` to ``output_dir`` for ``from_pretrained``, with its tokenizer or processor
    and the training arguments as JSON."""
    os.makedirs(output_dir, exist_ok=True)
    log.info("saving the model to %s", output_dir)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
    else:  # a plain module: its weights, as a standard safetensors file
        weights = model.state_dict() if state_dict is None else state_dict
        save_weights(weights, os.path.join(output_dir, "model.safetensors"))
    if processor is not None:
        processor.save_pretrained(output_dir)

    def fill(sink: Sink) -> None:
        sink.pwrite(memoryview(training_args), 0)

    storage.write_file(os.path.join(output_dir, TRAINING_ARGS), len(training_args), fill)
