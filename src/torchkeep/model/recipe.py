"""How to rebuild a module without pickle: the importable class or factory function that built it
and its arguments, as JSON.

A recipe is found three ways, in this order:

* recorded: the module was built inside ``with tk.capture():``, which notes the outermost call
  that returned it (a class or a factory such as ``resnet18(num_classes=10)``) and its arguments;
* given: ``save_model(model, path, recipe=(factory, {"num_classes": 10}))``;
* inferred: the class's constructor arguments read back from the module (containers from their
  children; other arguments from attributes of the same name, as ``torch.nn`` layers keep them).

A recipe is only kept when building it on the meta device gives the same module tree and tensor
shapes as the module being saved. A stored recipe is read back under ``Trust`` by
``torchkeep.model.decode``.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkeep.errors import UnsupportedObjectError
from torchkeep.format import Tag
from torchkeep.model.capture import MAX_DEPTH, Recipe, recorded_recipe
from torchkeep.model.decode import describe_recipe_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# finding a recipe


def recipe_for(module: nn.Module, given: Recipe | None = None) -> Recipe:
    """Return the recipe that rebuilds ``module``: given, recorded or inferred, and checked.

    Raises:
        UnsupportedObjectError: no recipe rebuilds it; the message says what is missing and how
            to provide it.
    """
    recipe = given or recorded_recipe(module) or _infer(module, depth=0)
    problem = check_rebuilds(recipe, module)
    if problem:
        how = "recorded" if recipe is recorded_recipe(module) else "given" if given else "inferred"
        raise UnsupportedObjectError(
            f"the recipe {how} for {type(module).__name__}, {describe_call(recipe)}, does not "
            f"rebuild it: {problem}. {_HOW_TO_FIX}"
        )
    return recipe


_HOW_TO_FIX = (
    "Build the model inside `with tk.capture():` so its arguments are recorded, or pass "
    "recipe=(ModelClass_or_factory, {arguments}) to save_model"
)


def _infer(module: nn.Module, depth: int) -> Recipe:
    if depth > MAX_DEPTH:
        raise UnsupportedObjectError("modules are nested too deeply to infer a recipe")
    cls = type(module)
    children = list(module.named_children())
    if isinstance(module, nn.Sequential) and cls is nn.Sequential:
        if [n for n, _ in children] == [str(i) for i in range(len(children))]:
            return Recipe(cls, tuple(_sub(m, depth) for _, m in children))
        return Recipe(cls, (OrderedDict((n, _sub(m, depth)) for n, m in children),))
    if cls is nn.ModuleList:
        return Recipe(cls, ([_sub(m, depth) for _, m in children],))
    if cls is nn.ModuleDict:
        return Recipe(cls, (OrderedDict((n, _sub(m, depth)) for n, m in children),))
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError) as e:
        raise UnsupportedObjectError(
            f"cannot read the constructor of {cls.__qualname__}: {e}. {_HOW_TO_FIX}"
        ) from e
    kwargs: dict[str, Any] = {}
    unknown: list[str] = []
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        found, value = _attribute(module, name, param.default)
        if found:
            if param.default is param.empty or not _same(value, param.default):
                kwargs[name] = _sub(value, depth) if isinstance(value, nn.Module) else value
        elif param.default is param.empty or (
            # A class of torch.nn keeps its configuration as attributes (the meta-device check
            # catches what it does not); elsewhere an argument that is not kept may have been
            # given a value other than its default, which would rebuild another model.
            name not in ("device", "dtype") and not cls.__module__.startswith("torch.nn.")
        ):
            unknown.append(name)
    if unknown:
        raise UnsupportedObjectError(
            f"cannot tell how {cls.__qualname__} was built: its constructor argument"
            f"{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} not kept on the module (as self.<name>). "
            + _HOW_TO_FIX
        )
    return Recipe(cls, (), kwargs)


def _sub(module: nn.Module, depth: int) -> Recipe:
    return recorded_recipe(module) or _infer(module, depth + 1)


def _attribute(module: nn.Module, name: str, default: Any) -> tuple[bool, Any]:
    """Find a constructor argument kept on the module under its name (or ``_name``)."""
    for attr in (name, f"_{name}"):
        if attr in module.__dict__:
            return True, module.__dict__[attr]
        if attr in module._modules:
            return True, module._modules[attr]
        if attr in module._parameters or attr in module._buffers:
            value = module._parameters.get(attr, module._buffers.get(attr))
            if isinstance(default, bool):  # bias=True: the layer keeps the tensor or None
                return True, value is not None
            return False, None
    return False, None


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # a comparison that fails means "not the same"
        return False


def check_rebuilds(recipe: Recipe, module: nn.Module) -> str | None:
    """Build ``recipe`` (on the meta device, or on the CPU if its constructor cannot run on
    the meta device); return what differs from ``module``, or None."""
    try:
        encode_recipe(recipe)
    except UnsupportedObjectError as e:
        return str(e)
    try:
        built = build_on_meta(recipe)
    except Exception as e:  # the constructor may raise anything
        return f"calling it raised {type(e).__name__}: {e}"
    if not isinstance(built, nn.Module):
        return f"it returned {type(built).__name__}, not a module"
    return structure_difference(built, module)


def build_on_meta(recipe: Recipe, *, cpu_fallback: bool = True) -> Any:
    """Call the recipe with tensors created on the meta device (no memory for weights); if the
    constructor cannot run there (it reads a tensor's values, say) and ``cpu_fallback``, call
    it on the CPU."""
    try:
        with torch.device("meta"):
            return recipe.build()
    except Exception as e:  # the constructor may raise anything: try it for real
        if not cpu_fallback:
            raise
        log.info("building %s on the meta device failed (%s); building it on the CPU", recipe, e)
        return recipe.build()


def structure(module: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """The module tree and every tensor's shape: what a recipe must reproduce."""
    items: list[tuple[str, str, tuple[int, ...]]] = [
        (name, "module " + qualified_name(type(m)), ()) for name, m in module.named_modules()
    ]
    for name, t in module.state_dict(keep_vars=True).items():
        items.append((name, "tensor", tuple(t.shape)))
    for name in non_persistent_buffers(module):
        buffer = module.get_buffer(name)
        items.append((name, "buffer", tuple(buffer.shape)))
    return items


def structure_difference(built: nn.Module, module: nn.Module) -> str | None:
    want, got = structure(module), structure(built)
    if want == got:
        return None
    for a, b in zip(want, got, strict=False):
        if a != b:
            return f"the saved module has {_item(a)} where the rebuilt one has {_item(b)}"
    longer, which = (want, "saved") if len(want) > len(got) else (got, "rebuilt")
    return f"only the {which} module has {_item(longer[min(len(want), len(got))])}"


def _item(item: tuple[str, str, tuple[int, ...]]) -> str:
    name, kind, shape = item
    return f"{name or '(root)'}: {kind}" + ("" if kind.startswith("module") else f" {list(shape)}")


def non_persistent_buffers(module: nn.Module) -> list[str]:
    """Names of buffers kept out of ``state_dict`` (``persistent=False``)."""
    names = []
    for prefix, m in module.named_modules():
        for name in m._non_persistent_buffers_set:
            if m._buffers.get(name) is not None:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def qualified_name(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def describe_call(recipe: Recipe) -> str:
    """``module.Class(arg=value, ...)`` for messages and ``torchkeep inspect``."""
    return describe_recipe_json(encode_recipe(recipe))


# ---------------------------------------------------------------------------------------------
# recipes as JSON


def encode_recipe(recipe: Recipe) -> dict[str, Any]:
    """Return the recipe as JSON; raise naming the argument that has no JSON form."""
    where = qualified_name(recipe.target) if hasattr(recipe.target, "__qualname__") else "?"
    return {
        "call": _reference(recipe.target, where=where),
        "args": [
            encode_value(v, f"{where} argument {i}", 0) for i, v in enumerate(recipe.args)
        ],
        "kwargs": {
            k: encode_value(v, f"{where} argument {k!r}", 0)
            for k, v in (recipe.kwargs or {}).items()
        },
    }


def _reference(obj: Any, *, where: str) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        raise UnsupportedObjectError(
            f"{where}: {obj!r} cannot be imported by name (define it at the top level of a "
            f"module). {_HOW_TO_FIX}"
        )
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        raise UnsupportedObjectError(
            f"{where}: {module}.{qualname} does not name {obj!r} (it was replaced or is not "
            f"importable). {_HOW_TO_FIX}"
        )
    return f"{module}:{qualname}"


def encode_value(value: Any, where: str, depth: int) -> Any:
    """Return ``value`` (an argument, a plain attribute) as JSON; raise naming ``where`` if it
    has no JSON form."""
    if depth > MAX_DEPTH:
        raise UnsupportedObjectError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {Tag.FLOAT: repr(float(value))}
    if isinstance(value, torch.dtype):
        return {Tag.DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {Tag.DEVICE: str(value)}
    if isinstance(value, Recipe):
        return {Tag.MODULE: encode_recipe(value)}
    if isinstance(value, nn.Module):
        return {Tag.MODULE: encode_recipe(_sub(value, depth))}
    if isinstance(value, tuple):  # torch.Size included
        return {Tag.TUPLE: [encode_value(v, where, depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where, depth + 1) for v in value]
    if isinstance(value, Mapping):
        tag = Tag.ODICT if isinstance(value, OrderedDict) else Tag.DICT
        items = value.items()
        return {
            tag: [
                [encode_value(k, where, depth + 1), encode_value(v, where, depth + 1)]
                for k, v in items
            ]
        }
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return {Tag.REF: _reference(value, where=where)}
    raise UnsupportedObjectError(
        f"{where} is a {type(value).__name__}, which has no JSON form (numbers, strings, "
        f"lists, dicts, dtypes, modules, classes and functions do). {_HOW_TO_FIX}"
    )
