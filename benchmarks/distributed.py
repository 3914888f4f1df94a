"""Distributed saves: the same sharded state saved by one rank and by two, in gloo groups.

    python benchmarks/distributed.py                       # ~1 GiB, 5 repeats
    python benchmarks/distributed.py --size-mib 64 --repeats 1

The state is a transformer-like state dict (as in benchmarks/core.py) whose tensors are
DTensors sharded by rows (Shard(0)) over the group; each rank builds only its own rows. Every
run starts a fresh group (torch.multiprocessing, gloo, CPU), saves once to warm up, then times
one durable tk.save (from a barrier to the last rank's return). Group sizes alternate from run
to run. Target: two ranks take at most 0.65x the time of one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from output import progress_to_stderr, publish, script_header
from torchkeep.bench.report import machine_info
from torchkeep.bench.workload import MIB, make_state_dict, state_bytes

TARGET = 0.65


def _rank(rank: int, world: int, init: str, size: int, work: str, result: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import torchkeep as tk

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    for name, t in make_state_dict(size).items():
        if t.dim() == 0:
            state[name] = t  # a scalar: plain, written by rank 0
            continue
        rows = -(-t.shape[0] // world)
        local = t[rank * rows : (rank + 1) * rows].clone()
        state[name] = DTensor.from_local(
            local, mesh, [Shard(0)], shape=t.shape, stride=t.stride(), run_check=False
        )
    times = []
    for attempt in range(2):  # a warm-up, then the timed save
        path = os.path.join(work, f"ckpt-{world}-{attempt}")
        dist.barrier()
        started = time.perf_counter()
        tk.save(state, path)
        dist.barrier()
        times.append(time.perf_counter() - started)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path)
    if rank == 0:
        Path(result).write_text(f"{times[-1]}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown, which gloo's threads can abort


def _run(world: int, size: int, work: str) -> float:
    result = os.path.join(work, f"time-{world}.txt")
    init = f"file://{work}/store-{os.urandom(6).hex()}"
    mp.spawn(_rank, args=(world, init, size, work, result), nprocs=world, join=True)
    return float(Path(result).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per group size")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    size = args.size_mib * MIB
    nbytes = state_bytes(make_state_dict(size))
    work = os.path.abspath(
        tempfile.mkdtemp(prefix="torchkeep-distributed-", dir=args.dir or os.getcwd())
    )
    times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for run in range(args.repeats):
            for world in (1, 2) if run % 2 == 0 else (2, 1):
                seconds = _run(world, size, work)
                times[world].append(seconds)
                progress_to_stderr(f"{world} rank(s): run {run + 1}/{args.repeats} {seconds:.3f} s")
        m = machine_info(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one, two = statistics.median(times[1]), statistics.median(times[2])
    lines = script_header(
        "torchkeep distributed save (gloo, CPU)", "benchmarks/distributed.py", argv, m
    )
    lines[-1] += f"; torch {torch.__version__}"
    lines += [
        f"- {nbytes / MIB:.0f} MiB of DTensors sharded by rows; durable tk.save from a barrier "
        f"to the last rank's return; {args.repeats} runs per group size (a fresh group each, "
        "after a warm-up save), alternating",
        "",
        "| ranks | median s | best s | GB/s (median) | median / one rank's | best / one rank's "
        "best | every run, s |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| 1 | {one:.3f} | {min(times[1]):.3f} | {nbytes / one / 1e9:.2f} | 1.00 | 1.00 | "
        f"{_runs(times[1])} |",
        f"| 2 | {two:.3f} | {min(times[2]):.3f} | {nbytes / two / 1e9:.2f} | {two / one:.2f} | "
        f"{min(times[2]) / min(times[1]):.2f} | {_runs(times[2])} |",
        "",
        f"Target: two ranks at most {TARGET}x one rank's time: "
        f"{'met' if two / one <= TARGET else 'not met'} by the medians, "
        f"{'met' if min(times[2]) / min(times[1]) <= TARGET else 'not met'} by the best runs.",
        "",
    ]
    publish("\n".join(lines), args.out)
    return 0


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    sys.exit(main())
