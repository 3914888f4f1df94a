"""Whole models without pickle: ``save_model`` and ``load_model``.

A saved model is a torchkeep directory: the weights (safetensors shards, non-persistent buffers
included), a manifest whose ``model`` section holds the recipe that rebuilds the module and its
architecture, and, when example inputs were given, ``program.pt2``: the model exported with
``torch.export``, which runs with no class code at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchkeep._types import Device
from torchkeep.checkpoint import check_metadata
from torchkeep.container import (
    Container,
    SaveInfo,
    open_container,
    read_manifest,
    write_container,
)
from torchkeep.errors import (
    CorruptCheckpointError,
    StateMismatchError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.format import is_single_file
from torchkeep.format.detect import Kind, readable
from torchkeep.legacy import scan
from torchkeep.program import PROGRAM_FILE, export_program, load_program
from torchkeep.recipe import (
    Recipe,
    Trust,
    build_on_meta,
    decode_recipe,
    describe_recipe_json,
    encode_recipe,
    non_persistent_buffers,
    plain_attributes,
    qualified_name,
    recipe_for,
    recipe_modules,
    restore_attributes,
)
from torchkeep.storage import DEFAULT_STORAGE, Storage, storage_for
from torchkeep.tree import convert, dedupe

log = logging.getLogger(__name__)

MODEL_KIND = "model"


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    dynamic_batch: bool = True,
    recipe: tuple[Any, Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
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
    storage, target = storage_for(path, storage_options)
    if is_single_file(target):
        raise UnsupportedObjectError(
            f"{target}: a whole model is saved as a directory; pass a name without "
            "'.safetensors' (or use tk.save_weights for a single file of weights)"
        )
    given = None
    if recipe is not None:
        if not (isinstance(recipe, tuple) and len(recipe) == 2 and callable(recipe[0])):
            raise UnsupportedObjectError(
                "recipe must be (class_or_factory, {arguments}), such as (Net, {'hidden': 128})"
            )
        given = Recipe(recipe[0], (), dict(recipe[1]))
    stored_recipe: dict[str, Any] | None = None
    problem = None
    try:
        stored_recipe = encode_recipe(recipe_for(model, given))
    except UnsupportedObjectError as e:
        if given is not None or example_inputs is None:
            raise UnsupportedObjectError(
                str(e) + " (or pass example_inputs= to store an exported program)"
                if given is None
                else str(e)
            ) from e
        problem = str(e)
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
    section = {
        "class": qualified_name(type(model)),
        "recipe": stored_recipe,
        "recipe_problem": problem,
        "program": program,
        "buffers": buffers,
        "frozen": [name for name, p in model.named_parameters() if not p.requires_grad],
        "attributes": plain_attributes(model),
        "architecture": architecture(model),
    }
    return write_container(
        target,
        flat.tensors,
        kind=MODEL_KIND,
        aliases=flat.aliases,
        metadata=check_metadata(metadata),
        files=files,
        model=section,
        storage=storage,
    )


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


def load_model(
    path: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    trust_code: bool = False,
    allowed_modules: Iterable[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a model saved by ``save_model``, in ``eval()`` mode, with no pickle.

    The model is rebuilt from its recipe on the meta device and the loaded tensors become its
    parameters (no second copy) when the recipe's classes can be used: those of modules already
    imported, or named in ``allowed_modules`` (importing a module runs its code). Otherwise the
    exported program runs, if one was saved; it needs no trust.

    ``torch.save(model)`` files load only with ``trust_code=True``: they are pickles, and
    loading them runs code from the file.

    Args:
        device: where the model's tensors are placed (``"cuda"``, say).
        dtype: cast floating-point parameters and buffers (``torch.bfloat16`` to deploy).
        trust_code: allow importing and calling anything the file names, and pickles.
        allowed_modules: modules (and their sub-modules) the recipe may import and call from.
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.

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
    storage, source = storage_for(path, storage_options)
    with readable(storage, source) as (storage, source, kind):
        return _load_model(
            storage,
            source,
            kind,
            device=device,
            dtype=dtype,
            trust=Trust(tuple(allowed_modules), trust_code),
        )


def _load_model(
    storage: Storage,
    source: str,
    kind: Kind,
    *,
    device: Device,
    dtype: torch.dtype | None,
    trust: Trust,
) -> nn.Module:
    trust_code = trust.trust_code
    if kind.pickled:
        return _load_pickled(source, device=device, dtype=dtype, trust_code=trust_code)
    with open_container(source, storage=storage) as container:
        section = container.manifest.model if container.manifest is not None else None
        saved = container.manifest.kind if container.manifest else "safetensors"
        if saved == MODEL_KIND and not isinstance(section, dict):
            raise CorruptCheckpointError(f"{source}: a model save without its model section")
        if not isinstance(section, dict) or container.manifest is None:
            raise UnsupportedFormatError(
                f"{source}: holds {saved}, not a whole model (tk.save_model writes those). "
                "Build the model and load its weights: tk.load_weights(model, path)"
            )
        program = section.get("program")
        refused: Exception | None = None
        if section.get("recipe") is not None:
            try:
                recipe = decode_recipe(section["recipe"], trust, where=source)
            except (UnsafeFileError, UnsupportedObjectError) as e:
                if program is None:
                    raise
                refused = e
            else:
                return _rebuild(container, section, recipe, trust=trust, device=device, dtype=dtype)
        if program is None:
            raise UnsupportedObjectError(
                f"{source}: the model has no recipe ({section.get('recipe_problem')}) and no "
                "exported program; save it again with a recipe or example_inputs"
            )
        if refused is not None:
            log.info("%s: running the exported program: %s", source, refused)
        # The program was exported in eval() mode, and its module cannot switch modes.
        return load_program(container, device=device, dtype=dtype)


def _rebuild(
    container: Container,
    section: Mapping[str, Any],
    recipe: Recipe,
    *,
    trust: Trust,
    device: Device,
    dtype: torch.dtype | None,
) -> nn.Module:
    where = container.path
    # A constructor that cannot run on the meta device is built for real (memory for its
    # weights) only when its module was allowed explicitly: a file must not make us allocate.
    target = section["recipe"]["call"].partition(":")[0]
    try:
        model = build_on_meta(recipe, cpu_fallback=trust.allows(target))
    except Exception as e:  # the constructor may raise anything
        raise UnsupportedObjectError(
            f"{where}: rebuilding the model with {describe_recipe_json(section['recipe'])} "
            f"raised {type(e).__name__}: {e}. If it cannot be built on the meta device, pass "
            f"allowed_modules=['{target}'] to let it build on the CPU; if its code changed since "
            "the save, load the weights into a model you build: tk.load_weights(model, path)"
        ) from e
    if not isinstance(model, nn.Module):
        raise UnsupportedObjectError(
            f"{where}: the recipe {describe_recipe_json(section['recipe'])} returned "
            f"{type(model).__name__}, not a module"
        )
    names = _stored_names(container)
    tensors = container.read(sorted(set(names.values())))
    converted: dict[str, torch.Tensor] = {}
    for stored, t in tensors.items():
        converted[stored] = convert(t, map_location=device, dtype=dtype)
    del tensors
    frozen = set(section.get("frozen") or [])
    assign(
        model, {key: converted[stored] for key, stored in names.items()}, where=where, frozen=frozen
    )
    restore_attributes(model, section.get("attributes", {}), where=where)
    return model.eval()


def _stored_names(container: Container) -> dict[str, str]:
    keys = {name: name for name in container.entries}
    keys.update(container.aliases)
    return keys


def assign(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str,
    frozen: Iterable[str] = (),
) -> None:
    """Make ``tensors`` the module's parameters and buffers, by name, keeping tied ones tied;
    parameters named in ``frozen`` get ``requires_grad=False``.

    Raises:
        StateMismatchError: a tensor is missing, extra, or of another shape.
    """
    # Keyed by id of the rebuilt model's tensor, which is kept alive beside its replacement so
    # that no id is reused while this runs (a module registered twice is visited twice).
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    frozen_keys = set(frozen)
    placed: set[int] = set()
    used: set[str] = set()
    missing: list[str] = []
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for name, old in table.items():
                if old is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(old) in placed:  # this module was seen under another name already
                    used.add(key)
                    continue
                if id(old) in done:
                    table[name] = done[id(old)][1]
                    used.add(key)
                    continue
                new = tensors.get(key)
                if new is None:
                    missing.append(key)
                    continue
                if new.shape != old.shape:
                    raise StateMismatchError(
                        f"{where}: '{key}' is stored with shape {list(new.shape)} but the rebuilt "
                        f"model has {list(old.shape)}; the model's code changed since the save"
                    )
                trainable = old.requires_grad and key not in frozen_keys
                value = nn.Parameter(new, requires_grad=trainable) if is_param else new
                table[name] = value
                done[id(old)] = (old, value)
                placed.add(id(value))
                used.add(key)
    extra = sorted(set(tensors) - used)
    if missing or extra:
        raise StateMismatchError(
            f"{where}: the rebuilt model does not fit the stored weights"
            + (f"; missing from the save: {', '.join(missing[:8])}" if missing else "")
            + (f"; not in the rebuilt model: {', '.join(extra[:8])}" if extra else "")
            + ". The model's code changed since the save: load the exported program, or the"
            " weights with tk.load_weights(model, path, strict=False)"
        )


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
        section = dict(manifest.model)
        tensors = container.read(list(container.entries))
        source_bytes = container.file_bytes()
        aliases = dict(container.aliases)
    files: dict[str, bytes] = {}
    program = section.get("program")
    difference = "not measured: the model has no exported program to take its input shapes from"
    if isinstance(program, dict):
        original, converted = load_model(src), load_model(src, dtype=dtype)
        inputs = _random_inputs(program, where=src)
        cast_inputs = tuple(x.to(dtype) if dtype and x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            difference = _difference(original(*inputs), converted(*cast_inputs))
        files[PROGRAM_FILE], section["program"] = export_program(
            converted, cast_inputs, dynamic_batch=bool(program.get("dynamic_batch"))
        )
    cast = {
        name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for name, t in tensors.items()
    }
    section["converted"] = {
        "source": os.path.basename(os.path.normpath(src)),
        "dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "source_bytes": source_bytes,
        "output_difference": difference,
    }
    return write_container(
        dst,
        cast,
        kind=MODEL_KIND,
        aliases=aliases,
        metadata=manifest.metadata,
        files=files,
        model=section,
        storage=storage,
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


def model_summary(container: Container) -> dict[str, Any] | None:
    """How a saved model can be rebuilt, for ``describe``: the recipe as a call, the program."""
    section = container.manifest.model if container.manifest is not None else None
    if not isinstance(section, dict):
        return None
    recipe = section.get("recipe")
    try:
        call = describe_recipe_json(recipe) if isinstance(recipe, dict) else None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{container.path}: the model recipe is malformed") from e
    return {
        "class": section.get("class"),
        "recipe": call,
        "recipe_modules": sorted(set(recipe_modules(recipe))) if recipe else [],
        "recipe_problem": section.get("recipe_problem"),
        "program": section.get("program"),
        "architecture": section.get("architecture"),
        "converted": section.get("converted"),
    }
