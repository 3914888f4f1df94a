from __future__ import annotations

import pytest
import safetensors.torch
import torch

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, TiedLM, assert_same_state


def test_tutorial_weights_workflow(tmp_path):
    # torch.save(model.state_dict(), PATH); model.load_state_dict(torch.load(PATH)); model.eval()
    model = TheModelClass()
    tk.save_weights(model, tmp_path / "model.safetensors")

    loaded = TheModelClass()
    result = tk.load_weights(loaded, tmp_path / "model.safetensors")
    loaded.eval()

    assert result.ok
    assert_same_state(model, loaded)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_load_state_dict_then_module_load_state_dict(tmp_path):
    model = SimpleNet()
    tk.save_weights(model.state_dict(), tmp_path / "simple_net.safetensors")
    fresh = SimpleNet()
    fresh.load_state_dict(tk.load_state_dict(tmp_path / "simple_net.safetensors"))
    assert_same_state(model, fresh)


def test_file_is_standard_safetensors(tmp_path):
    model = TheModelClass()
    tk.save_weights(model, tmp_path / "model.safetensors")
    plain = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(plain) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(plain[key], value)


def test_reads_foreign_safetensors_file(tmp_path):
    model = SimpleNet()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "other.safetensors")
    fresh = SimpleNet()
    assert tk.load_weights(fresh, tmp_path / "other.safetensors").ok
    assert_same_state(model, fresh)


def test_tied_weights_stored_once_and_retied(tmp_path):
    model = TiedLM()
    info = tk.save_weights(model, tmp_path / "lm.safetensors")
    assert info.tensors == 3  # embed.weight (shared with head.weight), norm.weight, norm.bias

    state = tk.load_state_dict(tmp_path / "lm.safetensors")
    assert state["head.weight"] is state["embed.weight"]

    fresh = TiedLM()
    tk.load_weights(fresh, tmp_path / "lm.safetensors")
    assert fresh.head.weight is fresh.embed.weight
    assert_same_state(model, fresh)


def test_load_weights_reads_into_existing_parameters(tmp_path):
    model = SimpleNet()
    tk.save_weights(model, tmp_path / "w.safetensors")
    fresh = SimpleNet()
    pointers = {k: v.data_ptr() for k, v in fresh.state_dict().items()}
    tk.load_weights(fresh, tmp_path / "w.safetensors")
    assert {k: v.data_ptr() for k, v in fresh.state_dict().items()} == pointers
    assert_same_state(model, fresh)


def test_strict_load_names_every_problem(tmp_path):
    tk.save_weights(SimpleNet(), tmp_path / "w.safetensors")

    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 21)  # shape differs
            self.extra = torch.nn.Linear(2, 2)  # missing from the file

    target = Other()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(tk.StateMismatchError) as e:
        tk.load_weights(target, tmp_path / "w.safetensors")
    message = str(e.value)
    assert "extra.weight" in message and "fc2.weight" in message and "fc1.weight" in message
    assert "strict=False" in message
    # Nothing was loaded: the check happens before any read.
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_non_strict_load_reports_and_loads_the_rest(tmp_path):
    source = SimpleNet()
    tk.save_weights(source, tmp_path / "w.safetensors")

    class Partial(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 20)
            self.fc2 = torch.nn.Linear(20, 3)
            self.head = torch.nn.Linear(3, 1)

    target = Partial()
    result = tk.load_weights(target, tmp_path / "w.safetensors", strict=False)
    assert result.missing == ("head.weight", "head.bias")
    assert result.mismatched == ("fc2.weight", "fc2.bias")
    assert result.unexpected == ()
    assert not result.ok
    assert torch.equal(target.fc1.weight, source.fc1.weight)


def test_prefix_from_wrapper_is_explained(tmp_path):
    model = SimpleNet()
    wrapped = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    tk.save_weights(wrapped, tmp_path / "w.safetensors")
    with pytest.raises(tk.StateMismatchError, match=r"_orig_mod.*torch.compile"):
        tk.load_weights(SimpleNet(), tmp_path / "w.safetensors")


def test_dtype_on_save_and_load(tmp_path):
    model = SimpleNet()
    model.register_buffer("steps", torch.tensor(7))
    tk.save_weights(model, tmp_path / "half.safetensors", dtype=torch.bfloat16)
    state = tk.load_state_dict(tmp_path / "half.safetensors")
    assert state["fc1.weight"].dtype == torch.bfloat16
    assert state["steps"].dtype == torch.int64  # integers are never cast

    state32 = tk.load_state_dict(tmp_path / "half.safetensors", dtype=torch.float32)
    assert state32["fc1.weight"].dtype == torch.float32
    assert torch.equal(state32["fc1.weight"], model.fc1.weight.to(torch.bfloat16).float())

    # Loading bf16 weights into an fp32 model casts on the way in.
    fresh = SimpleNet()
    fresh.register_buffer("steps", torch.tensor(0))
    tk.load_weights(fresh, tmp_path / "half.safetensors")
    assert fresh.fc1.weight.dtype == torch.float32
    assert int(fresh.steps) == 7


def test_device_on_load(tmp_path):
    tk.save_weights(SimpleNet(), tmp_path / "w.safetensors")
    state = tk.load_state_dict(tmp_path / "w.safetensors", device="meta")
    assert state["fc1.weight"].device.type == "meta"


def test_lazy_load_maps_and_survives_overwrite(tmp_path):
    path = tmp_path / "w.safetensors"
    first = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 3)}
    tk.save_weights(first, path)
    lazy = tk.load_state_dict(path, lazy=True)
    assert torch.equal(lazy["a"], first["a"])

    tk.save_weights({"a": torch.zeros(1000), "b": torch.zeros(3, 3)}, path)
    # The mapped reader still sees the file it opened: the overwrite made a new file.
    assert torch.equal(lazy["a"], first["a"])
    assert torch.equal(lazy["b"], first["b"])
    assert torch.equal(tk.load_state_dict(path)["a"], torch.zeros(1000))

    # Mapped tensors are private copies on write: changing one never touches the file.
    lazy["a"][0] = 42.0
    assert tk.verify(path).ok


def test_save_weights_rejects_bad_input(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="step"):
        tk.save_weights({"w": torch.ones(2), "step": 3}, tmp_path / "w.safetensors")
    with pytest.raises(tk.UnsupportedObjectError, match="module or a dict"):
        tk.save_weights([torch.ones(1)], tmp_path / "w.safetensors")  # type: ignore[arg-type]
    with pytest.raises(tk.UnsupportedObjectError, match="metadata"):
        tk.save_weights({"w": torch.ones(1)}, tmp_path / "w.safetensors", metadata={"x": object()})


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".pkl"])
def test_pickle_suffix_is_refused_with_a_suggestion(tmp_path, suffix):
    target = tmp_path / f"model{suffix}"
    with pytest.raises(tk.UnsupportedFormatError, match=r"model\.safetensors"):
        tk.save_weights(SimpleNet(), target)
    assert not target.exists()


def test_weights_from_a_checkpoint(tmp_path):
    model = SimpleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tk.save_checkpoint(tmp_path / "ckpt.safetensors", model=model, optimizer=optimizer, epoch=1)
    fresh = SimpleNet()
    tk.load_weights(fresh, tmp_path / "ckpt.safetensors")
    assert_same_state(model, fresh)


def test_state_without_weights_is_refused_by_load_weights(tmp_path):
    tk.save({"epoch": 3, "notes": ["a"]}, tmp_path / "s.safetensors")
    with pytest.raises(tk.UnsupportedFormatError, match="no model weights"):
        tk.load_state_dict(tmp_path / "s.safetensors")


def test_sharded_weights_directory(tmp_path):
    from torchkeep.container import WriteOptions, write_container

    model = TheModelClass()
    # A tiny shard size forces several shards.
    write_container(str(tmp_path / "sharded"), model.state_dict(), kind="weights", options=WriteOptions(shard_bytes=40_000))
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "manifest.json" in files and len(files) > 3
    fresh = TheModelClass()
    tk.load_weights(fresh, tmp_path / "sharded")
    assert_same_state(model, fresh)
    assert tk.verify(tmp_path / "sharded").ok


def test_tied_keys_the_file_lacks_are_filled_through_their_tie(tmp_path):
    model = TiedLM()
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    safetensors.torch.save_file(state, tmp_path / "untied.safetensors")  # the head left out
    for strict in (True, False):
        fresh = TiedLM()
        assert tk.load_weights(fresh, tmp_path / "untied.safetensors", strict=strict).ok
        assert_same_state(model, fresh)
        assert fresh.head.weight is fresh.embed.weight
    # A module that does not tie the head still misses it.
    untied = TiedLM()
    untied.head.weight = torch.nn.Parameter(untied.embed.weight.detach().clone())
    with pytest.raises(tk.StateMismatchError, match=r"missing from the file: head\.weight"):
        tk.load_weights(untied, tmp_path / "untied.safetensors")
    result = tk.load_weights(untied, tmp_path / "untied.safetensors", strict=False)
    assert result.missing == ("head.weight",)


def test_tied_keys_are_read_once_into_their_shared_memory(tmp_path):
    model = TiedLM()
    torch.save(model.state_dict(), tmp_path / "model.pt")  # both names, one storage
    fresh = TiedLM()
    assert tk.load_weights(fresh, tmp_path / "model.pt").ok
    assert_same_state(model, fresh)
    assert fresh.head.weight is fresh.embed.weight
