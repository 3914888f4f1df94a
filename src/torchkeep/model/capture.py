"""A recipe, the call that builds a module, and recording recipes: inside ``with tk.capture():``
the outermost call that returned a module (a class or a factory such as
``resnet18(num_classes=10)``) is noted with its arguments, for ``save_model`` to store.
"""

from __future__ import annotations

import inspect
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# How deeply a recipe may nest (modules given as arguments to modules), written or read.
MAX_DEPTH = 64


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


def recorded_recipe(module: nn.Module) -> Recipe | None:
    """The recipe ``capture`` recorded for ``module``, if it did."""
    return _recorded.get(module)
