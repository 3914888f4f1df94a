"""The ``torchkeep`` command line: a thin layer over the library. The only package that prints.

Exit codes: 0 ok, 1 a problem was found (corruption, a failed demo step), 2 a usage error.

``render`` holds how sizes and ``inspect``'s description are written; ``python -m
torchkeep.cli`` runs ``main`` (``__main__``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import torchkeep as tk
from torchkeep._optional import importing
from torchkeep.cli.render import human, print_description, print_diff
from torchkeep.storage import is_url

if TYPE_CHECKING:
    from torchkeep.bench import BenchResult
    from torchkeep.bench.gpu import GpuResult

OK, PROBLEM, USAGE = 0, 1, 2
DTYPE_CHOICES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


def _print_json(console: Console, value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) for v in value]
    console.print_json(json.dumps(value, default=str))


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    info = tk.describe(args.path, storage_options=_options(args, args.path))
    if args.json:
        _print_json(console, info)
        return OK
    print_description(console, info, limit=args.limit, everything=args.all)
    return OK


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    with console.status("verifying…"):
        reports = [tk.verify(p, storage_options=_options(args, p)) for p in args.paths]
    if args.json:
        _print_json(console, reports)
        return OK if all(r.ok for r in reports) else PROBLEM
    status = OK
    for path, report in zip(args.paths, reports, strict=True):
        if report.ok:
            unchecked = " (the file carries no checksums: its structure and sizes were checked)"
            note = "" if report.checksummed else unchecked
            console.print(
                f"[green]ok[/green] {path}: {report.tensors} tensors, "
                f"{human(report.tensor_bytes)}{note}"
            )
        else:
            status = PROBLEM
            label = "INCOMPLETE" if report.incomplete else "CORRUPT"
            console.print(f"[red]{label}[/red] {path}")
            for problem in report.problems:
                console.print(f"  {problem}", markup=False)
    return status


def cmd_scan(args: argparse.Namespace, console: Console) -> int:
    reports = [tk.scan(p, storage_options=_options(args, p)) for p in args.paths]
    if args.json:
        _print_json(console, reports)
    else:
        for report in reports:
            mark = "[green]safe[/green]" if report.safe else "[red]UNSAFE[/red]"
            console.print(f"{mark} {report.path} ({report.format})")
            console.print(f"  {report.verdict}", markup=False)
            for name in report.globals:
                flag = "  [red]✗[/red]" if name in report.unsafe else "  ✓"
                console.print(f"{flag} {name}", highlight=False)
    return OK if all(r.safe for r in reports) else PROBLEM


def cmd_convert(args: argparse.Namespace, console: Console) -> int:
    dtype = DTYPE_CHOICES[args.dtype] if args.dtype else None
    with console.status(f"converting {args.src}…"):
        info = tk.convert(
            args.src,
            args.dst,
            dtype=dtype,
            max_shard_size=args.max_shard_size,
            storage_options=_options(args, args.src, args.dst),
        )
    local_dir = not is_url(args.src) and os.path.isdir(args.src)
    before = (
        None
        if local_dir
        else tk.describe(args.src, storage_options=_options(args, args.src)).file_bytes
    )
    size = f"{human(info.file_bytes)}" + (f" (was {human(before)})" if before else "")
    console.print(
        f"[green]wrote[/green] {info.path}: {info.tensors} tensors, {size}, "
        f"{len(info.files)} file(s), in {info.seconds:.2f}s"
    )
    return OK


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    with console.status("comparing…"):
        d = tk.diff(args.a, args.b, storage_options=_options(args, args.a, args.b))
    if args.json:
        _print_json(console, {**dataclasses.asdict(d), "same": d.same})
        return OK if d.same else PROBLEM
    if d.same:
        console.print(f"[green]same[/green]: {d.unchanged} entries are equal")
        return OK
    print_diff(console, d, limit=args.limit)
    return PROBLEM


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from torchkeep.demo import Step, run_demo

    if args.out is None:
        holder = tempfile.TemporaryDirectory(prefix="torchkeep-demo-")
        out = Path(holder.name)
    else:
        out = Path(args.out).resolve()
        if out.exists() and any(out.iterdir()):
            console.print(f"{out} is not empty; give --out a new or empty directory")
            return USAGE
        out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]torchkeep demo[/bold]: writing to {out}\n")
    tasks: dict[str, TaskID] = {}
    started = time.perf_counter()
    with _progress_bar(console) as bar:

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        def report(step: Step) -> None:
            mark = "[green]✓[/green]" if step.ok else "[red]✗[/red]"
            console.print(f"{mark} [bold]{step.title}[/bold]")
            console.print(f"  {step.detail}", markup=False)
            if step.output:
                indented = "    " + step.output.replace("\n", "\n    ")
                console.print(indented, markup=False, style="dim")
            console.print()

        result = run_demo(out, report=report, progress=progress)
    elapsed = time.perf_counter() - started
    table = Table(title=f"written under {out}", title_justify="left", box=None)
    table.add_column("path")
    table.add_column("files", justify="right")
    table.add_column("size", justify="right")
    groups: dict[str, list[Path]] = {}
    for path in result.files:
        groups.setdefault(path.relative_to(out).parts[0], []).append(path)
    for name, paths in sorted(groups.items()):
        shown = name + ("/" if (out / name).is_dir() else "")
        table.add_row(shown, str(len(paths)), human(sum(p.stat().st_size for p in paths)))
    console.print(table)
    if args.out is None:
        console.print("(a temporary directory, removed now; pass --out DIR to keep the files)")
    passed = sum(s.ok for s in result.steps)
    verdict = "[green]demo passed[/green]" if result.ok else "[red]demo failed[/red]"
    console.print(f"{verdict}: {passed} of {len(result.steps)} steps in {elapsed:.0f} s")
    return OK if result.ok else PROBLEM


def cmd_demo_worker(args: argparse.Namespace, console: Console) -> int:
    from torchkeep.demo import worker

    lock = threading.Lock()  # the training thread and the background writer both report

    def emit(event: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    worker(args.args, emit)
    return OK


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    _require_bench_extras(args)
    from torchkeep.bench import format_markdown
    from torchkeep.bench.gpu import format_gpu

    size = _bench_size(args)
    console.print(
        f"[bold]torchkeep bench[/bold]: {size / (1 << 20):.0f} MiB, {args.repeats} repeats, "
        f"files under {args.dir or os.getcwd()}"
    )
    result, gpu = _run_bench(args, size, console)
    text = format_markdown(result) + ("\n" + format_gpu(gpu) if gpu is not None else "")
    console.print(text, markup=False)
    if args.out:
        Path(args.out).write_text(text)
        console.print(f"wrote {args.out}")
    if args.plot:
        from torchkeep.bench.plot import plot

        plot(result, args.plot)
        console.print(f"wrote {args.plot}")
    return OK


def _require_bench_extras(args: argparse.Namespace) -> None:
    """Fail now, before any run, if an extra the benchmark needs is missing."""
    with importing("bench", "torchkeep bench compares with safetensors, which is not installed"):
        import safetensors  # noqa: F401  (the benchmark compares with it)
    if args.plot:
        from torchkeep.bench.plot import pyplot

        pyplot()  # a missing extra is reported now, not after the run


def _bench_size(args: argparse.Namespace) -> int:
    """The state dict's size in bytes, once every option of ``bench`` is checked."""
    from torchkeep.convert import parse_size

    try:
        size = args.size_mib << 20 if args.size_mib else parse_size(args.size)
    except ValueError as e:
        raise ValueError(f"--size: {e}") from e
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.small_tensors < 1:
        raise ValueError("--small-tensors must be at least 1")
    if args.dir is not None and not os.path.isdir(args.dir):
        raise ValueError(f"--dir {args.dir}: no such directory")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device}: not a device ({e})") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no usable CUDA device")
    return size


def _run_bench(
    args: argparse.Namespace, size: int, console: Console
) -> tuple[BenchResult, GpuResult | None]:
    """Run the benchmark (and the GPU cases with ``--device``) under a progress bar."""
    from torchkeep.bench import run_benchmark
    from torchkeep.bench.gpu import GPU_RUNS, run_gpu_benchmark
    from torchkeep.bench.runner import planned_runs

    total = planned_runs(args.repeats) + (
        (args.repeats + 1) * GPU_RUNS if args.device is not None else 0
    )
    with _progress_bar(console, unit=" runs") as bar:
        task = bar.add_task("starting", total=total)

        def progress(line: str) -> None:
            bar.update(task, description=line)
            if args.verbose:
                console.print(line, markup=False)

        result = run_benchmark(
            size_bytes=size,
            repeats=args.repeats,
            directory=args.dir,
            progress=progress,
            small_tensors=args.small_tensors,
            step=lambda: bar.advance(task),
        )
        gpu = (
            run_gpu_benchmark(
                size_bytes=size,
                repeats=args.repeats,
                device=args.device,
                directory=args.dir,
                progress=progress,
                step=lambda: bar.advance(task),
            )
            if args.device is not None
            else None
        )
    return result, gpu


def _progress_bar(console: Console, *, unit: str = "") -> Progress:
    """The command line's progress bar: what is being done, a bar, the count and the time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}" + unit),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--storage-option``: VALUE a string, except ``true``, ``false``,
    ``null`` and JSON objects and arrays; ``KEY:=JSON`` for any JSON value (numbers)."""
    key, sep, value = text.partition("=")
    as_json = key.endswith(":")
    key = key.removesuffix(":")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give KEY=VALUE or KEY:=JSON, e.g. anon=true, "
            """client_kwargs='{"endpoint_url": "http://127.0.0.1:9000"}' or max_concurrency:=4"""
        )
    if as_json or value in ("true", "false", "null") or value[:1] in ("{", "["):
        try:
            return key, json.loads(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: the value is not JSON ({e})") from e
    return key, value


def _with_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--storage-option",
        type=_storage_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option for URLs (s3://…), repeatable: KEY=VALUE (a string, or "
        "true/false/null, or a JSON object or array) or KEY:=JSON (any JSON value)",
    )


def _with_paths(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that checks many paths: the paths, --json, storage options."""
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _with_storage_options(parser)


def _options(args: argparse.Namespace, *paths: str) -> dict[str, Any] | None:
    """The storage options given, for a command on ``paths`` if any of them is a URL."""
    given = dict(args.storage_option)
    remote = any(is_url(p) and not p.startswith("file://") for p in paths)
    return given if given and remote else None


def _command(
    sub: Any, name: str, summary: str, examples: str, func: Any
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchkeep",
        description="Save, load, inspect, verify, scan and convert PyTorch checkpoints.",
        epilog="exit codes: 0 ok, 1 a problem found, 2 a usage error or a missing path",
    )
    parser.add_argument("--version", action="version", version=f"torchkeep {tk.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_checkpoint_commands(sub)
    _add_run_commands(sub)
    return parser


def _add_checkpoint_commands(sub: Any) -> None:
    """The commands on checkpoints: inspect, verify, scan, convert, diff."""
    p = _command(sub, "inspect", "show what a checkpoint holds (reads headers only)",
                 "  torchkeep inspect model.safetensors\n  torchkeep inspect ckpt.pth --json\n",
                 cmd_inspect)  # fmt: skip
    p.add_argument("path")
    p.add_argument("--limit", type=int, default=40, help="tensors to list (default 40)")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _with_storage_options(p)

    p = _command(sub, "verify", "check every checksum; exit 1 if anything is damaged",
                 "  torchkeep verify ckpt.safetensors\n  torchkeep verify runs/step_*\n",
                 cmd_verify)  # fmt: skip
    _with_paths(p)

    p = _command(sub, "scan", "list the code a pickle file would run; exit 1 if any",
                 "  torchkeep scan downloaded.pth\n  torchkeep scan *.bin --json\n",
                 cmd_scan)  # fmt: skip
    _with_paths(p)

    p = _command(sub, "convert", "convert any checkpoint to safetensors or a torchkeep directory",
                 "  torchkeep convert model.pth model.safetensors\n"
                 "  torchkeep convert model.pth model-bf16.safetensors --dtype bf16\n"
                 "  torchkeep convert model.bin hf_model --max-shard-size 5GB\n",
                 cmd_convert)  # fmt: skip
    p.add_argument("src")
    p.add_argument("dst", help="*.safetensors for one file, any other name for a directory")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPE_CHOICES),
        help="cast float16/bfloat16/float32/float64 tensors",
    )
    p.add_argument("--max-shard-size", help="write a Hugging Face sharded directory (e.g. 5GB)")
    _with_storage_options(p)

    p = _command(sub, "diff", "compare two checkpoints; exit 1 if they differ",
                 "  torchkeep diff epoch_1.safetensors epoch_2.safetensors\n"
                 "  torchkeep diff model.pth model.safetensors --json\n",
                 cmd_diff)  # fmt: skip
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    _with_storage_options(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_run_commands(sub: Any) -> None:
    """The commands that run something: the demo (and its worker), the benchmark."""
    p = _command(sub, "demo", "run the end-to-end demo",
                 "  torchkeep demo\n  torchkeep demo --out demo_files\n", cmd_demo)  # fmt: skip
    p.add_argument("--out", help="keep the files in this directory")

    p = sub.add_parser("demo-worker")
    p.add_argument("args", nargs="+")
    p.set_defaults(func=cmd_demo_worker)

    p = _command(sub, "bench", "compare with torch.save/torch.load and safetensors",
                 "  torchkeep bench\n  torchkeep bench --size 256MiB --repeats 5 --out t.md\n"
                 "  torchkeep bench --dir /mnt/nvme --plot bench.png\n"
                 "  torchkeep bench --device cuda\n",
                 cmd_bench)  # fmt: skip
    p.add_argument("--size", default="1GiB", help="state dict size (default 1GiB)")
    p.add_argument("--size-mib", type=int, help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--repeats", type=int, default=5, help="counted runs per case (default 5)")
    p.add_argument("--dir", help="a directory on the disk to measure (default: the current one)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--plot", help="also draw a bar chart (PNG); needs torchkeep[plot]")
    p.add_argument(
        "--small-tensors", type=int, default=10_000, help="4-64 KiB tensors to save (default 10000)"
    )
    p.add_argument("--device", help="also load to and save from this device (e.g. cuda)")
    p.add_argument("--verbose", action="store_true", help="print a line for every run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        status: int = args.func(args, console)
    except (tk.CheckpointNotFoundError, ValueError) as e:
        errors.print(f"torchkeep: {e}", markup=False)
        return USAGE
    except tk.TorchkeepError as e:
        errors.print(f"torchkeep: {e}", markup=False)
        return PROBLEM
    return status


def _run() -> Any:
    sys.exit(main())
