"""What the demo reports: one ``Step`` for each thing it did, the ``DemoResult`` of the whole
run, and how the sizes it quotes read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Step:
    """One thing the demo did, for the command line to show."""

    title: str
    detail: str
    ok: bool = True
    output: str = ""  # a command's own output, shown as it printed it


@dataclass
class DemoResult:
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


def size_on_disk(path: Path) -> int:
    """Bytes of the files at ``path``; a file linked into several steps counts once."""
    if path.is_file():
        return path.stat().st_size
    sizes = {}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def human_size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def finish(result: DemoResult) -> DemoResult:
    result.files = sorted(p for p in result.out_dir.rglob("*") if p.is_file())
    return result
