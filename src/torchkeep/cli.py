"""The ``torchkeep`` command line: a thin layer over the library. The only module that prints.

Exit codes: 0 ok, 1 a problem was found (corruption, a failed demo step), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import torchkeep as tk

OK, PROBLEM, USAGE = 0, 1, 2


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    info = tk.describe(args.path)
    console.print(
        f"[bold]{info.path}[/bold]  ({info.format}{', ' + info.kind if info.kind else ''})"
    )
    if info.format_version is not None:
        console.print(
            f"format version {info.format_version}, written {info.created} by torchkeep "
            f"{info.torchkeep_version} with torch {info.torch_version}"
        )
    console.print(
        f"{len(info.tensors)} tensors, {_human(info.tensor_bytes)} of data, "
        f"{_human(info.file_bytes)} on disk; checksums: {'yes' if info.checksummed else 'no'}"
    )
    table = Table(show_edge=False)
    for column in ("tensor", "dtype", "shape", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    shown = info.tensors if args.all else info.tensors[: args.limit]
    for t in shown:
        table.add_row(t.name, t.dtype, str(list(t.shape)), _human(t.nbytes))
    console.print(table)
    if len(shown) < len(info.tensors):
        console.print(f"… and {len(info.tensors) - len(shown)} more (--all to list every one)")
    if info.aliases:
        console.print("tied: " + ", ".join(f"{a} = {t}" for a, t in info.aliases.items()))
    if info.metadata:
        console.print("metadata: " + json.dumps(info.metadata))
    return OK


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    status = OK
    for path in args.paths:
        report = tk.verify(path)
        if report.ok:
            note = "" if report.checksummed else " (no checksums: not written by torchkeep)"
            console.print(
                f"[green]ok[/green] {path}: {report.tensors} tensors, "
                f"{_human(report.tensor_bytes)}{note}"
            )
        else:
            status = PROBLEM
            console.print(f"[red]CORRUPT[/red] {path}")
            for problem in report.problems:
                console.print(f"  {problem}", markup=False)
    return status


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from torchkeep.demo import Step, run_demo

    if args.out is None:
        holder = tempfile.TemporaryDirectory(prefix="torchkeep-demo-")
        out = Path(holder.name)
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]torchkeep demo[/bold] — writing to {out}")
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        def report(step: Step) -> None:
            mark = "[green]✓[/green]" if step.ok else "[red]✗[/red]"
            console.print(f"{mark} [bold]{step.title}[/bold]: {step.detail}")

        result = run_demo(out, report=report, progress=progress)
    console.print(f"\n{len(result.files)} files written under {out}:")
    for path in result.files[:6]:
        console.print(f"  {path.relative_to(out)}  ({_human(path.stat().st_size)})")
    if len(result.files) > 6:
        console.print(f"  … and {len(result.files) - 6} more")
    if args.out is None:
        console.print("(a temporary directory, removed now; pass --out DIR to keep the files)")
    console.print("[green]demo passed[/green]" if result.ok else "[red]demo failed[/red]")
    return OK if result.ok else PROBLEM


def cmd_demo_worker(args: argparse.Namespace, console: Console) -> int:
    from torchkeep.demo import worker

    print(json.dumps(worker(args.args)))
    return OK


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    try:
        import safetensors  # noqa: F401  (the benchmark compares with it)
    except ImportError as e:
        raise tk.MissingDependencyError(
            "torchkeep bench compares with safetensors, which is not installed; "
            "install it with: pip install 'torchkeep[bench]'"
        ) from e
    from torchkeep.bench import format_markdown, run_benchmark

    result = run_benchmark(
        size_bytes=int(args.size_mib) << 20,
        repeats=args.repeats,
        directory=args.dir,
        progress=lambda line: console.print(line, markup=False),
    )
    text = format_markdown(result)
    console.print(text, markup=False)
    if args.out:
        Path(args.out).write_text(text)
    return OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchkeep", description="Save, load, inspect and verify PyTorch checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"torchkeep {tk.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a checkpoint holds")
    p.add_argument("path")
    p.add_argument("--limit", type=int, default=40, help="tensors to list (default 40)")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every checksum; exit 1 if anything is damaged")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="run the end-to-end demo")
    p.add_argument("--out", help="keep the files in this directory")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-worker")
    p.add_argument("args", nargs="+")
    p.set_defaults(func=cmd_demo_worker)

    p = sub.add_parser("bench", help="compare with torch.save/torch.load and safetensors")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write (default: a temporary directory here)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        status: int = args.func(args, console)
    except tk.CheckpointNotFoundError as e:
        errors.print(f"torchkeep: {e}", markup=False)
        return USAGE
    except tk.TorchkeepError as e:
        errors.print(f"torchkeep: {e}", markup=False)
        return PROBLEM
    return status


def _run() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _run()
