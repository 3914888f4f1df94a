"""Scaling: torchkeep's durable save and cold load at several sizes, beside the raw device.

    python benchmarks/scaling.py                              # 64 MiB, 1 GiB, 4 GiB; 3 repeats
    python benchmarks/scaling.py --sizes-mib 16 64 --repeats 1

For each size: a transformer-like state dict (as in benchmarks/core.py), saved durably with
tk.save_weights and loaded cold with tk.load_state_dict (every byte read), interleaved with
the physical references of the same bytes: the raw device through O_DIRECT (parallel writes of
one aligned buffer + fsync; parallel cold reads of torchkeep's file) and the first touch of as
much fresh memory. Throughput should not fall as the size grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

from output import progress_to_stderr, publish, script_header
from torchkeep.bench.cases import (
    FIRST_TOUCH,
    RAW,
    TORCHKEEP,
    aligned_buffer,
    time_first_touch,
    time_load,
    time_raw_read,
    time_raw_write,
    time_save,
)
from torchkeep.bench.report import machine_info
from torchkeep.bench.runner import run_interleaved
from torchkeep.bench.workload import MIB, make_state_dict, state_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="counted runs per case (default 3)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    progress = progress_to_stderr
    parent = args.dir or os.getcwd()
    work = tempfile.mkdtemp(prefix="torchkeep-scaling-", dir=parent)
    m = machine_info(work)
    rows = []
    try:
        for size in args.sizes_mib:
            state = make_state_dict(size << 20)
            nbytes = state_bytes(state)
            buffer = aligned_buffer(nbytes + (16 << 20))  # room for the whole file
            path, raw = os.path.join(work, "s.safetensors"), os.path.join(work, "raw.bin")
            save = run_interleaved(
                f"save {size} MiB",
                {
                    TORCHKEEP: partial(time_save, TORCHKEEP, state, path),
                    RAW: partial(time_raw_write, buffer, raw, nbytes=nbytes),
                },
                repeats=args.repeats,
                nbytes=nbytes,
                progress=progress,
            )
            load = run_interleaved(
                f"load {size} MiB",
                {
                    TORCHKEEP: partial(time_load, TORCHKEEP, path),
                    RAW: partial(time_raw_read, buffer, path),
                    FIRST_TOUCH: partial(time_first_touch, nbytes),
                },
                repeats=args.repeats,
                nbytes=nbytes,
                progress=progress,
            )
            rows.append((nbytes, save, load))
            os.unlink(raw)
            del state, buffer
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        *script_header("torchkeep scaling", "benchmarks/scaling.py", argv, m),
        f"- {args.repeats} counted runs per case after a warm-up, interleaved with the physical references; GB/s of the median",
        "- raw: O_DIRECT, 16 MiB requests, 4 in flight (writes of one aligned buffer + fsync; cold reads of torchkeep's file); first touch: as much fresh memory, one byte per page",
        "- save / bound = raw write median / save median; load / bound = max(raw read, first touch) median / load median",
        "",
        "| state dict | durable save GB/s | raw durable write GB/s | save / bound | cold load GB/s | raw cold read GB/s | first touch GB/s | load / bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for nbytes, save, load in rows:
        tk_save, raw_save = save
        tk_load, raw_load, touch = load
        bound = max(raw_load.median, touch.median)
        lines.append(
            f"| {nbytes / MIB:.0f} MiB | {tk_save.gbps:.2f} | {raw_save.gbps:.2f} | "
            f"{raw_save.median / tk_save.median:.0%} | {tk_load.gbps:.2f} | {raw_load.gbps:.2f} | "
            f"{touch.gbps:.2f} | {bound / tk_load.median:.0%} |"
        )
    text = "\n".join([*lines, ""])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
