"""Converting a saved model for deployment (``convert_model``, what ``tk.convert`` does with a
``save_model`` directory): its weights cast, its program exported again, the size and output
difference recorded; and telling such a directory from other saves (``is_saved_model``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from torchkeep.container import (
    SaveInfo,
    WriteOptions,
    open_container,
    read_manifest,
    write_container,
)
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format import MODEL_KIND, PROGRAM_FILE, ModelSection
from torchkeep.model.load import load_model
from torchkeep.model.program import export_program
from torchkeep.storage import DEFAULT_STORAGE, Storage
from torchkeep.tree import convert


def is_saved_model(path: str) -> bool:
    """Whether ``path`` is a directory written by ``save_model`` (judged by its manifest)."""
    if not os.path.isdir(path):
        return False
    try:
        return read_manifest(path).kind == MODEL_KIND
    except (OSError, TorchkeepError):
        return False  # not a directory save: whoever reads it next says what is wrong


def convert_model(
    src: str, dst: str, *, dtype: torch.dtype | None, storage: Storage = DEFAULT_STORAGE
) -> SaveInfo:
    """Convert a saved model, for deployment: cast its weights and re-export its program at
    ``dtype``, and record the size and the output difference this makes.

    The difference is measured on seeded random inputs of the program's input shapes (batch
    of 2), between the saved model and the converted one, both loaded as ``load_model`` loads
    them (the recipe when its code is available, else the program).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point dtype such as torch.bfloat16, not {dtype}"
        )
    with open_container(src) as container:
        manifest = container.manifest
        if manifest is None or not isinstance(manifest.model, dict):
            raise CorruptCheckpointError(f"{src}: a model save without its model section")
        section = ModelSection.from_json(manifest.model)
        tensors = container.read(list(container.entries))
        source_bytes = container.file_bytes()
        aliases = dict(container.aliases)
    files: dict[str, bytes] = {}
    program = section.program
    difference = "not measured: the model has no exported program to take its input shapes from"
    if isinstance(program, dict):
        original, converted = load_model(src), load_model(src, dtype=dtype)
        inputs = _random_inputs(program, where=src)
        cast_inputs = tuple(convert(x, map_location=None, dtype=dtype) for x in inputs)
        with torch.no_grad():
            difference = _difference(original(*inputs), converted(*cast_inputs))
        files[PROGRAM_FILE], exported = export_program(
            converted, cast_inputs, dynamic_batch=bool(program.get("dynamic_batch"))
        )
        section = replace(section, program=exported)
    cast = {name: convert(t, map_location=None, dtype=dtype) for name, t in tensors.items()}
    section = replace(
        section,
        converted={
            "source": os.path.basename(os.path.normpath(src)),
            "dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "source_bytes": source_bytes,
            "output_difference": difference,
        },
    )
    return write_container(
        dst,
        cast,
        kind=MODEL_KIND,
        storage=storage,
        options=WriteOptions(
            aliases=aliases, metadata=manifest.metadata, files=files, model=section.to_json()
        ),
    )


def _random_inputs(program: Mapping[str, Any], *, where: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    inputs = []
    specs = program.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise CorruptCheckpointError(f"{where}: the model's program lists no inputs")
    for spec in specs:
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = getattr(torch, str(spec.get("dtype")), None) if isinstance(spec, dict) else None
        if (
            not isinstance(shape, list)
            or not all(d is None or (type(d) is int and 0 < d <= 1 << 16) for d in shape)
            or not isinstance(dtype, torch.dtype)
        ):
            raise CorruptCheckpointError(f"{where}: the model's program inputs are malformed")
        shape = [2 if d is None else d for d in shape]
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 2, shape, generator=generator).to(dtype))
    return tuple(inputs)


def _difference(expected: Any, got: Any) -> str:
    pairs = [(a, b) for a, b in zip(_leaves(expected), _leaves(got), strict=False) if a.numel()]
    if not pairs:
        return "not measured: the model returns no tensors with elements"
    worst = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    scale = max(float(a.double().abs().max()) for a, _ in pairs)
    return f"max abs {worst:.3g} (outputs up to {scale:.3g}) on random inputs"


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _leaves(v)]
    return []
