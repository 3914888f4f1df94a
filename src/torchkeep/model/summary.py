"""A saved model as ``describe`` (and ``torchkeep inspect``) shows it: how it can be rebuilt."""

from __future__ import annotations

from typing import Any

from torchkeep.container import Container
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format import ModelSection
from torchkeep.model.decode import describe_recipe_json, recipe_modules


def model_summary(container: Container) -> dict[str, Any] | None:
    """How a saved model can be rebuilt, for ``describe``: the recipe as a call, the program."""
    raw = container.manifest.model if container.manifest is not None else None
    if not isinstance(raw, dict):
        return None
    section = ModelSection.from_json(raw)
    recipe = section.recipe
    try:
        call = describe_recipe_json(recipe) if isinstance(recipe, dict) else None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{container.path}: the model recipe is malformed") from e
    return {
        "class": section.class_name,
        "recipe": call,
        "recipe_modules": sorted(set(recipe_modules(recipe))) if recipe else [],
        "recipe_problem": section.recipe_problem,
        "program": section.program,
        "architecture": section.architecture,
        "converted": section.converted,
    }
