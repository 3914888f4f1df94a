"""Rank functions for the distributed tests, run by torch.multiprocessing in gloo groups."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import torchkeep as tk

ROWS, COLS = 12, 10


def full(seed: int = 0) -> dict[str, torch.Tensor]:
    """The global tensors every test saves (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(ROWS, COLS, generator=g),
        "b": torch.randn(5, generator=g).bfloat16(),  # 5 rows over 4 ranks: 2+2+1+0
        "r": torch.arange(6.0),
    }


def run(rank: int, world: int, init: str, job: str, args: dict[str, Any]) -> None:
    """One rank: join the group, run ``job``, write an error file if it raised."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        JOBS[job](rank, world, **args)
    except BaseException:
        with open(os.path.join(args["out"], f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a rank's process without the interpreter's teardown: gloo's threads can abort it
    ("terminate called without an active exception") after all the work is done and checked."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def recording_reads(out: str, rank: int) -> Iterator[None]:
    """Write the chunks (``name@offsets``) this rank reads to ``reads-<rank>.json``."""
    from torchkeep.container import Container

    names: list[str] = []
    read = Container.read

    def recorded(self: Container, wanted: Any, *args: Any, **kwargs: Any) -> Any:
        names.extend(n for n in wanted if "@" in n)
        return read(self, wanted, *args, **kwargs)

    Container.read = recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        Container.read = read  # type: ignore[method-assign]
    with open(os.path.join(out, f"reads-{rank}.json"), "w") as f:
        json.dump(names, f)


def _state(world: int, placements: str, seed: int = 0) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world,))
    place = {"rows": [Shard(0)], "cols": [Shard(1)], "replicated": [Replicate()]}[placements]
    tensors = full(seed)
    return {
        "model": {
            "w": distribute_tensor(tensors["w"], mesh, place),
            "b": distribute_tensor(tensors["b"], mesh, [Shard(0)] if placements != "replicated" else place),
            "r": distribute_tensor(tensors["r"], mesh, [Replicate()]),
        },
        "step": 7,
        "plain": torch.full((3,), 5.0),
    }


def save(rank: int, world: int, *, out: str, path: str, placements: str = "rows", seed: int = 0, fail_rank: int = -1, bad_rank: int = -1, extra_rank: int = -1, storage_options: dict[str, Any] | None = None) -> None:
    state = _state(world, placements, seed)
    state["model"]["tied"] = state["model"]["w"]  # one DTensor under two names
    if rank == bad_rank:
        state["step"] = lambda: 7  # a value only this rank cannot store
    if rank == extra_rank:  # a DTensor only this rank holds (no collective to build it)
        from torch.distributed.tensor import DTensor

        mesh = state["model"]["w"].device_mesh
        state["model"]["only_here"] = DTensor.from_local(torch.ones(2), mesh, [Replicate()], run_check=False)
    if rank == fail_rank:
        from torchkeep.storage import LocalStorage

        def broken(self: Any, *a: Any, **k: Any) -> None:
            raise OSError(28, "No space left on device (injected on this rank)")

        LocalStorage.write_file = broken  # type: ignore[method-assign]
    _record(out, rank, lambda: " ".join(tk.save(state, path, storage_options=storage_options).files))


def _record(out: str, rank: int, save: Any) -> None:
    """Run ``save``: what it returns goes to ``saved-<rank>.txt``, a TorchkeepError it raises to
    ``raised-<rank>.txt``."""
    try:
        name, text = "saved", save()
    except tk.TorchkeepError as e:
        name, text = "raised", f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"{name}-{rank}.txt"), "w") as f:
        f.write(text)


def load(rank: int, world: int, *, out: str, path: str, placements: str = "rows", map_location: str | None = None) -> None:
    state = _state(world, placements, seed=99)  # other values: the load must overwrite them
    state["model"]["tied"] = state["model"]["w"]
    for t in state["model"].values():
        t.to_local().zero_()
    state["plain"] = torch.zeros(3)
    with recording_reads(out, rank):
        loaded = tk.load(path, into=state, map_location=map_location)
    expected = full()
    for name, t in state["model"].items():
        if name == "tied":
            continue
        whole = t.full_tensor()
        assert torch.equal(whole, expected[name]), (name, whole, expected[name])
        assert loaded["model"][name] is t
    assert loaded["step"] == 7 and torch.equal(state["plain"], torch.full((3,), 5.0))
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )


def _batch(n: int) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(n))


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    optimizer.zero_grad()
    model(_batch(n)).sum().backward()
    optimizer.step()


def _whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def fsdp_save(rank: int, world: int, *, out: str, path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model(0)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, optimizer, 1)  # weights and moments that differ from any fresh ones
    tk.save({"model": model, "optimizer": optimizer, "step": 1}, path)
    whole = _whole(model)
    moments = {
        f"{n}.{key}": value.full_tensor()
        for n, p in zip(model.state_dict(), model.parameters(), strict=True)
        for key, value in optimizer.state[p].items()
        if key != "step"
    }
    _train_step(model, optimizer, 2)  # what a resumed run must reach
    after = _whole(model)
    if rank == 0:
        tk.save_weights(whole, os.path.join(out, "expected.safetensors"))
        tk.save_weights(moments, os.path.join(out, "moments.safetensors"))
        tk.save_weights(after, os.path.join(out, "after.safetensors"))


def fsdp_load(rank: int, world: int, *, out: str, path: str, expected: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model(5)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)  # no state yet, another lr
    hooked: list[str] = []
    model.register_load_state_dict_post_hook(lambda module, keys: hooked.append("ran"))
    with recording_reads(out, rank):
        state = tk.load(path, into={"model": model, "optimizer": optimizer})
    assert state["step"] == 1 and hooked == ["ran"]  # the module's own load hooks ran
    assert optimizer.param_groups[0]["lr"] == 0.1
    reference = tk.load_state_dict(expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v.full_tensor(), reference[k]), k
    moments = tk.load_state_dict(os.path.join(os.path.dirname(expected), "moments.safetensors"))
    for n, p in zip(model.state_dict(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state[p][key]
            # Placed like its parameter: this rank holds only its part.
            assert value.placements == p.placements and value.device_mesh == p.device_mesh, n
            assert value.to_local().shape == p.to_local().shape, n
            assert torch.equal(value.full_tensor(), moments[f"{n}.{key}"]), (n, key)
        assert int(optimizer.state[p]["step"]) == 1
    # The resumed step reaches the uninterrupted run's weights (summed in another order when
    # the world size differs).
    _train_step(model, optimizer, 2)
    after = tk.load_state_dict(os.path.join(os.path.dirname(expected), "after.safetensors"))
    for k, v in _whole(model).items():
        torch.testing.assert_close(v, after[k], rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def fsdp_load_whole(rank: int, world: int, *, out: str, path: str, expected: str) -> None:
    """A checkpoint saved without a process group, loaded into FSDP2 state."""
    from torch.distributed.fsdp import fully_shard

    model = _model(5)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    tk.load_checkpoint(path, model=model, optimizer=optimizer)
    _train_step(model, optimizer, 2)
    after = tk.load_state_dict(expected)
    for k, v in _whole(model).items():
        torch.testing.assert_close(v, after[k], rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def dcp_save(rank: int, world: int, *, out: str, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    state = _state(world, "rows")
    dcp.save({"model": state["model"], "plain": state["plain"]}, checkpoint_id=path)


def dcp_load(rank: int, world: int, *, out: str, path: str, placements: str) -> None:
    state = _state(world, placements, seed=99)
    tk.load(path, into={"model": state["model"], "plain": state["plain"]})
    expected = full()
    for name, t in state["model"].items():
        assert torch.equal(t.full_tensor(), expected[name]), name
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def manager(rank: int, world: int, *, out: str, root: str) -> None:
    with tk.CheckpointManager(root, keep_last=2) as mgr:
        for step in (1, 2, 3):
            state = _state(world, "rows", seed=step)
            mgr.save(step, {"model": state["model"], "step": step})
        assert mgr.steps() == [2, 3], mgr.steps()
        fresh = _state(world, "cols", seed=50)
        assert mgr.restore({"model": fresh["model"], "step": 0}) == 3
        for name, t in fresh["model"].items():
            assert torch.equal(t.full_tensor(), full(seed=3)[name]), name
        if rank:
            try:
                mgr.save(4, {"plain": torch.ones(2)})
            except tk.StorageError as e:
                assert "rank 0 alone" in str(e)
            else:
                raise AssertionError("rank 1 saved plain state")
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def _frozen_state(world: int, placements: str, seed: int) -> dict[str, Any]:
    """A sharded frozen tensor (the same in every step) beside the sharded trainable ones."""
    state = _state(world, placements, seed=seed)
    mesh = state["model"]["w"].device_mesh
    frozen = torch.randn(256, 1024, generator=torch.Generator().manual_seed(11))
    place = [Shard(0)] if placements == "rows" else [Shard(1)]
    state["model"]["frozen"] = distribute_tensor(frozen, mesh, place)
    return state


def incremental(rank: int, world: int, *, out: str, root: str) -> None:
    """A manager's steps share the frozen DTensor's chunks; each rank links its own file."""
    frozen_bytes = 256 * 1024 * 4
    with tk.CheckpointManager(root, keep_last=2) as mgr:
        state = _frozen_state(world, "rows", seed=1)
        info = mgr.save(1, state)
        assert info.shared_bytes == 0, info
        for step in (2, 3):
            fresh = _frozen_state(world, "rows", seed=step)  # w, b change; frozen does not
            for name in ("w", "b"):
                state["model"][name].to_local().copy_(fresh["model"][name].to_local())
            info = mgr.save(step, state)
            # The frozen tensor (every rank's chunk) and the replicated r are shared.
            assert info.shared_bytes >= frozen_bytes, (step, info)
            assert info.file_bytes < frozen_bytes // 4, (step, info)
        assert mgr.steps() == [2, 3]
        restored = _frozen_state(world, "cols", seed=50)
        for t in restored["model"].values():
            t.to_local().zero_()
        assert mgr.restore(restored) == 3
        expected = _frozen_state(world, "rows", seed=3)
        for name, t in restored["model"].items():
            assert torch.equal(t.full_tensor(), expected["model"][name].full_tensor()), name
    with open(os.path.join(out, f"loaded-{rank}.txt"), "w") as f:
        f.write("ok")


def save_on_base(rank: int, world: int, *, out: str, path: str, base: str) -> None:
    """tk.save(base=) in a process group: every rank shares its chunks, or every rank raises."""
    state = _frozen_state(world, "rows", seed=4)
    _record(out, rank, lambda: str(tk.save(state, path, base=base).shared_bytes))


JOBS = {
    "incremental": incremental,
    "save_on_base": save_on_base,
    "manager": manager,
    "save": save,
    "load": load,
    "fsdp_save": fsdp_save,
    "fsdp_load": fsdp_load,
    "fsdp_load_whole": fsdp_load_whole,
    "dcp_save": dcp_save,
    "dcp_load": dcp_load,
}
