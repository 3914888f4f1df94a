"""What the benchmark scripts print: the first lines of their Markdown (the script, its command
and the machine), their progress on standard error, and the table on standard output and, when
asked, in a file."""

from __future__ import annotations

import os
import sys

from torchkeep.bench.report import MachineInfo


def script_header(
    title: str, script: str, argv: list[str] | None, m: MachineInfo, *, disk: bool = True
) -> list[str]:
    """The first lines of a benchmark script's Markdown: its title, the command that ran it
    (``argv``, or the process's own arguments) and the machine (with the disk, if ``disk``)."""
    command = " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    machine = f"{m.cpu}; {m.cores} cores; {m.memory_bytes / (1 << 30):.1f} GiB RAM"
    return [
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}" + (f"; {m.filesystem}" if disk else ""),
    ]


def progress_to_stderr(line: str) -> None:
    """The benchmark scripts' progress: one line per run on standard error."""
    print(line, file=sys.stderr, flush=True)


def publish(text: str, out: str | os.PathLike[str] | None) -> None:
    """Print a benchmark's Markdown to standard output and, when asked, write it to ``out``."""
    print(text)
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        progress_to_stderr(f"wrote {os.fspath(out)}")
