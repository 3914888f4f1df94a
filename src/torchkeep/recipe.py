"""How to rebuild a module without pickle: the importable class or factory function that built it
and its arguments, as JSON.

A recipe is found three ways, in this order:

* recorded: the module was built inside ``with tk.capture():``, which notes the outermost call
  that returned it (a class or a factory such as ``resnet18(num_classes=10)``) and its arguments;
* given: ``save_model(model, path, recipe=(factory, {"num_classes": 10}))``;
* inferred: the class's constructor arguments read back from the module (containers from their
  children; other arguments from attributes of the same name, as ``torch.nn`` layers keep them).

A recipe is only kept when building it on the meta device gives the same module tree and tensor
shapes as the module being saved. Rebuilding never imports a module the caller has not imported
or allowed, and calls only module classes, and functions declared to return a module (``->
nn.Module``) or found in modules the caller allowed.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError, UnsafeFileError, UnsupportedObjectError

log = logging.getLogger(__name__)

_MAX_DEPTH = 64


@dataclass(frozen=True)
class Recipe:
    """A call that builds a module: ``target(*args, **kwargs)``."""

    target: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] | None = None

    def build(self) -> Any:
        """Call it; argument recipes (sub-modules) are built first."""
        args = [_built(a) for a in self.args]
        kwargs = {k: _built(v) for k, v in (self.kwargs or {}).items()}
        return self.target(*args, **kwargs)


def _built(value: Any) -> Any:
    if isinstance(value, Recipe):
        return value.build()
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_built(v) for v in value)
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _built(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _built(v) for k, v in value.items()}
    return value


_recorded: weakref.WeakKeyDictionary[nn.Module, Recipe] = weakref.WeakKeyDictionary()


class capture:  # lower case: used like torch.no_grad
    """Record how the modules built inside the block were called, so that ``save_model`` can
    store a recipe for them without a config.

    Only calls made directly in the block are recorded (the outermost call that returned a
    module), in the calling thread.

    Example:
        ```python
        with tk.capture():
            model = resnet18(num_classes=10)    # or Net(hidden=128)
        tk.save_model(model, "model")
        ```
    """

    def __enter__(self) -> capture:
        self._caller = sys._getframe(1)
        self._previous = sys.getprofile()
        self._pending: dict[types.FrameType, dict[str, Any]] = {}
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self._previous)
        self._pending.clear()

    def _profile(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if self._previous is not None:  # a profiler already running keeps seeing every event
            self._previous(frame, event, arg)  # type: ignore[arg-type]
        if event == "call" and frame.f_back is self._caller:
            self._pending[frame] = _arguments(frame)
        elif event == "return" and frame in self._pending:
            arguments = self._pending.pop(frame)
            code = frame.f_code
            if code.co_name == "__init__" and isinstance(arguments.get("self"), nn.Module):
                module = arguments.pop("self")
                _record(module, type(module), arguments)
            elif isinstance(arg, nn.Module):
                function = _function_of(frame)
                if function is not None:
                    _record(arg, function, arguments)


def _arguments(frame: types.FrameType) -> dict[str, Any]:
    info = inspect.getargvalues(frame)
    values = {name: info.locals[name] for name in info.args}
    if info.varargs:
        values["*"] = tuple(info.locals[info.varargs])
    if info.keywords:
        values["**"] = dict(info.locals[info.keywords])
    return values


def _function_of(frame: types.FrameType) -> Callable[..., Any] | None:
    code = frame.f_code
    found = frame.f_globals.get(code.co_name)
    return found if getattr(found, "__code__", None) is code else None


def _record(module: nn.Module, target: Callable[..., Any], arguments: dict[str, Any]) -> None:
    args = arguments.pop("*", ())
    kwargs = arguments.pop("**", {})
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    positional: list[Any] = []
    named: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if name not in arguments:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            positional.append(arguments[name])
        elif param.default is param.empty or arguments[name] is not param.default:
            named[name] = arguments[name]
    if args:  # *args follow the named positional parameters: pass all of them by position
        order = [n for n, p in signature.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        positional += [arguments[n] for n in order if n in arguments]
        named = {k: v for k, v in named.items() if k not in order}
        positional += list(args)
    _recorded[module] = Recipe(target, tuple(positional), {**named, **kwargs})


# ---------------------------------------------------------------------------------------------
# finding a recipe


def recipe_for(module: nn.Module, given: Recipe | None = None) -> Recipe:
    """Return the recipe that rebuilds ``module``: given, recorded or inferred, and checked.

    Raises:
        UnsupportedObjectError: no recipe rebuilds it; the message says what is missing and how
            to provide it.
    """
    recipe = given or _recorded.get(module) or _infer(module, depth=0)
    problem = check_rebuilds(recipe, module)
    if problem:
        how = "recorded" if recipe is _recorded.get(module) else "given" if given else "inferred"
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
    if depth > _MAX_DEPTH:
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
    return _recorded.get(module) or _infer(module, depth + 1)


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


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        return all(_plain(v) for v in value)
    return False


def plain_attributes(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's plain attributes (numbers, strings, None and short tuples or lists of
    them, as JSON), by module path: what a constructor may have derived from its arguments and
    a recipe may not reproduce (``self.scale = 1 / temperature``)."""
    found: dict[str, dict[str, Any]] = {}
    for prefix, m in module.named_modules():
        values = {
            name: _encode(value, f"{prefix or '(root)'}.{name}", 0)
            for name, value in vars(m).items()
            if not name.startswith("_") and name != "training" and _plain(value)
        }
        if values:
            found[prefix] = values
    return found


def restore_attributes(module: nn.Module, saved: Any, *, where: str) -> None:
    """Set the plain attributes saved by ``plain_attributes`` on a rebuilt module; only
    attributes the rebuilt module has as plain values are set."""
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{where}: the model's saved attributes are malformed")
    modules = dict(module.named_modules())
    for prefix, values in saved.items():
        owner = modules.get(prefix)
        if owner is None or not isinstance(values, dict):
            raise CorruptCheckpointError(
                f"{where}: saved attributes for '{prefix}', which the rebuilt model lacks"
            )
        for name, encoded in values.items():
            if not _plain(vars(owner).get(name, object())):
                continue  # not a plain attribute of this class: never set from a file
            value = _decode(encoded, Trust(), where, 0)
            if not _plain(value):
                raise CorruptCheckpointError(
                    f"{where}: saved attribute {prefix}.{name} is malformed"
                )
            setattr(owner, name, value)


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


def describe_recipe_json(recipe: Mapping[str, Any]) -> str:
    call = str(recipe.get("call", "?")).replace(":", ".")
    parts = [_show(a) for a in recipe.get("args", [])]
    parts += [f"{k}={_show(v)}" for k, v in dict(recipe.get("kwargs", {})).items()]
    return f"{call}({', '.join(parts)})"


def _show(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$module":
            return describe_recipe_json(inner)
        if tag == "$ref":
            return str(inner).replace(":", ".")
        if tag == "$tuple":
            return "(" + ", ".join(_show(v) for v in inner) + ("," if len(inner) == 1 else "") + ")"
        if tag in ("$dtype", "$device", "$float"):
            return str(inner)
        if tag in ("$dict", "$odict"):
            return "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in inner) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


# ---------------------------------------------------------------------------------------------
# recipes as JSON


def encode_recipe(recipe: Recipe) -> dict[str, Any]:
    """Return the recipe as JSON; raise naming the argument that has no JSON form."""
    where = qualified_name(recipe.target) if hasattr(recipe.target, "__qualname__") else "?"
    return {
        "call": _reference(recipe.target, where=where),
        "args": [_encode(v, f"{where} argument {i}", 0) for i, v in enumerate(recipe.args)],
        "kwargs": {
            k: _encode(v, f"{where} argument {k!r}", 0) for k, v in (recipe.kwargs or {}).items()
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


def _encode(value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise UnsupportedObjectError(f"{where}: nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, Recipe):
        return {"$module": encode_recipe(value)}
    if isinstance(value, nn.Module):
        return {"$module": encode_recipe(_sub(value, depth))}
    if isinstance(value, tuple):  # torch.Size included
        return {"$tuple": [_encode(v, where, depth + 1) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where, depth + 1) for v in value]
    if isinstance(value, Mapping):
        tag = "$odict" if isinstance(value, OrderedDict) else "$dict"
        items = value.items()
        return {
            tag: [[_encode(k, where, depth + 1), _encode(v, where, depth + 1)] for k, v in items]
        }
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return {"$ref": _reference(value, where=where)}
    raise UnsupportedObjectError(
        f"{where} is a {type(value).__name__}, which has no JSON form (numbers, strings, "
        f"lists, dicts, dtypes, modules, classes and functions do). {_HOW_TO_FIX}"
    )


# ---------------------------------------------------------------------------------------------
# rebuilding


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
    if depth > _MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: the model recipe is nested too deeply")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("call"), str):
        raise CorruptCheckpointError(f"{where}: the model recipe is malformed")
    args, kwargs = recipe.get("args", []), recipe.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CorruptCheckpointError(f"{where}: the model recipe's arguments are malformed")
    target = resolve(recipe["call"], trust, where=where, call=True)
    return Recipe(
        target,
        tuple(_decode(v, trust, where, depth + 1) for v in args),
        {str(k): _decode(v, trust, where, depth + 1) for k, v in kwargs.items()},
    )


def _decode(value: Any, trust: Trust, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise CorruptCheckpointError(f"{where}: the model recipe is nested too deeply")
    if isinstance(value, list):
        return [_decode(v, trust, where, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise CorruptCheckpointError(f"{where}: the model recipe holds a malformed value")
    ((tag, inner),) = value.items()
    if tag == "$float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "$dtype":
        dtype = getattr(torch, str(inner), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if tag == "$device" and isinstance(inner, str):
        # The model is built on the meta device and takes the loaded tensors: a device given
        # to its constructor must not make it allocate real memory.
        return torch.device("meta")
    if tag == "$tuple" and isinstance(inner, list):
        return tuple(_decode(v, trust, where, depth + 1) for v in inner)
    if tag in ("$dict", "$odict") and isinstance(inner, list):
        pairs = []
        for pair in inner:
            if not isinstance(pair, list) or len(pair) != 2:
                raise CorruptCheckpointError(f"{where}: the model recipe holds a malformed dict")
            key = _decode(pair[0], trust, where, depth + 1)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CorruptCheckpointError(
                    f"{where}: the model recipe holds a dict key that is not a plain value"
                )
            pairs.append((key, _decode(pair[1], trust, where, depth + 1)))
        return OrderedDict(pairs) if tag == "$odict" else dict(pairs)
    if tag == "$ref" and isinstance(inner, str):
        return resolve(inner, trust, where=where, call=False)
    if tag == "$module":
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
            if key in ("call", "$ref") and isinstance(value, str):
                yield value.partition(":")[0]
            else:
                yield from recipe_modules(value)
    elif isinstance(recipe, list):
        for value in recipe:
            yield from recipe_modules(value)
