"""Core benchmark: saves, loads and the engine's cases; torchkeep vs torch and safetensors.

    python benchmarks/core.py                       # 1 GiB, 5 repeats: the published table
    python benchmarks/core.py --size-mib 64 --repeats 2 --out bench.md --plot bench.png

Files go to a temporary directory under --dir (default: the current directory, not /tmp, which
may be tmpfs); it is removed at the end. Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from output import progress_to_stderr, publish
from torchkeep.bench import format_markdown, run_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="counted runs per case (default 5)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-engine", action="store_true", help="only the core cases")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the chart (PNG)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeats < 1:
        parser.error("--size-mib and --repeats must be at least 1")

    progress = progress_to_stderr
    command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/core.py", *argv])])
    result = run_benchmark(
        size_bytes=args.size_mib << 20,
        repeats=args.repeats,
        directory=args.dir,
        progress=progress,
        command=command,
        memory=not args.no_memory,
        engine=not args.no_engine,
    )
    text = format_markdown(result)
    publish(text, args.out)
    if args.plot is not None:
        from torchkeep.bench.plot import plot

        plot(result, args.plot)
        progress(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
