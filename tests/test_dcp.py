"""Reading torch.distributed.checkpoint directories in one process, with no process group; and
refusing, without running anything or allocating what the files cannot justify, hostile ones."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

from conftest import SimpleNet
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from torchkeep.legacy.dcp import is_dcp_dir, load_dcp


def save(state: dict[str, Any], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled …": meant, one process
        dcp.save(state, checkpoint_id=str(path))
    return path


def read_metadata(path: Path) -> Metadata:
    return FileSystemReader(str(path)).read_metadata()  # torch's own reader, on our own file


def rewrite_metadata(path: Path, edit: Callable[[Metadata], None]) -> None:
    metadata = read_metadata(path)
    edit(metadata)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def storage_of(metadata: Metadata, fqn: str) -> MetadataIndex:
    return next(index for index in metadata.storage_data if index.fqn == fqn)


def edit_storage(fqn: str, **changes: Any) -> Callable[[Metadata], None]:
    def edit(metadata: Metadata) -> None:
        index = storage_of(metadata, fqn)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], **changes)

    return edit


class RunsCode:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5, 2).bfloat16(),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(-6, 6).reshape(3, 4),
        "u8": torch.arange(10, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
    }


@pytest.fixture
def simple(tmp_path: Path) -> Path:
    return save(
        {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3), "step": 7}, tmp_path / "ck"
    )


def test_model_state_dict_round_trips_exactly(tmp_path: Path) -> None:
    model = SimpleNet()
    state = {**model.state_dict(), **tensors()}
    path = save(state, tmp_path / "ck")

    assert is_dcp_dir(path) and is_dcp_dir(str(path))
    assert not is_dcp_dir(tmp_path) and not is_dcp_dir(tmp_path / "nothing")
    loaded = load_dcp(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    fresh = SimpleNet()
    fresh.load_state_dict({k: loaded[k] for k in model.state_dict()})
    assert load_dcp(path, verify=False).keys() == loaded.keys()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint16])
def test_untyped_storage_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    value = torch.arange(6.0).to(dtype)
    loaded = load_dcp(save({"t": value}, tmp_path / "ck"))["t"]
    assert loaded.dtype == dtype and torch.equal(loaded.view(torch.uint8), value.view(torch.uint8))


def test_nested_training_state_keeps_its_nesting(tmp_path: Path) -> None:
    model = SimpleNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "extra": {"note": "x"},
    }
    loaded = load_dcp(save(state, tmp_path / "ck"))

    assert list(loaded) == ["model", "optimizer", "epoch", "extra"]
    assert loaded["epoch"] == 3 and loaded["extra"] == {"note": "x"}
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    # DCP flattens with str(key): the optimizer's int state keys come back as strings ("0", "1");
    # param_groups stays a list of dicts, with "params" [0, 1, ...] and "betas" a tuple.
    saved = optimizer.state_dict()
    assert sorted(loaded["optimizer"]["state"]) == [str(k) for k in sorted(saved["state"])]
    for k, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(loaded["optimizer"]["state"][str(k)][name], value)
    assert loaded["optimizer"]["param_groups"] == saved["param_groups"]
    restored = {
        "state": {int(k): v for k, v in loaded["optimizer"]["state"].items()},
        "param_groups": loaded["optimizer"]["param_groups"],
    }
    torch.optim.Adam(SimpleNet().parameters()).load_state_dict(restored)


def test_flat_keys_without_a_nesting_map(simple: Path) -> None:
    def clash(metadata: Metadata) -> None:
        metadata.planner_data["w"] = ("b", "w")  # does not join back to "w": not trusted

    rewrite_metadata(simple, clash)
    assert list(load_dcp(simple)) == ["w", "b", "step"]
    rewrite_metadata(simple, lambda m: setattr(m, "planner_data", None))
    assert torch.equal(load_dcp(simple)["w"], torch.arange(12.0).reshape(3, 4))


_RANK_SCRIPT = """
import sys, warnings
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

warnings.simplefilter("ignore")
rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
state = {
    "rows": distribute_tensor(torch.arange(35.0).reshape(5, 7), mesh, [Shard(0)]),
    "cols": distribute_tensor(torch.arange(30.0).reshape(3, 10).bfloat16(), mesh, [Shard(1)]),
    "same": distribute_tensor(torch.arange(4), mesh, [Replicate()]),
    "step": 11,
}
dcp.save(state, checkpoint_id=out)
# Both ranks finish talking before either tears gloo down: a rank that destroys its group while
# the other still sends can abort in gloo's teardown ("terminate called without an active
# exception").
dist.barrier()
dist.destroy_process_group()
# Leave without the interpreter's teardown, where gloo's threads can still abort the process
# after the work is done.
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


@pytest.mark.slow
def test_tensor_sharded_by_two_processes_is_reassembled(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    out, store = tmp_path / "ck", tmp_path / "store"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(store), str(out)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(errors)
    metadata = read_metadata(out)
    assert len(metadata.state_dict_metadata["rows"].chunks) == 2  # 3 rows + 2 rows
    assert len(metadata.state_dict_metadata["cols"].chunks) == 2  # 5 columns each

    loaded = load_dcp(out)  # this process has no process group
    assert not torch.distributed.is_initialized()
    assert torch.equal(loaded["rows"], torch.arange(35.0).reshape(5, 7))
    assert torch.equal(loaded["cols"], torch.arange(30.0).reshape(3, 10).bfloat16())
    assert torch.equal(loaded["same"], torch.arange(4))
    assert loaded["step"] == 11


# --- hostile and damaged directories ---------------------------------------------------------


def test_metadata_that_runs_code_is_refused(simple: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    (simple / ".metadata").write_bytes(pickle.dumps(RunsCode(canary)))
    with pytest.raises(UnsafeFileError, match=r"posix\.system|nt\.system"):
        load_dcp(simple)
    assert not canary.exists()

    # The same call hidden inside an otherwise genuine Metadata.
    save({"w": torch.ones(2)}, simple)
    rewrite_metadata(simple, lambda m: m.planner_data.__setitem__("w", RunsCode(canary)))
    with pytest.raises(UnsafeFileError, match="system"):
        load_dcp(simple)
    assert not canary.exists()


def test_metadata_cannot_rewrite_the_stand_ins(simple: Path) -> None:
    # BUILD aimed at the allowed class itself, with slot state {"__setstate__": OrderedDict}:
    # with plain pickle this would replace the method for every later load in the process.
    key, value = (b"X\x0c\x00\x00\x00__setstate__", b"ccollections\nOrderedDict\n")
    chunk = b"ctorch.distributed.checkpoint.metadata\nChunkStorageMetadata\n"
    good = (simple / ".metadata").read_bytes()
    (simple / ".metadata").write_bytes(b"\x80\x02" + chunk + b"N}" + key + value + b"s\x86b.")
    with pytest.raises(CorruptCheckpointError, match="malformed pickle"):
        load_dcp(simple)
    (simple / ".metadata").write_bytes(good)
    assert torch.equal(load_dcp(simple)["b"], torch.ones(3))


def test_value_payload_that_runs_code_is_refused(simple: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    torch.save(RunsCode(canary), simple / "evil.distcp")
    size = (simple / "evil.distcp").stat().st_size
    rewrite_metadata(
        simple, edit_storage("step", relative_path="evil.distcp", offset=0, length=size)
    )
    with pytest.raises(UnsafeFileError, match="system"):
        load_dcp(simple)
    assert not canary.exists()


@pytest.mark.parametrize("where", ["../outside.distcp", "absolute", "link.distcp"])
def test_storage_outside_the_directory_is_refused(simple: Path, tmp_path: Path, where: str) -> None:
    outside = tmp_path / "outside.distcp"
    outside.write_bytes((simple / "__0_0.distcp").read_bytes())  # readable, and still refused
    if where == "absolute":
        where = str(outside)
    elif where == "link.distcp":
        (simple / where).symlink_to(outside)
    rewrite_metadata(simple, edit_storage("w", relative_path=where))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory"):
        load_dcp(simple)


def test_span_beyond_the_file_is_refused(simple: Path) -> None:
    size = (simple / "__0_0.distcp").stat().st_size
    rewrite_metadata(simple, edit_storage("w", offset=size - 10, length=1000))
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: 'w'.*truncated"):
        load_dcp(simple)


def test_truncated_data_file_is_refused(simple: Path) -> None:
    data = simple / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: '\w+'.*truncated"):
        load_dcp(simple)


def test_missing_data_file_is_refused(simple: Path) -> None:
    (simple / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp: missing, yet '\w+'"):
        load_dcp(simple)


@pytest.mark.parametrize("garbage", [b"", b"not a pickle at all", b"\x80\x04K\x07.", b"\x80\x05}"])
def test_garbage_metadata_is_refused(simple: Path, garbage: bytes) -> None:
    (simple / ".metadata").write_bytes(garbage)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        load_dcp(simple)


def test_flipped_bit_is_caught_by_the_crc(simple: Path) -> None:
    metadata = read_metadata(simple)
    info = metadata.storage_data[storage_of(metadata, "w")]
    data = bytearray((simple / info.relative_path).read_bytes())
    raw = torch.arange(12.0).numpy().tobytes()
    at = data.index(raw, info.offset)
    data[at + 5] ^= 0x10
    (simple / info.relative_path).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        load_dcp(simple)
    assert not torch.equal(load_dcp(simple, verify=False)["w"], torch.arange(12.0).reshape(3, 4))


def test_chunks_that_do_not_tile_are_refused_before_allocating(simple: Path) -> None:
    def huge(metadata: Metadata) -> None:
        meta = metadata.state_dict_metadata["w"]
        meta.size = torch.Size([1 << 40, 1 << 40])
        meta.chunks[0].sizes = torch.Size([1 << 40, 1 << 40])

    rewrite_metadata(simple, huge)
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        load_dcp(simple)

    save({"w": torch.ones(4, 4)}, simple)
    rewrite_metadata(
        simple, lambda m: setattr(m.state_dict_metadata["w"], "size", torch.Size([8, 4]))
    )
    with pytest.raises(CorruptCheckpointError, match="do not tile"):
        load_dcp(simple)


def test_shared_bytes_are_refused(simple: Path) -> None:
    metadata = read_metadata(simple)
    info = metadata.storage_data[storage_of(metadata, "b")]
    rewrite_metadata(simple, edit_storage("step", offset=info.offset, length=info.length))
    with pytest.raises(CorruptCheckpointError, match="share bytes"):
        load_dcp(simple)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: setattr(m, "version", "2.0.0"),
        lambda m: setattr(m, "layout_of_the_future", 1),
        edit_storage("w", transform_descriptors=["stream.zstd/1"]),
    ],
    ids=["version", "unknown-field", "zstd"],
)
def test_newer_layouts_are_unsupported(simple: Path, edit: Callable[[Metadata], None]) -> None:
    rewrite_metadata(simple, edit)
    with pytest.raises(UnsupportedFormatError):
        load_dcp(simple)


def test_not_a_checkpoint(simple: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_dcp(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError):
        load_dcp(tmp_path / "empty")
    (simple / ".metadata").unlink()  # data written, the commit never happened
    with pytest.raises(IncompleteCheckpointError):
        load_dcp(simple)


def test_dcp_directory_through_the_public_api(tmp_path: Path) -> None:
    import torchkeep as tk

    model = SimpleNet()
    path = save({"model": model.state_dict(), "epoch": 2}, tmp_path / "dcp")
    fresh = SimpleNet()
    assert tk.load_weights(fresh, path).ok
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert tk.load(path)["epoch"] == 2
    assert tk.load_state_dict(path).keys() == model.state_dict().keys()
    info = tk.describe(path)
    assert info.format == "torch.distributed.checkpoint directory"
    assert tk.verify(path).ok
    tk.convert(path, tmp_path / "converted")
    assert tk.load(tmp_path / "converted")["epoch"] == 2


def test_optimizer_state_saved_plainly_with_dcp_loads_into_an_optimizer(tmp_path: Path) -> None:
    """``dcp.save({"optimizer": optimizer.state_dict()})`` stores the int state keys as strings;
    loading into an optimizer must still give every parameter its state, not silently none."""
    import torchkeep as tk

    model = SimpleNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    path = save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ck")
    fresh = SimpleNet()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    tk.load(path, into={"model": fresh, "optimizer": fresh_optimizer})
    assert all(p in fresh_optimizer.state for p in fresh.parameters())
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]  # lr 0.01, from the checkpoint
    for k, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][k][name], value)
