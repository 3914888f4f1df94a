"""Reading what users already have: torch.save files, Hugging Face layouts, wrapper prefixes;
and refusing, without running anything, every hostile pickle."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, TiedLM, assert_same_state, assert_same_tree
from hostile import Evil as _Evil
from hostile import pickle_files as _hostile_files
from hostile import zip_with as _zip_with


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-1.6"])
def test_state_dict_from_torch_save(tmp_path, zip_format):
    model = TheModelClass()
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)

    fresh = TheModelClass()
    assert tk.load_weights(fresh, path).ok
    assert_same_state(model, fresh)
    state = tk.load_state_dict(path)
    assert list(state) == list(model.state_dict())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-1.6"])
def test_general_checkpoint_from_torch_save(tmp_path, zip_format):
    model = SimpleNet()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    base = torch.arange(12.0)
    obj = {
        "epoch": 7,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": torch.tensor(0.5),
        "views": [base, base[2:6], base.view(3, 4).t()],
        "types": {
            "bf16": torch.randn(3).bfloat16(),
            "i64": torch.arange(4),
            "bool": torch.tensor([True, False]),
            "f16": torch.randn(2).half(),
        },
        "args": argparse.Namespace(lr=0.1, name="run"),
        "np_loss": np.float64(1.25),
        "np_step": np.int64(9),
        "bytes": b"\x00\x01",
        "set": {1, 2},
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
    }
    path = tmp_path / "ckpt.tar"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)

    back = tk.load(path)
    assert back["epoch"] == 7 and torch.equal(back["loss"], obj["loss"])
    assert str(back["optimizer_state_dict"]) == str(optimizer.state_dict())
    for a, b in zip(back["views"], obj["views"], strict=True):
        assert torch.equal(a, b)
    assert (
        back["views"][1].untyped_storage().data_ptr()
        == back["views"][0].untyped_storage().data_ptr()
    )
    for key, value in obj["types"].items():
        assert back["types"][key].dtype == value.dtype and torch.equal(back["types"][key], value)
    assert back["args"] == {"lr": 0.1, "name": "run"} and back["args"].lr == 0.1
    assert back["np_loss"] == 1.25 and back["np_step"] == 9
    assert back["bytes"] == b"\x00\x01" and back["set"] == {1, 2}
    assert back["size"] == torch.Size([2, 3]) and back["dtype"] is torch.float16

    # The tutorial's resume path, through torchkeep.
    fresh = SimpleNet()
    fresh_opt = torch.optim.Adam(fresh.parameters())
    tk.load(path, into={"model_state_dict": fresh, "optimizer_state_dict": fresh_opt})
    assert_same_state(model, fresh)
    assert str(fresh_opt.state_dict()) == str(optimizer.state_dict())

    # And it converts to a torchkeep checkpoint with no pickle in it.
    back.pop("set")  # sets have no JSON form: tk.save asks for a sorted list
    tk.save(back, tmp_path / "converted.safetensors")
    again = tk.load(tmp_path / "converted.safetensors")
    assert torch.equal(again["model_state_dict"]["fc1.weight"], model.fc1.weight)


def test_lightning_checkpoint(tmp_path, monkeypatch):
    # Lightning stores hyper-parameters in its own AttributeDict. Pickle it from a stand-in
    # module of that name, then remove the module: torchkeep must not need (or import) it.
    module = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = module.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    module.AttributeDict = AttributeDict
    for parent in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    model = SimpleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": AttributeDict(hidden=20, lr=0.1),
    }
    path = tmp_path / "epoch=3-step=120.ckpt"
    torch.save(ckpt, path)
    monkeypatch.delitem(sys.modules, module.__name__)

    back = tk.load(path)
    assert back["hyper_parameters"] == {"hidden": 20, "lr": 0.1}
    assert back["global_step"] == 120
    fresh = SimpleNet()
    tk.load_weights(fresh, path, strip_prefix="model.")
    assert_same_state(model, fresh)


def test_wrapper_prefixes(tmp_path):
    model = SimpleNet()
    for prefix, who in (("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile")):
        path = tmp_path / f"{who}.pth"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
        with pytest.raises(tk.StateMismatchError) as e:
            tk.load_weights(SimpleNet(), path)
        assert who in str(e.value) and f'strip_prefix="{prefix}"' in str(e.value)
        assert "fc1.weight" in str(e.value)  # named, not a wall of every key
        fresh = SimpleNet()
        assert tk.load_weights(fresh, path, strip_prefix=prefix).ok
        assert_same_state(model, fresh)


def test_hugging_face_layouts(tmp_path):
    model = TiedLM()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # untied copies, as HF saves

    single = tmp_path / "single"
    single.mkdir()
    safetensors.torch.save_file(state, single / "model.safetensors")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[:2],
        "model-00002-of-00002.safetensors": keys[2:],
    }
    for file, names in shards.items():
        safetensors.torch.save_file({k: state[k] for k in names}, sharded / file)
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(state, binary / "pytorch_model.bin")

    bin_sharded = tmp_path / "bin_sharded"
    bin_sharded.mkdir()
    torch.save({k: state[k] for k in keys[:2]}, bin_sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[2:]}, bin_sharded / "pytorch_model-00002-of-00002.bin")
    bin_index = {
        "weight_map": {
            k: f"pytorch_model-0000{1 if k in keys[:2] else 2}-of-00002.bin" for k in keys
        }
    }
    (bin_sharded / "pytorch_model.bin.index.json").write_text(json.dumps(bin_index))

    for directory in (single, sharded, binary, bin_sharded):
        loaded = tk.load_state_dict(directory)
        assert set(loaded) == set(state), directory
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        fresh = TiedLM()
        assert tk.load_weights(fresh, directory).ok


def test_hugging_face_index_problems(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    safetensors.torch.save_file(state, tmp_path / "one.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"a": "one.safetensors", "b": "../escape.safetensors"}})
    )
    with pytest.raises(tk.CorruptCheckpointError, match="outside"):
        tk.load_state_dict(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "c": "two.safetensors"}}))
    with pytest.raises(tk.CorruptCheckpointError, match="missing"):
        tk.load_state_dict(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "x": "one.safetensors"}}))
    with pytest.raises(tk.CorruptCheckpointError, match="holds"):
        tk.load_state_dict(tmp_path)
    index.write_text("{not json")
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_state_dict(tmp_path)


def test_corrupt_torch_zip_is_detected(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.randn(1000)}, path)
    data = bytearray(path.read_bytes())
    record = data.find(b"data/0") + 200  # inside the tensor bytes after the local header
    data[record] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tk.CorruptCheckpointError, match="CRC"):
        tk.load(path)
    assert not tk.verify(path).ok
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(tk.TorchkeepError):
        tk.load(path)


# ---------------------------------------------------------------------------------------------
# hostile files: each must end in a TorchkeepError and run nothing


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hostile_files_never_run_code(tmp_path):
    canary = tmp_path / "canary"
    files = _hostile_files(tmp_path, str(canary))
    assert len(files) >= 15
    for name, data in files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        for load in (tk.load, tk.load_state_dict, tk.describe):
            with pytest.raises(tk.TorchkeepError) as e:
                load(path)
            assert str(path) in str(e.value), (name, load.__name__, str(e.value))
        assert not tk.verify(path).ok, name
        report = tk.scan(path)
        assert not report.safe or name in ("png-renamed", "empty", "plain-pickle-not-torch"), name
        assert not canary.exists(), f"{name} ran code"


def test_unsafe_error_lists_every_offending_global(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(1), "evil": _Evil(str(tmp_path / "c")), "od": OrderedDict()}, path)
    with pytest.raises(tk.UnsafeFileError) as e:
        tk.load(path)
    assert "posix.system" in str(e.value) and "torchkeep scan" in str(e.value)
    assert "OrderedDict" not in str(e.value)
    report = tk.scan(path)
    assert report.unsafe == ("posix.system",)
    assert (
        "collections.OrderedDict" in report.globals
        and "torch._utils._rebuild_tensor_v2" in report.globals
    )
    assert not report.safe and "posix.system" in report.verdict


def test_scan_of_safe_files(tmp_path):
    torch.save(SimpleNet().state_dict(), tmp_path / "w.pth")
    report = tk.scan(tmp_path / "w.pth")
    assert report.safe and report.format == "torch zip" and report.unsafe == ()
    tk.save_weights(SimpleNet(), tmp_path / "w.safetensors")
    assert tk.scan(tmp_path / "w.safetensors").safe


def test_describe_torch_file_reads_no_data(tmp_path):
    torch.save(TheModelClass().state_dict(), tmp_path / "m.pth")
    info = tk.describe(tmp_path / "m.pth")
    assert info.format == "torch zip (pickle)"
    names = {t.name: t for t in info.tensors}
    assert names["conv1.weight"].shape == (6, 3, 5, 5) and names["conv1.weight"].dtype == "F32"


def test_storage_claims_are_checked_before_allocating(tmp_path):
    # A storage reference claiming far more elements than its zip entry holds.
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    raw = bytearray(buffer.getvalue())
    path = tmp_path / "liar.pt"
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04", b"J\x00\x00\x00\x40", 1)  # numel 4 -> 2**30
    _zip_with(path, members)
    with pytest.raises(tk.CorruptCheckpointError, match="claims"):
        tk.load(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_torch_zips(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]

    duplicate = tmp_path / "duplicate.pt"
    with zipfile.ZipFile(duplicate, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{prefix}data/0", b"\x00" * 16)  # the same name again
    with pytest.raises(tk.CorruptCheckpointError, match="twice"):
        tk.load(duplicate)

    escaping = tmp_path / "escaping.pt"
    _zip_with(escaping, {**members, "../outside": b"x"})
    with pytest.raises(tk.CorruptCheckpointError, match="escapes"):
        tk.load(escaping)

    missing = tmp_path / "missing.pt"
    _zip_with(missing, {n: d for n, d in members.items() if "/data/" not in n})
    with pytest.raises(tk.CorruptCheckpointError, match="missing"):
        tk.load(missing)

    two_pickles = tmp_path / "two.pt"
    _zip_with(two_pickles, {**members, "other/data.pkl": members[pkl]})
    with pytest.raises(tk.UnsupportedFormatError, match=r"data\.pkl"):
        tk.load(two_pickles)

    big_endian = tmp_path / "big.pt"  # read byte-swapped, as torch reads it
    _zip_with(big_endian, {**members, f"{prefix}byteorder": b"big"})
    reference = torch.load(big_endian, weights_only=True)
    assert_same_tree(tk.load(big_endian), reference)


def test_describe_hugging_face_directory(tmp_path):
    state = {k: v.clone() for k, v in TiedLM().state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    info = tk.describe(tmp_path)
    assert info.format == "Hugging Face directory"
    assert {t.name for t in info.tensors} == set(state)
    assert info.modules == {"embed": 800, "norm": 32, "head": 800}


def test_a_file_cannot_change_how_later_files_are_read(tmp_path):
    # BUILD applied to allowlisted objects: a storage type, a rebuild function, a class.
    attacks = {
        "storage-type": b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypectorch\nfloat64\nsb.",
        "function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__)sb.",
        "class": b"\x80\x02cargparse\nNamespace\nN}X\x0b\x00\x00\x00__getattr__Ns\x86b.",
    }
    for name, payload in attacks.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(payload)
        with pytest.raises(tk.TorchkeepError):
            tk.load(path)
    w = torch.randn(3)
    torch.save({"w": w}, tmp_path / "after.pt")
    back = tk.load(tmp_path / "after.pt")
    assert back["w"].dtype == torch.float32 and torch.equal(back["w"], w)
    assert tk.load(tmp_path / "after.pt")  # the rebuild functions still validate and work


def test_new_dtypes_through_untyped_storage(tmp_path):
    state = {
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
    }
    torch.save(state, tmp_path / "new.pt")
    back = tk.load(tmp_path / "new.pt")
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key].view(torch.uint8), value.view(torch.uint8))


def test_verify_hugging_face_directory(tmp_path):
    state = {k: v.clone() for k, v in TiedLM().state_dict().items()}
    tk.save_weights(state, tmp_path / "model.safetensors")
    report = tk.verify(tmp_path)
    assert report.ok and report.checksummed and report.tensors == len(state)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    report = tk.verify(tmp_path)
    assert not report.ok and "checksum" in report.problems[0]
