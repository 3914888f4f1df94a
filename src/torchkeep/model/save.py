"""Saving a whole model (``save_model``): its weights, non-persistent buffers included, and a
manifest whose ``model`` section holds the recipe that rebuilds the module and its architecture,
and, when example inputs were given, ``program.pt2``: the model exported with ``torch.export``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from torchkeep.checkpoint import check_metadata
from torchkeep.container import SaveInfo, WriteOptions, write_container
from torchkeep.errors import UnsupportedObjectError
from torchkeep.format import MODEL_KIND, PROGRAM_FILE, ModelSection, is_single_file
from torchkeep.model.assign import plain_attributes
from torchkeep.model.capture import Recipe
from torchkeep.model.program import export_program
from torchkeep.model.recipe import (
    encode_recipe,
    non_persistent_buffers,
    qualified_name,
    recipe_for,
)
from torchkeep.storage import Storage, storage_for
from torchkeep.tree import dedupe


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    dynamic_batch: bool = True,
    recipe: tuple[Any, Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
) -> SaveInfo:
    """Save a whole model, architecture and weights, so that it loads with no pickle.

    The directory holds the weights, a recipe (the importable class or factory and its
    arguments) and, with ``example_inputs``, the model exported by ``torch.export`` so that it
    runs where its class is not available.

    Args:
        model: the module.
        path: a directory (written atomically; an earlier save there is replaced).
        example_inputs: a tensor or tuple of tensors the model is called with; stores an
            exported program.
        dynamic_batch: export with the first dimension of every input free (default), so the
            program runs at any batch size.
        recipe: ``(class_or_factory, {arguments})`` when the recipe cannot be found otherwise.
            Recipes are recorded for models built inside ``with tk.capture():`` and inferred
            for classes that keep their constructor arguments (``torch.nn`` layers,
            ``nn.Sequential``, classes with no arguments or that store them as attributes).
        metadata: JSON values stored with the model.
        storage_options: for a URL path (``s3://…``), the options of its fsspec file system.
        storage: write through this storage instead of the one ``path`` names (a
            ``torchkeep.testing.FaultyStorage`` that injects faults, for example).

    Raises:
        UnsupportedObjectError: neither a recipe nor a program can be stored; the message says
            which argument is missing and how to provide it.

    Example:
        ```python
        tk.save_model(model, "model", example_inputs=torch.randn(1, 3, 32, 32))
        model = tk.load_model("model")
        ```
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedObjectError(
            f"save_model takes a torch.nn.Module, not {type(model).__name__}; "
            "save weights or state with tk.save_weights or tk.save"
        )
    storage, target = storage_for(path, storage_options, storage)
    if is_single_file(target):
        raise UnsupportedObjectError(
            f"{target}: a whole model is saved as a directory; pass a name without "
            "'.safetensors' (or use tk.save_weights for a single file of weights)"
        )
    stored_recipe, problem = _stored_recipe(model, recipe, example_inputs=example_inputs)
    files: dict[str, bytes] = {}
    program = None
    if example_inputs is not None:
        files[PROGRAM_FILE], program = export_program(
            model, example_inputs, dynamic_batch=dynamic_batch
        )
    buffers = non_persistent_buffers(model)
    named = dict(model.state_dict())
    named.update({name: model.get_buffer(name) for name in buffers})
    flat = dedupe(named)
    section = ModelSection(
        class_name=qualified_name(type(model)),
        recipe=stored_recipe,
        recipe_problem=problem,
        program=program,
        buffers=buffers,
        frozen=[name for name, p in model.named_parameters() if not p.requires_grad],
        attributes=plain_attributes(model),
        architecture=architecture(model),
    )
    return write_container(
        target,
        flat.tensors,
        kind=MODEL_KIND,
        storage=storage,
        options=WriteOptions(
            aliases=flat.aliases,
            metadata=check_metadata(metadata),
            files=files,
            model=section.to_json(),
        ),
    )


def _stored_recipe(
    model: nn.Module, recipe: tuple[Any, Mapping[str, Any]] | None, *, example_inputs: Any
) -> tuple[dict[str, Any] | None, str | None]:
    """The recipe to store, as JSON, or None and why no recipe rebuilds the model (then only
    its exported program can).

    Raises:
        UnsupportedObjectError: ``recipe`` is malformed or does not rebuild the model, or no
            recipe does and there are no example inputs to export a program with.
    """
    given = None
    if recipe is not None:
        if not (isinstance(recipe, tuple) and len(recipe) == 2 and callable(recipe[0])):
            raise UnsupportedObjectError(
                "recipe must be (class_or_factory, {arguments}), such as (Net, {'hidden': 128})"
            )
        given = Recipe(recipe[0], (), dict(recipe[1]))
    try:
        return encode_recipe(recipe_for(model, given)), None
    except UnsupportedObjectError as e:
        if given is not None or example_inputs is None:
            raise UnsupportedObjectError(
                str(e) + " (or pass example_inputs= to store an exported program)"
                if given is None
                else str(e)
            ) from e
        return None, str(e)


def architecture(module: nn.Module, depth: int = 0) -> dict[str, Any]:
    """The module tree: each module's class and its parameter count (its children included)."""
    children = (
        {name: architecture(child, depth + 1) for name, child in module.named_children()}
        if depth < 32
        else {}
    )
    return {
        "type": qualified_name(type(module)),
        "parameters": sum(p.numel() for p in module.parameters()),
        "children": children,
    }
