"""How much the raw device's cold read slows down when the processor works beside it.

    python benchmarks/read_interference.py --dir .bench       # 1 GiB file, 5 rounds
    python benchmarks/read_interference.py --size-mib 256 --rounds 3

The raw read is the benchmark's physical reference for loads (O_DIRECT, 16 MiB requests, 4 in
flight, into one aligned, faulted-in buffer: no byte is touched by the processor). A load cannot
work that way: every byte it reads is copied into a tensor and hashed. This script times the
same raw read alone and with busy threads beside it, in interleaved rounds: threads hashing a
256 KiB buffer that stays in the processor's cache, and threads copying 256 MiB in memory (the
memory traffic of a load's copy). On a virtual machine whose disk is served by the host, the
host's reads into guest memory compete with that traffic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

from output import progress_to_stderr, publish, script_header
from torchkeep.bench.cases import aligned_buffer, time_raw_read
from torchkeep.bench.report import machine_info
from torchkeep.bench.workload import MIB


def busy(kind: str, threads: int) -> Callable[[Callable[[], float]], float]:
    """Run ``read`` with ``threads`` threads doing ``kind`` work beside it; its seconds."""
    small = bytes(256 << 10)
    source = torch.ones(256 * MIB, dtype=torch.uint8)
    target = torch.empty_like(source)

    def run(read: Callable[[], float]) -> float:
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                if kind == "cache":
                    xxhash.xxh3_64_intdigest(small)
                else:
                    target.copy_(source)  # releases the GIL: the threads run in parallel

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        try:
            return read()
        finally:
            stop.set()
            for w in workers:
                w.join()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="torchkeep-interference-", dir=args.dir or os.getcwd())
    m = machine_info(work)
    nbytes = args.size_mib * MIB
    cases: dict[str, Callable[[Callable[[], float]], float]] = {
        "alone": lambda read: read(),
        "1 thread hashing a cached buffer": busy("cache", 1),
        "2 threads hashing a cached buffer": busy("cache", 2),
        "1 thread copying memory": busy("memory", 1),
        "2 threads copying memory": busy("memory", 2),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        path = os.path.join(work, "file.bin")
        with open(path, "wb") as f:
            piece = os.urandom(16 * MIB)
            for _ in range(nbytes // len(piece)):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        buffer = aligned_buffer(nbytes)
        order = list(cases)
        for r in range(args.rounds):
            shift = r % len(order)
            for name in order[shift:] + order[:shift]:
                seconds = cases[name](lambda: time_raw_read(buffer, path))
                times[name].append(seconds)
                progress_to_stderr(f"round {r + 1}/{args.rounds}: {name} {seconds:.3f} s")
                time.sleep(0.2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    alone = statistics.median(times["alone"])
    lines = [
        *script_header("raw cold read beside busy threads", "benchmarks/read_interference.py", argv, m),
        f"- the raw read of a {args.size_mib} MiB file (O_DIRECT, 16 MiB requests, 4 in flight), "
        f"{args.rounds} interleaved rounds; median and every run",
        "",
        "| beside the read | median s | GB/s | × alone | runs s |",
        "|---|---:|---:|---:|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median:.3f} | {nbytes / median / 1e9:.2f} | {median / alone:.2f}× | "
            f"{' '.join(f'{v:.2f}' for v in values)} |"
        )
    publish("\n".join([*lines, ""]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
