"""Loading a whole model (``load_model``): rebuilt from its recipe on the meta device with the
loaded tensors as its parameters, or, when its code cannot be used, the exported program run;
a pickled model (``torch.save(model)``) only with ``trust_code``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchkeep._types import Device
from torchkeep.checkpoint.state import one_source
from torchkeep.container import Container, open_container
from torchkeep.errors import (
    CorruptCheckpointError,
    UnsafeFileError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.format import MODEL_KIND, ModelSection
from torchkeep.format.detect import Kind, readable
from torchkeep.legacy import scan
from torchkeep.model.assign import assign, restore_attributes
from torchkeep.model.capture import Recipe
from torchkeep.model.decode import Trust, decode_recipe, describe_recipe_json
from torchkeep.model.program import load_program
from torchkeep.model.recipe import build_on_meta
from torchkeep.storage import Storage, storage_for
from torchkeep.tree import convert

log = logging.getLogger(__name__)


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    trust_code: bool = False,
    allowed_modules: Iterable[str] = (),
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Load a model saved by ``save_model``, in ``eval()`` mode, with no pickle.

    The model is rebuilt from its recipe on the meta device and the loaded tensors become its
    parameters (no second copy) when the recipe's classes can be used: those of modules already
    imported, or named in ``allowed_modules`` (importing a module runs its code). Otherwise the
    exported program runs, if one was saved; it needs no trust.

    ``torch.save(model)`` files load only with ``trust_code=True``: they are pickles, and
    loading them runs code from the file.

    Args:
        source: the directory ``save_model`` wrote, or a ``torch.save(model)`` file; local, or
            an fsspec URL.
        device: where the model's tensors are placed (``"cuda"``, say).
        dtype: cast float16, bfloat16, float32 and float64 parameters and buffers
            (``torch.bfloat16`` to deploy); float8 and float4 ones keep theirs.
        trust_code: allow importing and calling anything the file names, and pickles.
        allowed_modules: modules (and their sub-modules) the recipe may import and call from.
        verify: check every tensor and the exported program against their checksums (a
            damaged file raises ``CorruptCheckpointError``); as for every loader.
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.
        path: ``source`` under its earlier name; give one of the two.

    Raises:
        UnsafeFileError: rebuilding needs code that is not allowed, and no program was saved;
            or a pickled model without ``trust_code``.

    Example:
        ```python
        model = tk.load_model("model", device="cuda", dtype=torch.bfloat16)
        ```
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point dtype such as torch.bfloat16, not {dtype}"
        )
    given = one_source(source, path, caller="load_model")
    storage, target = storage_for(given, storage_options)
    with readable(storage, target) as (storage, target, kind):
        return _load_model(
            storage,
            target,
            kind,
            device=device,
            dtype=dtype,
            trust=Trust(tuple(allowed_modules), trust_code),
            verify=verify,
        )


def _load_model(
    storage: Storage,
    source: str,
    kind: Kind,
    *,
    device: Device,
    dtype: torch.dtype | None,
    trust: Trust,
    verify: bool,
) -> nn.Module:
    trust_code = trust.trust_code
    if kind.pickled:
        return _load_pickled(source, device=device, dtype=dtype, trust_code=trust_code)
    with open_container(source, storage=storage) as container:
        raw = container.manifest.model if container.manifest is not None else None
        saved = container.manifest.kind if container.manifest else "safetensors"
        if saved == MODEL_KIND and not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{source}: a model save without its model section")
        if not isinstance(raw, dict) or container.manifest is None:
            raise UnsupportedFormatError(
                f"{source}: holds {saved}, not a whole model (tk.save_model writes those). "
                "Build the model and load its weights: tk.load_weights(model, path)"
            )
        section = ModelSection.from_json(raw)
        program = section.program
        refused: Exception | None = None
        if section.recipe is not None:
            try:
                recipe = decode_recipe(section.recipe, trust, where=source)
            except (UnsafeFileError, UnsupportedObjectError) as e:
                if program is None:
                    raise
                refused = e
            else:
                return _rebuild(
                    container, section, recipe, trust=trust, device=device, dtype=dtype,
                    verify=verify,
                )  # fmt: skip
        if program is None:
            raise UnsupportedObjectError(
                f"{source}: the model has no recipe ({section.recipe_problem}) and no "
                "exported program; save it again with a recipe or example_inputs"
            )
        if refused is not None:
            log.info("%s: running the exported program: %s", source, refused)
        # The program was exported in eval() mode and runs so (program.inference_only).
        rebuild = None
        if section.recipe is not None:
            module = section.class_name.partition(":")[0]
            rebuild = (
                f"load it with its class's module imported first (import {module}) or allowed "
                f"(tk.load_model(path, allowed_modules=[{module!r}]))"
            )
        return load_program(container, device=device, dtype=dtype, verify=verify, rebuild=rebuild)


def _rebuild(
    container: Container,
    section: ModelSection,
    recipe: Recipe,
    *,
    trust: Trust,
    device: Device,
    dtype: torch.dtype | None,
    verify: bool,
) -> nn.Module:
    where = container.path
    stored_recipe = section.recipe or {}  # ``recipe`` was decoded from it
    # A constructor that cannot run on the meta device is built for real (memory for its
    # weights) only when its module was allowed explicitly: a file must not make us allocate.
    target = stored_recipe["call"].partition(":")[0]
    try:
        model = build_on_meta(recipe, cpu_fallback=trust.allows(target))
    except Exception as e:  # the constructor may raise anything
        raise UnsupportedObjectError(
            f"{where}: rebuilding the model with {describe_recipe_json(stored_recipe)} "
            f"raised {type(e).__name__}: {e}. If it cannot be built on the meta device, pass "
            f"allowed_modules=['{target}'] to let it build on the CPU; if its code changed since "
            "the save, load the weights into a model you build: tk.load_weights(model, path)"
        ) from e
    if not isinstance(model, nn.Module):
        raise UnsupportedObjectError(
            f"{where}: the recipe {describe_recipe_json(stored_recipe)} returned "
            f"{type(model).__name__}, not a module"
        )
    names = _stored_names(container)
    tensors = container.read(sorted(set(names.values())), verify=verify)
    converted: dict[str, torch.Tensor] = {}
    for stored, t in tensors.items():
        converted[stored] = convert(t, map_location=device, dtype=dtype)
    del tensors
    frozen = set(section.frozen)
    assign(
        model, {key: converted[stored] for key, stored in names.items()}, where=where, frozen=frozen
    )
    restore_attributes(model, section.attributes, where=where)
    return model.eval()


def _stored_names(container: Container) -> dict[str, str]:
    keys = {name: name for name in container.entries}
    keys.update(container.aliases)
    return keys


def _load_pickled(
    path: str, *, device: Device, dtype: torch.dtype | None, trust_code: bool
) -> nn.Module:
    if not trust_code:
        report = scan(path)
        if not report.safe and not report.unsafe:
            raise CorruptCheckpointError(
                f"{path}: not a readable torch.save file: {report.verdict}"
            )
        if report.safe:
            raise UnsupportedFormatError(
                f"{path}: holds weights or training state, not a saved model. Build the model "
                "and load them: tk.load_weights(model, path)"
            )
        shown = ", ".join(report.unsafe[:6]) + (", …" if len(report.unsafe) > 6 else "")
        raise UnsafeFileError(
            f"{path}: a pickled model (torch.save(model)); loading it runs code named by the "
            f"file ({shown}). If you trust whoever made it: tk.load_model(path, "
            f"trust_code=True), then save it again with tk.save_model. To see everything it "
            f"would run: torchkeep scan {path}"
        )
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # the pickle's own code may raise anything
        raise CorruptCheckpointError(f"{path}: loading the pickled model failed: {e}") from e
    if not isinstance(obj, nn.Module):
        raise UnsupportedFormatError(
            f"{path}: holds a {type(obj).__name__}, not a model; load it with tk.load"
        )
    if dtype is not None:
        obj = obj.to(dtype)
    return obj.eval()
