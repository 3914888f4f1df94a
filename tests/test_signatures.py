"""What a user sees, as a snapshot: ``torchkeep.__all__`` and the signature of every name in it,
the public classes of the integrations, and the command line's commands, options and exit codes.

The expected snapshot is ``tests/snapshots/api.json`` (sorted keys, one signature a line), first
generated from commit 12bdb57, before modules were moved into packages. A failure prints a unified
diff of the snapshot: what the code has now (``+``) against what was recorded (``-``).

Regenerate the snapshot only for a deliberate API change, and review its diff::

    python tests/test_signatures.py           # print the diff against the snapshot (exit 1 if any)
    python tests/test_signatures.py --write   # rewrite tests/snapshots/api.json from the code

What is recorded, rendered so that moving code between modules changes nothing:

- functions: their signature, annotations as written (``from __future__ import annotations``
  makes them strings) with any qualified name of a name ``torchkeep`` exports reduced to the bare
  name (``torchkeep.container.SaveInfo``, ``container.SaveInfo`` → ``SaveInfo``);
- classes: their constructor's signature, their bases (a private torchkeep base is replaced by its
  own bases; a class torchkeep defines is named without its module), the public methods and
  properties defined by torchkeep (inherited ones from other packages are theirs), and for a
  dataclass its parameters and fields (type, default, ``kw_only``, ``init``);
- other values: their ``repr``, without memory addresses;
- the command line: the exit codes, ``main``'s signature, and every subcommand of
  ``torchkeep.cli.build_parser()`` with each option's strings, dest, action, default, nargs,
  choices, type, metavar and whether it is required or hidden.

The integrations are recorded and checked only where their frameworks (``lightning``,
``transformers``) are installed; the snapshot always holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "api.json"
PUBLIC = "torchkeep"
INTEGRATIONS = {
    "torchkeep.integrations.lightning": "lightning",
    "torchkeep.integrations.transformers": "transformers",
}
CLI = "torchkeep.cli"
# Dunder methods that are part of a class's behaviour (a context manager, a sized iterable, …).
PROTOCOL_METHODS = frozenset(
    {
        "__call__",
        "__contains__",
        "__enter__",
        "__exit__",
        "__getitem__",
        "__iter__",
        "__len__",
        "__next__",
    }
)
DATACLASS_PARAMS = ("init", "repr", "eq", "order", "unsafe_hash", "frozen")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_DOTTED = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


# --- rendering -------------------------------------------------------------------------------


def _exported() -> dict[str, Any]:
    tk = importlib.import_module(PUBLIC)
    return {name: getattr(tk, name) for name in tk.__all__}


def _torchkeep_modules() -> set[str]:
    """The last component of every loaded torchkeep module (``container``, ``io``, …): names an
    annotation may use for a module it imported."""
    names = {"torchkeep", "tk"}
    for name in list(sys.modules):
        if name == PUBLIC or name.startswith(PUBLIC + "."):
            names.add(name.rpartition(".")[2].lstrip("_"))
    return names


def _is_ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == PUBLIC or module.startswith(PUBLIC + ".")


def _normalise(text: str) -> str:
    """``text`` without memory addresses, and with a qualified name (``torchkeep.container.X``,
    ``container.X``, ``tk.X``) of a name ``torchkeep`` exports reduced to the name."""
    exported = _exported()
    modules = _torchkeep_modules()

    def bare(match: re.Match[str]) -> str:
        parts = match.group(0).split(".")
        if parts[-1] in exported and parts[0].lstrip("_") in modules:
            return parts[-1]
        if parts[0] == PUBLIC:  # a private torchkeep object: its module may change
            for cut in range(len(parts) - 1, 0, -1):
                if ".".join(parts[:cut]) in sys.modules:
                    return ".".join(parts[cut:])
        return match.group(0)

    return _DOTTED.sub(bare, _ADDRESS.sub("", text))


def _name_of(obj: Any) -> str:
    """A class or function: its public torchkeep name, its qualified name if torchkeep defines
    it, ``module.qualname`` otherwise (builtins by name)."""
    for name, value in _exported().items():
        if value is obj:
            return name
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qualname is None:
        return _normalise(repr(obj))
    module = getattr(obj, "__module__", None)
    if _is_ours(obj) or module in (None, "builtins"):
        return str(qualname)
    return f"{module}.{qualname}"


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return _normalise(annotation)
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return _name_of(annotation)
    return _normalise(inspect.formatannotation(annotation))


def _value(value: Any) -> str:
    if isinstance(value, type) or inspect.isroutine(value):
        return _name_of(value)
    return _normalise(repr(value))


class _Text(str):
    """A string whose ``repr`` is itself: how a rendered annotation or default goes into
    ``inspect.Signature``'s own formatting."""

    def __repr__(self) -> str:
        return str(self)


def _signature(obj: Any) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    parameters = [
        parameter.replace(
            annotation=(
                parameter.empty
                if parameter.annotation is parameter.empty
                else _Text(_annotation(parameter.annotation))
            ),
            default=(
                parameter.empty
                if parameter.default is parameter.empty
                else _Text(_value(parameter.default))
            ),
        )
        for parameter in signature.parameters.values()
    ]
    returns = signature.return_annotation
    return str(
        signature.replace(
            parameters=parameters,
            return_annotation=(
                signature.empty if returns is signature.empty else _Text(_annotation(returns))
            ),
        )
    )


def _bases(cls: type) -> list[str]:
    """``cls``'s bases, a private torchkeep base replaced by its own bases; a class and its
    standalone alias (``lightning_fabric``'s ``CheckpointIO`` beside ``lightning.fabric``'s,
    present only where ``pytorch_lightning`` is installed) count once."""
    found: list[type] = []

    def walk(bases: tuple[type, ...]) -> None:
        for base in bases:
            if _is_ours(base) and base.__name__.startswith("_"):
                walk(base.__bases__)
            elif base not in found:
                found.append(base)

    walk(cls.__bases__)
    names: list[str] = []
    seen: set[str] = set()
    for base in found:
        if base.__qualname__ in seen and not _is_ours(base):
            continue
        seen.add(base.__qualname__)
        names.append(_name_of(base))
    return names


def _member(raw: Any, cls: type, name: str) -> dict[str, Any]:
    if isinstance(raw, property):
        getter = raw.fget
        returns = inspect.signature(getter).return_annotation if getter else inspect.Parameter.empty
        return {
            "kind": "property" if raw.fset is None else "property (settable)",
            "type": None if returns is inspect.Parameter.empty else _annotation(returns),
        }
    if isinstance(raw, staticmethod):
        return {"kind": "staticmethod", "signature": _signature(raw.__func__)}
    if isinstance(raw, classmethod):
        return {"kind": "classmethod", "signature": _signature(getattr(cls, name))}
    if inspect.isroutine(raw):
        return {"kind": "method", "signature": _signature(raw)}
    if hasattr(raw, "__get__") and hasattr(raw, "func"):  # functools.cached_property
        returns = inspect.signature(raw.func).return_annotation
        return {
            "kind": "cached_property",
            "type": None if returns is inspect.Parameter.empty else _annotation(returns),
        }
    return {"kind": "attribute", "value": _value(raw)}


def _field(field: dataclasses.Field[Any]) -> str:
    text = f"{field.name}: {_annotation(field.type)}"
    if field.default is not dataclasses.MISSING:
        text += f" = {_value(field.default)}"
    elif field.default_factory is not dataclasses.MISSING:
        text += f" = <factory {_value(field.default_factory)}>"
    flags = [flag for flag in ("kw_only",) if getattr(field, flag, False) is True]
    if not field.init:
        flags.append("init=False")
    return text + (f"  [{', '.join(flags)}]" if flags else "")


def _class(cls: type) -> dict[str, Any]:
    is_protocol = bool(getattr(cls, "_is_protocol", False))
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    snapshot: dict[str, Any] = {
        "kind": "exception" if issubclass(cls, BaseException) else "class",
        "bases": _bases(cls),
    }
    if is_protocol:
        snapshot["kind"] = "protocol"
        snapshot["runtime_checkable"] = bool(getattr(cls, "_is_runtime_protocol", False))
    elif (constructor := _signature(cls)) is not None:  # none for a builtin's (exceptions)
        snapshot["constructor"] = constructor
    members: dict[str, Any] = {}
    for name in dir(cls):
        if name in fields or (name.startswith("_") and name not in PROTOCOL_METHODS):
            continue
        owner = next((c for c in cls.__mro__ if name in vars(c)), None)
        if owner is None or not _is_ours(owner):
            continue  # object's, or a base's from another package
        members[name] = _member(vars(owner)[name], cls, name)
    snapshot["members"] = members
    if dataclasses.is_dataclass(cls):
        params = getattr(cls, "__dataclass_params__")  # noqa: B009  (not in type stubs)
        snapshot["dataclass"] = {p: getattr(params, p) for p in DATACLASS_PARAMS}
        snapshot["fields"] = [_field(f) for f in dataclasses.fields(cls)]
    return snapshot


def _object(obj: Any) -> dict[str, Any]:
    if isinstance(obj, type):
        return _class(obj)
    if inspect.isroutine(obj):
        return {"kind": "function", "signature": _signature(obj)}
    return {"kind": "value", "type": _name_of(type(obj)), "value": _value(obj)}


def module_snapshot(name: str) -> dict[str, Any]:
    """``__all__`` of module ``name`` and every name in it."""
    module = importlib.import_module(name)
    public = sorted(module.__all__)
    return {"__all__": public, "names": {n: _object(getattr(module, n)) for n in public}}


# --- the command line ------------------------------------------------------------------------


def _action_names(parser: argparse.ArgumentParser) -> dict[type, str]:
    registry: dict[Any, Any] = parser._registries["action"]
    return {cls: str(key) for key, cls in registry.items() if isinstance(cls, type)}


def _option(action: argparse.Action, names: dict[type, str]) -> str:
    """One line: the option's strings (a positional's dest), then its settings."""
    choices = None if action.choices is None else [_value(c) for c in action.choices]
    settings = {
        "dest": action.dest,
        "action": names.get(type(action), type(action).__name__),
        "nargs": repr(action.nargs),
        "default": _value(action.default),
        "type": None if action.type is None else _value(action.type),
        "choices": None if choices is None else f"[{', '.join(choices)}]",
        "required": action.required,
        "metavar": repr(action.metavar),
    }
    name = ", ".join(action.option_strings) or f"<{action.dest}>"
    hidden = " (hidden)" if action.help == argparse.SUPPRESS else ""
    return f"{name}{hidden}: " + " ".join(f"{k}={v}" for k, v in settings.items())


def _parser(parser: argparse.ArgumentParser) -> dict[str, Any]:
    names = _action_names(parser)
    options: list[str] = []
    commands: dict[str, Any] = {}
    snapshot: dict[str, Any] = {"prog": parser.prog, "options": options}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            snapshot["subcommands"] = {
                "dest": action.dest,
                "required": action.required,
                "metavar": action.metavar,
                "commands": commands,
            }
            for command, sub in action.choices.items():
                commands[command] = _parser(sub)
        else:
            options.append(_option(action, names))
    groups = [
        sorted(a.dest for a in group._group_actions) for group in parser._mutually_exclusive_groups
    ]
    if groups:
        snapshot["mutually_exclusive"] = groups
    defaults = {k: _value(v) for k, v in parser._defaults.items() if k != "func"}
    if defaults:
        snapshot["defaults"] = defaults
    snapshot["sets_func"] = "func" in parser._defaults
    return snapshot


def cli_snapshot() -> dict[str, Any]:
    cli = importlib.import_module(CLI)
    entry_point = "resolves" if callable(getattr(cli, "_run", None)) else "is missing"
    return {
        "exit_codes": {name: getattr(cli, name, None) for name in ("OK", "PROBLEM", "USAGE")},
        "main": _signature(cli.main),
        "console_script": f"torchkeep.cli:_run {entry_point}",
        "parser": _parser(cli.build_parser()),
    }


# --- the snapshot ----------------------------------------------------------------------------


def _available(framework: str) -> bool:
    try:
        return importlib.util.find_spec(framework) is not None
    except ValueError:
        return False


def snapshot(sections: list[str] | None = None) -> dict[str, Any]:
    """The sections asked for (all by default, the integrations where their frameworks are
    installed), as the snapshot file holds them."""
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        PUBLIC: lambda: module_snapshot(PUBLIC),
        CLI: cli_snapshot,
    }
    for module, framework in INTEGRATIONS.items():
        if _available(framework):
            builders[module] = lambda module=module: module_snapshot(module)
    wanted = list(builders) if sections is None else sections
    return {name: builders[name]() for name in wanted}


def render(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    return loaded


def difference(section: str, recorded: Any, actual: Any) -> str:
    return "".join(
        difflib.unified_diff(
            render(recorded).splitlines(keepends=True),
            render(actual).splitlines(keepends=True),
            fromfile=f"{SNAPSHOT.name} [{section}] (recorded)",
            tofile=f"{section} (the code now)",
        )
    )


def check(section: str) -> None:
    recorded = expected().get(section)
    actual = snapshot([section])[section]
    if recorded != actual:
        pytest.fail(
            f"the public API of {section} differs from {SNAPSHOT}; if the change is deliberate,"
            " regenerate it with `python tests/test_signatures.py --write`:\n"
            + difference(section, recorded, actual),
            pytrace=False,
        )


# --- the tests -------------------------------------------------------------------------------


def test_snapshot_has_every_section() -> None:
    assert sorted(expected()) == sorted([PUBLIC, CLI, *INTEGRATIONS])


def test_public_api() -> None:
    check(PUBLIC)


def test_lightning_integration() -> None:
    pytest.importorskip("lightning")
    check("torchkeep.integrations.lightning")


def test_transformers_integration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # before transformers is imported: no download
    pytest.importorskip("transformers")
    check("torchkeep.integrations.transformers")


def test_command_line() -> None:
    check(CLI)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare the public API with tests/snapshots/api.json, or (--write) rewrite "
        "it: regenerate only for a deliberate API change."
    )
    parser.add_argument("--write", action="store_true", help="rewrite the snapshot from the code")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no download
    tk = importlib.import_module(PUBLIC)
    print(f"torchkeep from {Path(tk.__file__ or '?').parent}", file=sys.stderr)
    missing = [f for f in INTEGRATIONS.values() if not _available(f)]
    if args.write:
        if missing:
            print(f"not written: {', '.join(missing)} not installed", file=sys.stderr)
            return 2
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(render(snapshot()), encoding="utf-8")
        print(f"wrote {SNAPSHOT}", file=sys.stderr)
        return 0
    recorded = expected()
    actual = snapshot()
    differences = [
        difference(s, recorded.get(s), actual[s]) for s in actual if recorded.get(s) != actual[s]
    ]
    sys.stdout.write("".join(differences))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(_main())
