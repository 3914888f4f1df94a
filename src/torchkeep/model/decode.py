"""Stored recipes read back: decoded into a call under ``Trust`` (what a file may make torchkeep
import and call), shown as a call, and the modules they name.

Rebuilding never imports a module the caller has not imported or allowed, and calls only module
classes, and functions declared to return a module (``-> nn.Module``) or found in modules the
caller allowed.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedObjectError
from torchkeep.format import Tag
from torchkeep.model.capture import MAX_DEPTH, Recipe


@dataclass(frozen=True)
class Trust:
    """What a file may make torchkeep import and call."""

    allowed_modules: tuple[str, ...] = ()
    trust_code: bool = False

    def allows(self, module: str) -> bool:
        return self.trust_code or any(
            module == m or module.startswith(m + ".") for m in self.allowed_modules
        )


def decode_recipe(recipe: Any, trust: Trust, *, where: str, depth: int = 0) -> Recipe:
    """Turn a stored recipe back into a call, resolving every name it holds under ``trust``."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: the model recipe is nested too deeply")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("call"), str):
        raise CorruptCheckpointError(f"{where}: the model recipe is malformed")
    args, kwargs = recipe.get("args", []), recipe.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CorruptCheckpointError(f"{where}: the model recipe's arguments are malformed")
    target = resolve(recipe["call"], trust, where=where, call=True)
    return Recipe(
        target,
        tuple(decode_value(v, trust, where, depth + 1) for v in args),
        {str(k): decode_value(v, trust, where, depth + 1) for k, v in kwargs.items()},
    )


def decode_value(value: Any, trust: Trust, where: str, depth: int) -> Any:
    """Turn a value ``encode_value`` stored (an argument, a plain attribute) back, under
    ``trust``."""
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: the model recipe is nested too deeply")
    if isinstance(value, list):
        return [decode_value(v, trust, where, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise CorruptCheckpointError(f"{where}: the model recipe holds a malformed value")
    ((tag, inner),) = value.items()
    if tag == Tag.FLOAT and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == Tag.DTYPE:
        dtype = getattr(torch, str(inner), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if tag == Tag.DEVICE and isinstance(inner, str):
        # The model is built on the meta device and takes the loaded tensors: a device given
        # to its constructor must not make it allocate real memory.
        return torch.device("meta")
    if tag == Tag.TUPLE and isinstance(inner, list):
        return tuple(decode_value(v, trust, where, depth + 1) for v in inner)
    if tag in (Tag.DICT, Tag.ODICT) and isinstance(inner, list):
        pairs = []
        for pair in inner:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError(f"{where}: the model recipe holds a malformed dict")
            key = decode_value(pair[0], trust, where, depth + 1)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CorruptCheckpointError(
                    f"{where}: the model recipe holds a dict key that is not a plain value"
                )
            pairs.append((key, decode_value(pair[1], trust, where, depth + 1)))
        return OrderedDict(pairs) if tag == Tag.ODICT else dict(pairs)
    if tag == Tag.REF and isinstance(inner, str):
        return resolve(inner, trust, where=where, call=False)
    if tag == Tag.MODULE:
        return decode_recipe(inner, trust, where=where, depth=depth + 1)
    raise CorruptCheckpointError(f"{where}: the model recipe holds an unknown value {tag!r}")


def resolve(name: str, trust: Trust, *, where: str, call: bool) -> Any:
    """Return the class or function ``module:qualname`` names, if ``trust`` allows it.

    Without trust, a module must already be imported; module classes may then be used, other
    names only from modules in ``allowed_modules`` (and, for the call itself, functions declared
    to return a module).
    """
    module_name, _, qualname = name.partition(":")
    parts = qualname.split(".")
    if (
        not module_name
        or not qualname
        or not all(p.isidentifier() for p in module_name.split("."))
        or any(not p.isidentifier() or p.startswith("__") for p in parts)
    ):
        raise CorruptCheckpointError(f"{where}: the model recipe names {name!r}, not a class")
    shown = f"{module_name}.{qualname}"
    module = sys.modules.get(module_name)
    if module is None:
        if not trust.allows(module_name):
            raise UnsafeFileError(
                f"{where}: rebuilding the model needs {shown} from the module '{module_name}', "
                "which is not imported; importing it would run its code. Import it yourself "
                f"if you trust it, or pass allowed_modules=['{module_name}'] (or trust_code=True)"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UnsupportedObjectError(
                f"{where}: rebuilding the model needs {shown}, but '{module_name}' cannot be "
                f"imported here ({e}). Install it, or load the exported program instead"
            ) from e
    found: Any = module
    for part in parts:
        found = getattr(found, part, None)
    if found is None:
        raise UnsupportedObjectError(
            f"{where}: rebuilding the model needs {shown}, which '{module_name}' does not define "
            "(the code changed since the save?)"
        )
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found
    if trust.allows(module_name):
        return found
    if not call and module_name == "torch.nn.functional" and inspect.isfunction(found):
        return found
    raise UnsafeFileError(
        f"{where}: the model recipe {'calls' if call else 'names'} {shown}, which is not a "
        "module class; a file could name any function there, and calling it could run "
        f"anything. If you trust the file (a factory of yours, say), pass "
        f"allowed_modules=['{module_name}'] (or trust_code=True)"
    )


def recipe_modules(recipe: Any) -> Iterable[str]:
    """Every module a stored recipe names (for messages and ``torchkeep inspect``)."""
    if isinstance(recipe, dict):
        for key, value in recipe.items():
            if key in ("call", Tag.REF) and isinstance(value, str):
                yield value.partition(":")[0]
            else:
                yield from recipe_modules(value)
    elif isinstance(recipe, list):
        for value in recipe:
            yield from recipe_modules(value)


def describe_recipe_json(recipe: Mapping[str, Any]) -> str:
    call = str(recipe.get("call", "?")).replace(":", ".")
    parts = [_show(a) for a in recipe.get("args", [])]
    parts += [f"{k}={_show(v)}" for k, v in dict(recipe.get("kwargs", {})).items()]
    return f"{call}({', '.join(parts)})"


def _show(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == Tag.MODULE:
            return describe_recipe_json(inner)
        if tag == Tag.REF:
            return str(inner).replace(":", ".")
        if tag == Tag.TUPLE:
            return "(" + ", ".join(_show(v) for v in inner) + ("," if len(inner) == 1 else "") + ")"
        if tag in (Tag.DTYPE, Tag.DEVICE, Tag.FLOAT):
            return str(inner)
        if tag in (Tag.DICT, Tag.ODICT):
            return "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in inner) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)
