"""Async saves: how long CheckpointManager.save() blocks, and the step time of a training loop
while saves are in flight.

    python benchmarks/async_save.py                     # 1 GiB state, 5 repeats, CPU
    python benchmarks/async_save.py --device cuda       # also with the state on the GPU
    python benchmarks/async_save.py --size-mib 128 --repeats 2 --no-steps

Files go to a temporary directory under --dir (default: the current directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from async_save_cases import format_training, measure_blocking, measure_steps
from output import progress_to_stderr, publish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="saves timed (default 5)")
    parser.add_argument("--device", action="append", default=None, help="cpu, cuda (repeatable)")
    parser.add_argument("--no-steps", action="store_true", help="skip the training-loop phases")
    parser.add_argument("--dir", default=".", help="directory on the disk to measure")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    devices = args.device or ["cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    progress = progress_to_stderr
    with tempfile.TemporaryDirectory(prefix="torchkeep-async-bench-", dir=args.dir) as work:
        blocking = [
            measure_blocking(
                args.size_mib << 20, work, repeats=args.repeats, device=d, progress=progress
            )
            for d in devices
        ]
        steps = None if args.no_steps else measure_steps(work, progress=progress)
    text = format_training(blocking, steps)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
