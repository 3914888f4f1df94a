"""The API reads as one: device= wherever map_location= is, verify= on every loader, the
retention policy as one value, errnos on storage errors the operating system explains,
storage= where tests inject faults, and one name for what a loader reads: source."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_takes_device_as_the_other_loaders_do(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    tk.save({"w": torch.arange(4.0), "n": 3}, path)
    by_device = tk.load(path, device="cpu")
    by_location = tk.load(path, map_location="cpu")
    assert torch.equal(by_device["w"], by_location["w"]) and by_device["n"] == 3
    assert tk.load(path, device="cpu", map_location="cpu")["n"] == 3  # the same device twice
    with pytest.raises(ValueError, match="name two devices"):
        tk.load(path, device="cpu", map_location="meta")


def test_load_checkpoint_takes_device_and_verify(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = tmp_path / "ckpt.safetensors"
    tk.save_checkpoint(path, model=model, epoch=3)
    _flip_last_byte(path)
    with pytest.raises(tk.CorruptCheckpointError, match="checksum"):
        tk.load_checkpoint(path, model=nn.Linear(4, 2), device="cpu")
    unchecked = tk.load_checkpoint(path, model=nn.Linear(4, 2), device="cpu", verify=False)
    assert unchecked.epoch == 3
    with pytest.raises(ValueError, match="name two devices"):
        tk.load_checkpoint(path, model=nn.Linear(4, 2), device="cpu", map_location="meta")


def test_load_model_takes_verify(tmp_path: Path) -> None:
    path = tmp_path / "model"
    tk.save_model(nn.Linear(4, 2), path)
    _flip_last_byte(path / "shard-00000.safetensors")
    with pytest.raises(tk.CorruptCheckpointError, match="checksum"):
        tk.load_model(path)
    assert isinstance(tk.load_model(path, verify=False), nn.Linear)


def test_manager_takes_a_policy(tmp_path: Path) -> None:
    with tk.CheckpointManager(tmp_path / "run", policy=tk.Policy(keep_last=1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((2,), float(step))})
        assert mgr.steps() == [3] and mgr.policy == tk.Policy(keep_last=1)
    with pytest.raises(ValueError, match="not both"):
        tk.CheckpointManager(tmp_path / "run", keep_last=2, policy=tk.Policy(keep_last=1))
    with pytest.raises(TypeError, match=r"tk\.Policy"):
        tk.CheckpointManager(tmp_path / "run", policy={"keep_last": 1})  # type: ignore[arg-type]


def test_manager_storage_errors_carry_errnos(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a directory")
    with pytest.raises(tk.StorageError, match="not a directory") as refused:
        tk.CheckpointManager(tmp_path / "file")
    assert refused.value.errno == errno.ENOTDIR
    with (
        tk.CheckpointManager(tmp_path / "run") as writer,
        tk.CheckpointManager(tmp_path / "run") as second,
    ):
        writer.save(1, {"w": torch.ones(2)})
        with pytest.raises(tk.StorageError, match="another CheckpointManager") as busy:
            second.save(2, {"w": torch.ones(2)})
    assert busy.value.errno == errno.EWOULDBLOCK


def test_saves_take_a_storage_where_faults_are_injected(tmp_path: Path) -> None:
    from torchkeep.testing import FaultyStorage

    model = nn.Linear(4, 2)
    weights, state, whole = tmp_path / "w.safetensors", tmp_path / "s", tmp_path / "m"
    tk.save_weights(model, weights)
    tk.save({"model": model, "step": 1}, state)
    tk.save_model(model, whole)
    before = {p: tk.load(p) for p in (weights, state)}
    for step, save in [
        ("rename", lambda s: tk.save_weights(nn.Linear(4, 2), weights, storage=s)),
        ("commit", lambda s: tk.save({"model": nn.Linear(4, 2), "step": 2}, state, storage=s)),
        ("commit", lambda s: tk.save_model(nn.Linear(4, 2), whole, storage=s)),
    ]:
        with pytest.raises(OSError, match=f"injected failure at {step}"):
            save(FaultyStorage(step))
    for path, saved in before.items():  # the previous saves are whole
        again = tk.load(path, storage=FaultyStorage("rename", "raise"))  # reading writes nothing
        assert tk.diff(path, path).same and torch.equal(
            again["model"]["weight"] if "model" in again else again["weight"],
            saved["model"]["weight"] if "model" in saved else saved["weight"],
        )
    assert torch.equal(tk.load_model(whole).weight, model.weight)


def test_storage_and_storage_options_are_one_or_the_other(tmp_path: Path) -> None:
    from torchkeep.testing import FaultyStorage

    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="give them or a storage, not both"):
        tk.save_weights(
            nn.Linear(2, 2), path, storage=FaultyStorage("rename"), storage_options={"a": 1}
        )
    with pytest.raises(ValueError, match="give them or a storage, not both"):
        tk.CheckpointManager(
            tmp_path / "run", storage=FaultyStorage("commit"), storage_options={"a": 1}
        )
    assert not path.exists()


def test_every_loader_names_what_it_reads_source(tmp_path: Path) -> None:
    import inspect

    model = nn.Linear(4, 2)
    weights, ckpt, whole = tmp_path / "w.safetensors", tmp_path / "c.safetensors", tmp_path / "m"
    tk.save_weights(model, weights)
    tk.save_checkpoint(ckpt, model=model, epoch=2)
    tk.save_model(model, whole)
    readers = [tk.load, tk.load_checkpoint, tk.load_model, tk.load_state_dict, tk.describe]
    readers += [tk.verify, tk.scan]
    for reader in readers:
        assert "source" in inspect.signature(reader).parameters, reader.__name__
    assert torch.equal(tk.load(source=weights)["weight"], model.weight)
    assert torch.equal(tk.load(path=weights)["weight"], model.weight)  # the earlier name
    assert tk.load_checkpoint(source=ckpt, model=nn.Linear(4, 2)).epoch == 2
    assert tk.load_checkpoint(path=ckpt).path == str(ckpt)
    assert torch.equal(tk.load_model(source=whole).weight, model.weight)
    assert torch.equal(tk.load_model(path=whole).weight, model.weight)
    for reader in (tk.load, tk.load_checkpoint, tk.load_model):
        with pytest.raises(TypeError, match=r"source= or as path= \(its earlier name\), not both"):
            reader(weights, path=weights)
        with pytest.raises(TypeError, match=r"missing 1 required argument: 'source'"):
            reader()
