"""The shape of the code: layers in data-flow order, imports that only go down, no cycles.

Every module under src/torchkeep is parsed with `ast` (nothing is imported), and each
`import`/`from … import` of torchkeep, at module level or inside a function, is checked:

- a module may import only its own layer or a lower one (ARCHITECTURE.md's table, below);
- the import graph has no cycle (a lazy import inside a function counts: it only hides one);
- no module imports another module's underscore name (`from torchkeep.x import _name`).

There is no exception to these. `LONG` lists the modules still over the size limit; it may
only shrink (a listed module that is no longer long fails the test too, so the list stays true).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The layer of each module, by the longest matching dotted prefix (ARCHITECTURE.md).
LAYERS: dict[str, int] = {
    "torchkeep.errors": 0,
    "torchkeep._version": 0,
    "torchkeep._types": 0,
    "torchkeep._optional": 0,
    "torchkeep.storage": 1,
    "torchkeep.io": 2,
    "torchkeep.format": 3,
    "torchkeep.container": 4,
    "torchkeep.tree": 5,
    "torchkeep.retention": 5,
    "torchkeep.sampler": 5,
    "torchkeep.legacy": 6,
    "torchkeep.distributed": 7,
    "torchkeep.weights": 8,
    "torchkeep.checkpoint": 8,
    "torchkeep.model": 8,
    "torchkeep.manager": 8,
    "torchkeep.inspection": 8,
    "torchkeep.inspect": 8,
    "torchkeep.diff": 8,
    "torchkeep.convert": 8,
    "torchkeep.cli": 9,
    "torchkeep.demo": 9,
    "torchkeep.bench": 9,
    "torchkeep.testing": 9,
    "torchkeep.integrations": 9,
    "torchkeep.__main__": 9,
    # The package root only re-exports the public API: above everything but the front ends.
    "torchkeep": 8,
}
FRONT_ENDS = (
    "torchkeep.cli",
    "torchkeep.demo",
    "torchkeep.bench",
    "torchkeep.testing",
    "torchkeep.integrations",
    "torchkeep.__main__",
)

# Modules still over the size limit; the list may only shrink.
LONG: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    """The layer of `module`; a module the table does not place (other than the root) has none."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best] if best != "torchkeep" or module == "torchkeep" else None


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "torchkeep").rglob("*.py"))}


def _imports() -> dict[str, list[tuple[str, str, int]]]:
    """Each module's imports of torchkeep: (imported module, imported name or '', line)."""
    modules = _modules()
    found: dict[str, list[tuple[str, str, int]]] = {}
    for module, path in modules.items():
        edges: list[tuple[str, str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [
                    (a.name, "", node.lineno)
                    for a in node.names
                    if a.name.split(".")[0] == "torchkeep"
                ]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", node)
                if target.split(".")[0] != "torchkeep":
                    continue
                for alias in node.names:
                    # `from torchkeep import distributed` imports a module, not a name.
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        edges.append((sub, "", node.lineno))
                    else:
                        edges.append((target, alias.name, node.lineno))
        found[module] = edges
    return found


def _breaches() -> set[str]:
    breaches: set[str] = set()
    imports = _imports()
    for module, edges in imports.items():
        for target, name, _line in edges:
            if target == module:
                continue
            if (_layer(target) or 0) > (_layer(module) or 0):
                breaches.add(f"up: {module} -> {target}")
            if target.startswith(FRONT_ENDS) and not module.startswith(FRONT_ENDS):
                breaches.add(f"front end: {module} -> {target}")
            if name.startswith("_") and not name.startswith("__"):
                breaches.add(f"private: {module} -> {target}.{name}")
    for cycle in _cycles(
        {m: {t for t, _, _ in e if t != m and t in imports} for m, e in imports.items()}
    ):
        breaches.add("cycle among: " + ", ".join(cycle))
    return breaches


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        assert _layer(module) is not None, module


def test_imports_only_go_down_without_cycles_or_private_names() -> None:
    breaches = sorted(_breaches())
    assert not breaches, "imports that break the layers (ARCHITECTURE.md):\n" + "\n".join(breaches)


MAX_LINES = 520  # ARCHITECTURE.md: "no module over ~500 lines"


def test_no_module_is_two_ideas_long() -> None:
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    long = {m: n for m, n in long.items() if n > MAX_LINES}
    assert not set(long) - LONG, f"modules over {MAX_LINES} lines: {sorted(set(long) - LONG)}"
    assert not LONG - set(long), f"no longer long, remove from LONG: {sorted(LONG - set(long))}"


def test_the_checker_sees_a_breach() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _layer("torchkeep.storage.local") == 1
    assert _layer("torchkeep.format.names") == 3
    assert _layer("torchkeep.integrations.lightning") == 9


def _documented_tree() -> set[str]:
    """The modules the architecture page's tree names, as paths under src/torchkeep."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    block = page.split("## The tree", 1)[1].split("```", 2)[1]
    paths: set[str] = set()
    parents: list[str] = []
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        if depth < 0:
            continue  # the package itself
        parents = parents[:depth]
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
            paths.add("/".join([*parents, "__init__.py"]))
        else:
            paths.add("/".join([*parents, name]))
    return paths


def test_the_architecture_page_shows_the_tree_as_built() -> None:
    built = {str(p.relative_to(SRC / "torchkeep")) for p in (SRC / "torchkeep").rglob("*.py")}
    built -= {"__init__.py"}
    documented = _documented_tree()
    assert built == documented, (
        f"docs/architecture.md: missing {sorted(built - documented)}, "
        f"gone {sorted(documented - built)}"
    )


def tree_text() -> str:
    """The tree for docs/architecture.md: each module with its docstring's first sentence."""
    lines = ["torchkeep/"]

    def first(path: Path) -> str:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        text = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")
        text = re.split(r"\.(?:\s|$)", text, maxsplit=1)[0]
        return text if len(text) <= 88 else text[:87].rsplit(" ", 1)[0] + " …"

    def walk(folder: Path, indent: str) -> None:
        for p in sorted(folder.iterdir(), key=lambda p: (p.is_dir(), p.name)):
            if p.is_dir() and (p / "__init__.py").exists():
                lines.append(f"{indent + p.name + '/':<24} {first(p / '__init__.py')}".rstrip())
                walk(p, indent + "  ")
            elif p.suffix == ".py" and p.name != "__init__.py":
                lines.append(f"{indent + p.name:<24} {first(p)}".rstrip())

    walk(SRC / "torchkeep", "  ")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_layers.py: the tree for docs/architecture.md
    print(tree_text())
