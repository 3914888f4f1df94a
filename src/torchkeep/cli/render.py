"""How the command line writes what it found: sizes in binary units, and the description
``torchkeep inspect`` prints (the tensors, then a saved model's recipe, program and module tree).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

import torchkeep as tk


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def print_description(
    console: Console, info: tk.Description, *, limit: int, everything: bool
) -> None:
    """What ``inspect`` prints of ``info``: ``limit`` tensors, or ``everything``."""
    console.print(
        f"[bold]{info.path}[/bold]  ({info.format}{', ' + info.kind if info.kind else ''})"
    )
    if info.format_version is not None:
        console.print(
            f"format version {info.format_version}, written {info.created} by torchkeep "
            f"{info.torchkeep_version} with torch {info.torch_version}"
        )
    console.print(
        f"{len(info.tensors)} tensors, {human(info.tensor_bytes)} of data, "
        f"{human(info.file_bytes)} on disk; checksums: {'yes' if info.checksummed else 'no'}"
    )
    table = Table(show_edge=False)
    for column in ("tensor", "dtype", "shape", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    shown = info.tensors if everything else info.tensors[:limit]
    for t in shown:
        table.add_row(t.name, t.dtype, str(list(t.shape)), human(t.nbytes))
    console.print(table)
    if len(shown) < len(info.tensors):
        console.print(f"… and {len(info.tensors) - len(shown)} more (--all to list every one)")
    if info.modules:
        parts = [f"{name} {count:,}" for name, count in list(info.modules.items())[:12]]
        more = f", … ({len(info.modules)} in all)" if len(info.modules) > 12 else ""
        console.print(f"parameters: {sum(info.modules.values()):,} ({', '.join(parts)}{more})")
    if info.optimizer:
        console.print(info.optimizer, markup=False)
    if info.model:
        print_model(console, info.model, info.file_bytes, everything=everything)
    if info.aliases:
        console.print("tied: " + ", ".join(f"{a} = {t}" for a, t in info.aliases.items()))
    if info.metadata:
        console.print("metadata: " + json.dumps(info.metadata))


def print_model(
    console: Console, model: dict[str, Any], file_bytes: int, *, everything: bool
) -> None:
    """A saved model: how it can be rebuilt, what a conversion changed, its module tree."""
    console.print(f"model: {model.get('class', '?').replace(':', '.')}", markup=False)
    if model.get("recipe"):
        modules = ", ".join(model.get("recipe_modules") or [])
        console.print(f"  rebuilt by: {model['recipe']}", markup=False)
        console.print(f"  (needs the code of: {modules})", markup=False)
    else:
        console.print(f"  no recipe: {model.get('recipe_problem')}", markup=False)
    program = model.get("program")
    if program:
        inputs = ", ".join(
            "["
            + ", ".join("batch" if d is None else str(d) for d in spec["shape"])
            + "] "
            + str(spec["dtype"])
            for spec in program.get("inputs", [])
        )
        console.print(
            f"  exported program: {program.get('file')}, runs with no code; inputs {inputs}",
            markup=False,
        )
    else:
        console.print("  no exported program (save with example_inputs= to store one)")
    converted = model.get("converted")
    if converted:
        console.print(
            f"  converted to {converted.get('dtype')} from {converted.get('source')}: "
            f"{human(converted.get('source_bytes', 0))} → {human(file_bytes)}; "
            f"output difference: {converted.get('output_difference')}",
            markup=False,
        )
    architecture = model.get("architecture")
    if isinstance(architecture, dict):
        tree = Tree(_module_label("", architecture))
        _add_children(tree, architecture, depth=1, limit=None if everything else 3)
        console.print(tree)


def _module_label(name: str, node: dict[str, Any]) -> str:
    kind = str(node.get("type", "?")).rpartition(":")[2]
    label = f"{name}: {kind}" if name else kind
    return f"{escape(label)} [dim]{node.get('parameters', 0):,} parameters[/dim]"


def _add_children(tree: Tree, node: dict[str, Any], *, depth: int, limit: int | None) -> None:
    children = node.get("children") or {}
    if limit is not None and depth > limit and children:
        tree.add(f"[dim]… {len(children)} children (--all to show)[/dim]")
        return
    for name, child in children.items():
        if isinstance(child, dict):
            branch = tree.add(_module_label(name, child))
            _add_children(branch, child, depth=depth + 1, limit=limit)
