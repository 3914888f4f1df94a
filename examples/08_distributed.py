"""torch.distributed: every rank saves its shards of DTensor state; any world size loads it.

Two CPU processes (gloo) each hold half of a weight sharded by rows; they save together, and
the checkpoint loads back into columns, and whole in a plain process.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tutorial import workdir
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import torchkeep as tk


def rank_main(rank: int, world: int, path: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(64.0).reshape(8, 8)
        state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 10}
        tk.save(state, path)  # on every rank; rank 0 commits once all have written
        into = {"w": distribute_tensor(torch.zeros(8, 8), mesh, [Shard(1)]), "step": 0}
        tk.load(path, into=into)  # resharded: rows to columns, each rank reads its part
        assert torch.equal(into["w"].full_tensor(), full)
        if rank == 0:
            print(f"rank {rank}: saved rows, loaded columns {tuple(into['w'].to_local().shape)}")
        dist.barrier()  # both ranks are done talking before either tears gloo down
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown, where gloo's threads can still abort a finished rank
    # ("terminate called without an active exception"); the work is done and checked.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    out = workdir()
    path = str(out / "sharded")
    with socket.socket() as probe:  # a free port for the ranks to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(2, path, port), nprocs=2, join=True)
    whole = tk.load(path)  # no process group: whole tensors
    print(f"in a plain process: w {tuple(whole['w'].shape)}, step {whole['step']}")
    assert torch.equal(whole["w"], torch.arange(64.0).reshape(8, 8))
