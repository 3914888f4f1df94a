from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

import torchkeep as tk
from conftest import SimpleNet, TiedLM, assert_same_state


def _trained(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 10)).square().mean().backward()
        optimizer.step()


def test_any_nested_state_round_trips_exactly(tmp_path):
    obj = {
        "ints": [0, -1, 2**62, 2**80],
        "floats": (0.1, -0.0, math.inf, -math.inf, 1e-310),
        "nan": math.nan,
        "flags": [True, False, None],
        "text": "κλειδί",
        "raw": b"\x00\xffbytes",
        "int_keys": {0: "a", 7: "b", -3: "c"},
        "mixed_keys": {(1, "x"): 1.5, None: 2, 2.5: "f", True: "t"},
        "dollar": {"$tensor": "not a tensor", "$dict": 1},
        "empty": {"list": [], "dict": {}, "tuple": ()},
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "tensors": [torch.arange(6).reshape(2, 3), torch.zeros(0), torch.tensor(3.5)],
        "types": {
            "bf16": torch.randn(4).bfloat16(),
            "bool": torch.tensor([True, False]),
            "u8": torch.arange(5, dtype=torch.uint8),
            "i16": torch.arange(5, dtype=torch.int16),
            "f16": torch.randn(3).half(),
            "f64": torch.randn(3).double(),
        },
    }
    tk.save(obj, tmp_path / "state.safetensors")
    back = tk.load(tmp_path / "state.safetensors")

    assert back["ints"] == obj["ints"]
    assert back["floats"] == obj["floats"] and isinstance(back["floats"], tuple)
    assert math.copysign(1, back["floats"][1]) == -1
    assert math.isnan(back["nan"])
    assert back["flags"] == [True, False, None]
    assert back["text"] == "κλειδί" and back["raw"] == b"\x00\xffbytes"
    assert back["int_keys"] == {0: "a", 7: "b", -3: "c"}
    assert back["mixed_keys"] == obj["mixed_keys"]
    assert back["dollar"] == obj["dollar"]
    assert back["empty"] == {"list": [], "dict": {}, "tuple": ()}
    assert back["dtype"] is torch.bfloat16 and back["device"] == torch.device("cpu")
    assert back["size"] == torch.Size([2, 3]) and isinstance(back["size"], torch.Size)
    for a, b in zip(back["tensors"], obj["tensors"], strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    for key, value in obj["types"].items():
        assert back["types"][key].dtype == value.dtype
        assert torch.equal(back["types"][key], value)


def test_state_is_one_standard_safetensors_file(tmp_path):
    import safetensors

    tk.save({"a": {"b": torch.ones(2)}, "c": [torch.zeros(1)]}, tmp_path / "s.safetensors")
    with safetensors.safe_open(tmp_path / "s.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["a.b", "c.0"]
        assert "torchkeep" in f.metadata()


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = SimpleNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    _trained(model, optimizer)
    tk.save({"optimizer": optimizer}, tmp_path / "opt.safetensors")

    back = tk.load(tmp_path / "opt.safetensors")["optimizer"]
    expected = optimizer.state_dict()
    assert back["param_groups"] == expected["param_groups"]
    assert list(back["state"]) == list(expected["state"]) == [0, 1, 2, 3]
    for index, slots in expected["state"].items():
        for name, value in slots.items():
            assert torch.equal(back["state"][index][name], value)
            assert back["state"][index][name].dtype == value.dtype

    # The plain state dict loads into a fresh optimizer, and training continues identically.
    fresh_model = SimpleNet()
    fresh_model.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1.0)
    fresh.load_state_dict(back)
    torch.manual_seed(1)
    _trained(model, optimizer)
    torch.manual_seed(1)
    _trained(fresh_model, fresh)
    assert_same_state(model, fresh_model)


def test_stateful_objects_and_in_place_restore(tmp_path):
    model = SimpleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _trained(model, optimizer)
    scheduler.step()
    scheduler.step()
    buffer = torch.arange(4.0)
    tk.save(
        {"model": model, "opt": optimizer, "sched": scheduler, "scaler": scaler, "buf": buffer},
        tmp_path / "all.safetensors",
    )

    m2 = SimpleNet()
    o2 = torch.optim.SGD(m2.parameters(), lr=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=9)
    sc2 = torch.amp.GradScaler("cpu")
    buf2 = torch.zeros(4)
    pointer = buf2.data_ptr()
    out = tk.load(
        tmp_path / "all.safetensors",
        into={"model": m2, "opt": o2, "sched": s2, "scaler": sc2, "buf": buf2},
    )
    assert out["model"] is m2 and out["buf"] is buf2
    assert buf2.data_ptr() == pointer and torch.equal(buf2, buffer)
    assert_same_state(model, m2)
    assert o2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert s2.state_dict() == scheduler.state_dict()
    assert sc2.state_dict() == scaler.state_dict()


def test_into_reads_straight_into_module_parameters(tmp_path):
    model = SimpleNet()
    tk.save({"model": model}, tmp_path / "m.safetensors")
    fresh = SimpleNet()
    pointers = [p.data_ptr() for p in fresh.parameters()]
    tk.load(tmp_path / "m.safetensors", into={"model": fresh})
    assert [p.data_ptr() for p in fresh.parameters()] == pointers
    assert_same_state(model, fresh)


def test_into_mismatch_is_explained(tmp_path):
    tk.save({"model": SimpleNet(), "w": torch.zeros(3)}, tmp_path / "m.safetensors")
    with pytest.raises(tk.StateMismatchError, match="w: into= holds a tensor of shape"):
        tk.load(tmp_path / "m.safetensors", into={"w": torch.zeros(4)})
    with pytest.raises(tk.StateMismatchError, match="optimizer"):
        tk.load(tmp_path / "m.safetensors", into={"optimizer": torch.optim.SGD([torch.zeros(1)])})
    with pytest.raises(tk.StateMismatchError, match="model: the saved state does not fit"):
        tk.load(tmp_path / "m.safetensors", into={"model": TiedLM()})


def test_unsupported_object_names_its_path(tmp_path):
    class Config:
        pass

    target = tmp_path / "x.safetensors"
    with pytest.raises(tk.UnsupportedObjectError, match=r"^a\.b: cannot store a .*Config"):
        tk.save({"a": {"b": Config()}}, target)
    with pytest.raises(tk.UnsupportedObjectError, match=r"items\.1: .*sorted list"):
        tk.save({"items": [1, {2, 3}]}, target)
    with pytest.raises(tk.UnsupportedObjectError, match=r"^s: torch\._mkldnn .*to_dense"):
        tk.save({"s": torch.zeros(2, 2).to_mkldnn()}, target)  # sparse layouts are stored
    with pytest.raises(tk.UnsupportedObjectError, match="key"):
        tk.save({"d": {object(): 1}}, target)
    with pytest.raises(TypeError):  # also a TypeError, for code that catches that
        tk.save(lambda: 0, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_numpy_values_get_a_hint(tmp_path):
    import numpy as np

    with pytest.raises(tk.UnsupportedObjectError, match=r"torch\.from_numpy"):
        tk.save({"arr": np.zeros(3)}, tmp_path / "x.safetensors")


def test_shared_tensors_are_stored_once(tmp_path):
    base = torch.randn(8)
    obj = {"a": base, "b": base, "nested": [base], "view": base[:4]}
    info = tk.save(obj, tmp_path / "s.safetensors")
    assert info.tensors == 2  # base once, plus the partial view as its own tensor
    back = tk.load(tmp_path / "s.safetensors")
    assert back["a"] is back["b"] and back["nested"][0] is back["a"]
    assert torch.equal(back["view"], base[:4])


def test_non_contiguous_and_grad_tensors(tmp_path):
    t = torch.randn(6, 4).t()
    w = torch.randn(3, requires_grad=True)
    tk.save({"t": t, "w": w}, tmp_path / "s.safetensors")
    back = tk.load(tmp_path / "s.safetensors")
    assert torch.equal(back["t"], t) and back["t"].shape == (4, 6)
    assert torch.equal(back["w"], w.detach()) and not back["w"].requires_grad


def test_large_tensor_is_split_and_verified(tmp_path):
    big = torch.randn(5 * (16 << 20) // 4 + 123)  # spans several checksum chunks
    tk.save({"big": big, "small": torch.ones(3)}, tmp_path / "big.safetensors")
    assert torch.equal(tk.load(tmp_path / "big.safetensors")["big"], big)
    assert tk.verify(tmp_path / "big.safetensors").ok


def test_many_small_tensors(tmp_path):
    state = {f"layer{i}.w": torch.full((i % 7 + 1,), float(i)) for i in range(3000)}
    tk.save(state, tmp_path / "many.safetensors")
    back = tk.load(tmp_path / "many.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_directory_target(tmp_path):
    obj = {"model": SimpleNet().state_dict(), "step": 10}
    tk.save(obj, tmp_path / "step_10")
    assert sorted(p.name for p in (tmp_path / "step_10").iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
    ]
    back = tk.load(tmp_path / "step_10")
    assert back["step"] == 10
    # Saving again replaces the directory as a whole.
    tk.save({"step": 11}, tmp_path / "step_10")
    assert tk.load(tmp_path / "step_10") == {"step": 11}
    assert [p.name for p in tmp_path.iterdir()] == ["step_10"]


def test_map_location_and_dtype(tmp_path):
    tk.save({"w": torch.randn(3), "n": torch.tensor(4)}, tmp_path / "s.safetensors")
    back = tk.load(tmp_path / "s.safetensors", map_location="meta", dtype=torch.float16)
    assert back["w"].device.type == "meta" and back["w"].dtype == torch.float16
    assert back["n"].dtype == torch.int64


def test_metadata_is_stored_and_described(tmp_path):
    tk.save({"x": 1}, tmp_path / "s.safetensors", metadata={"run": "r1", "lr": [0.1, 0.01]})
    info = tk.describe(tmp_path / "s.safetensors")
    assert info.metadata == {"run": "r1", "lr": [0.1, 0.01]}
    assert info.format == "torchkeep file" and info.kind == "state" and info.checksummed


def test_ordered_dict_state_dict_loads_into_module(tmp_path):
    model = SimpleNet()
    state = model.state_dict()
    assert isinstance(state, OrderedDict)
    tk.save(state, tmp_path / "sd.safetensors")
    fresh = SimpleNet()
    fresh.load_state_dict(tk.load(tmp_path / "sd.safetensors"))
    assert_same_state(model, fresh)


def test_a_save_is_written_as_the_lowest_format_version_that_holds_it(tmp_path):
    def version(path):
        return tk.describe(path).format_version

    tk.save({"w": torch.ones(2), "n": 1}, tmp_path / "plain.safetensors")
    assert version(tmp_path / "plain.safetensors") == 1
    tk.save({"model": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "versions.safetensors")
    assert version(tmp_path / "versions.safetensors") == 3  # the state dict's _metadata
    tk.save({"z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "complex.safetensors")
    assert version(tmp_path / "complex.safetensors") == 3  # a dtype of version 3
    plain = {k: v.clone() for k, v in torch.nn.Linear(2, 2).state_dict().items()}
    tk.save({"model": plain}, tmp_path / "dict.safetensors")  # a plain dict has no _metadata
    assert version(tmp_path / "dict.safetensors") == 1


def test_a_nested_tensor_is_refused_with_what_to_store_instead(tmp_path):
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(tk.UnsupportedObjectError, match=r"x: a nested tensor .*list\(t.unbind\(\)\)"):
        tk.save({"x": nested}, tmp_path / "n.safetensors")
    assert not (tmp_path / "n.safetensors").exists()
