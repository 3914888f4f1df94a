"""GPU benchmark: loading onto the GPU and saving from it; torchkeep vs torch and safetensors.

    python benchmarks/gpu.py                          # 4 GiB on cuda, 5 repeats (the target)
    python benchmarks/gpu.py --size-mib 256 --repeats 2 --device cpu   # the harness, no GPU

Files go to a temporary directory under --dir (default: the current directory); it is removed
at the end. Progress goes to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from output import progress_to_stderr, publish
from torchkeep.bench.gpu import format_gpu, run_gpu_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=4096, help="state dict size (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="counted runs per case (default 5)")
    parser.add_argument("--device", default="cuda", help="default: cuda")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.repeats < 1:
        parser.error("--size-mib and --repeats must be at least 1")

    progress = progress_to_stderr
    command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/gpu.py", *argv])])
    result = run_gpu_benchmark(
        size_bytes=args.size_mib << 20,
        repeats=args.repeats,
        device=args.device,
        directory=args.dir,
        progress=progress,
        command=command,
    )
    text = format_gpu(result)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
