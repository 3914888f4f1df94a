"""Whole-model load: peak memory and time of tk.load_model against torch and safetensors.

    python benchmarks/model_load.py                     # ~1 GiB model, 3 runs each
    python benchmarks/model_load.py --size-mib 128 --repeats 1

Each load runs in a fresh process with the file dropped from the page cache. Files go to a
temporary directory under --dir (default: the current directory), removed at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from model_load_cases import format_model_load, run_model_load
from output import progress_to_stderr, publish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="model size (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way (default 3)")
    parser.add_argument("--dir", default=".", help="directory on the disk to measure")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeats < 1:
        parser.error("--size-mib and --repeats must be at least 1")

    progress = progress_to_stderr
    with tempfile.TemporaryDirectory(prefix="torchkeep-model-bench-", dir=args.dir) as work:
        results = run_model_load(args.size_mib << 20, work, repeats=args.repeats, progress=progress)
    text = format_model_load(results)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
