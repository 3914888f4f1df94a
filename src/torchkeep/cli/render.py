"""How the command line writes what it found: sizes in binary units, the description
``torchkeep inspect`` prints (the tensors, then a saved model's recipe, program and module tree)
and the table of ``torchkeep diff``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
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
        table.add_row(Text(t.name), t.dtype, str(list(t.shape)), human(t.nbytes))
    console.print(table)
    if len(shown) < len(info.tensors):
        console.print(f"… and {len(info.tensors) - len(shown)} more (--all to list every one)")
    if info.modules:
        print_parameters(console, info.modules, limit=None if everything else 12)
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


def print_parameters(console: Console, modules: dict[str, int], *, limit: int | None) -> None:
    """Parameters in all, then a table of each top-level module's count (``limit`` rows)."""
    console.print(f"parameters: {sum(modules.values()):,} in all")
    table = Table(show_edge=False)
    table.add_column("module")
    table.add_column("parameters", justify="right")
    rows = list(modules.items())
    for name, count in rows[:limit]:
        table.add_row(Text(name), f"{count:,}")
    console.print(table)
    if limit is not None and len(rows) > limit:
        console.print(f"… and {len(rows) - limit} more modules (--all to list every one)")


# A random generator state saved by tk.RNGState: the words of its Python part end so.
_RNG_ENTRY = re.compile(r"(?:(.*)\.)?python\.state\.\d+")
_INDEX = re.compile(r"(?:(.*)\.)?(\d+)")
_WHOLE = "(the saved object)"


def diff_rows(d: tk.Diff) -> tuple[list[tuple[str, str, str]], int]:
    """The rows of ``torchkeep diff``'s table (entry, change in markup, largest difference),
    and how many entries they fold into fewer rows: everything under a random generator state
    is one row, and so are the plain values (not tensors) of one list or tuple that were added,
    removed or changed."""
    plain = set(d.plain)
    entries = [(n, "added", "", n in plain) for n in d.added]
    entries += [(n, "removed", "", n in plain) for n in d.removed]
    for c in d.changed:  # a plain value's change reads "a → b"; a tensor's never does
        value = " → " in c.what and not c.what.startswith(("dtype ", "shape ", "type "))
        worst = "" if c.max_abs_diff is None else f"{c.max_abs_diff:.4g}"
        entries.append((c.name, c.what, worst, value and c.max_abs_diff is None))
    roots = {m.group(1) or "" for n, *_ in entries if (m := _RNG_ENTRY.fullmatch(n))}
    rng: dict[str, dict[str, int]] = {}  # each generator state: its entries by how they differ
    lists: dict[str, dict[str, int]] = {}  # each list: its plain values by how they differ
    single: dict[str, tuple[str, str, str]] = {}  # a list's only entry, shown as it is
    rows: list[tuple[str, str, str]] = []
    for name, what, worst, is_plain in entries:
        kind = what if what in ("added", "removed") else "changed"
        root = next((r for r in roots if not r or name.startswith(r + ".")), None)
        index = _INDEX.fullmatch(name)
        if root is not None:
            counts = rng.setdefault(root or _WHOLE, {})
        elif index is not None and is_plain:
            counts = lists.setdefault(index.group(1) or _WHOLE, {})
            single[index.group(1) or _WHOLE] = (name, _mark(what), worst)
        else:
            rows.append((name, _mark(what), worst))
            continue
        counts[kind] = counts.get(kind, 0) + 1
    folded = 0
    for groups, label in ((rng, "random generator state: {}"), (lists, "values {}")):
        for name, counts in groups.items():
            if groups is lists and sum(counts.values()) == 1:
                rows.append(single[name])
                continue
            told = ", ".join(f"{n} {kind}" for kind, n in counts.items())
            rows.append((name if groups is rng else f"{name}[…]", label.format(told), ""))
            folded += sum(counts.values())
    return sorted(rows, key=lambda r: _natural(r[0])), folded


def _natural(name: str) -> list[Any]:
    """Sort key: numbers in names in numeric order (2 before 10)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _mark(what: str) -> str:
    marks = {"added": "[green]added[/green]", "removed": "[red]removed[/red]"}
    return marks.get(what, escape(what))  # a value's text is not markup


def print_diff(console: Console, d: tk.Diff, *, limit: int) -> None:
    """The table of ``torchkeep diff`` (``limit`` rows), then the counts."""
    rows, folded = diff_rows(d)
    table = Table(show_edge=False)
    for column in ("entry", "change", "max |a-b|"):
        table.add_column(column)
    for name, what, worst in rows[:limit]:
        table.add_row(Text(name), what, worst)  # a name is shown as it is, never as markup
    console.print(table)
    if len(rows) > limit:
        console.print(f"… and {len(rows) - limit} more (--limit to show more)")
    if folded:
        console.print(
            f"({folded} entries of lists and random generator states are shown one row per "
            "list or state; --json lists every entry)"
        )
    console.print(
        f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, "
        f"{d.unchanged} unchanged"
    )
