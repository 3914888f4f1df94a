from __future__ import annotations

import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, TiedLM, assert_same_state


def test_convert_torch_file_to_safetensors(tmp_path):
    model = TheModelClass()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    info = tk.convert(tmp_path / "model.pth", tmp_path / "model.safetensors")
    assert info.tensors == len(model.state_dict())
    plain = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    assert tk.verify(tmp_path / "model.safetensors").ok


def test_convert_general_checkpoint_keeps_everything(tmp_path):
    model = SimpleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 10)).sum().backward()
    optimizer.step()
    torch.save(
        {
            "epoch": 4,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
        },
        tmp_path / "ckpt.tar",
    )
    tk.convert(tmp_path / "ckpt.tar", tmp_path / "ckpt")
    fresh, fresh_opt = SimpleNet(), torch.optim.SGD(SimpleNet().parameters(), lr=1.0)
    ckpt = tk.load_checkpoint(tmp_path / "ckpt", model=fresh, optimizer=fresh_opt, rng=False)
    assert ckpt.epoch == 4
    assert_same_state(model, fresh)
    assert fresh_opt.param_groups[0]["lr"] == 0.1


def test_convert_with_dtype_for_deployment(tmp_path):
    model = SimpleNet()
    model.register_buffer("count", torch.tensor(3))
    tk.save_weights(model, tmp_path / "fp32.safetensors")
    tk.convert(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    half = tk.load_state_dict(tmp_path / "bf16.safetensors")
    assert half["fc1.weight"].dtype == torch.bfloat16 and half["count"].dtype == torch.int64
    assert os.path.getsize(tmp_path / "bf16.safetensors") < os.path.getsize(
        tmp_path / "fp32.safetensors"
    )
    assert torch.equal(half["fc1.weight"], model.fc1.weight.detach().bfloat16())


def test_convert_to_hugging_face_shards(tmp_path):
    model = TiedLM(vocab=500, dim=64)
    tk.save_weights(model, tmp_path / "lm.safetensors")
    info = tk.convert(tmp_path / "lm.safetensors", tmp_path / "hf", max_shard_size="100KB")
    names = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert info.files[-1] == "model.safetensors.index.json"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    # The tied head is stored once, and left out of the index as transformers does: it lists
    # only the names each shard holds.
    assert set(index["weight_map"]) == {"embed.weight", "norm.weight", "norm.bias"}
    # Any safetensors reader loads each shard; torchkeep reads the directory as one.
    for shard in shards:
        safetensors.torch.load_file(tmp_path / "hf" / shard)
    fresh = TiedLM(vocab=500, dim=64)
    assert tk.load_weights(fresh, tmp_path / "hf").ok
    assert_same_state(model, fresh)


def test_convert_refusals(tmp_path):
    tk.save({"epoch": 1, "w": torch.ones(2)}, tmp_path / "state.safetensors")
    with pytest.raises(tk.UnsupportedFormatError, match="more than model weights"):
        tk.convert(tmp_path / "state.safetensors", tmp_path / "hf", max_shard_size="1MB")
    tk.save_weights(SimpleNet(), tmp_path / "w.safetensors")
    with pytest.raises(tk.UnsupportedFormatError, match="directory"):
        tk.convert(tmp_path / "w.safetensors", tmp_path / "x.safetensors", max_shard_size="1MB")
    with pytest.raises(ValueError, match="size"):
        tk.convert(tmp_path / "w.safetensors", tmp_path / "hf", max_shard_size="lots")
    with pytest.raises(tk.UnsupportedFormatError, match="safetensors"):
        tk.convert(tmp_path / "w.safetensors", tmp_path / "out.pt")
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.convert(tmp_path / "missing.pth", tmp_path / "out.safetensors")


def test_diff(tmp_path):
    a = {"w": torch.zeros(3), "b": torch.ones(2), "epoch": 1, "gone": 5, "same": torch.arange(3)}
    b = {
        "w": torch.tensor([0.0, 0.5, -2.0]),
        "b": torch.ones(3),
        "epoch": 2,
        "new": "x",
        "same": torch.arange(3),
    }
    tk.save(a, tmp_path / "a.safetensors")
    tk.save(b, tmp_path / "b.safetensors")
    d = tk.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert d.added == ("new",) and d.removed == ("gone",)
    changes = {c.name: c for c in d.changed}
    assert changes["w"].what == "values" and changes["w"].max_abs_diff == 2.0
    assert changes["b"].what == "shape [2] → [3]"
    assert changes["epoch"].what == "1 → 2"
    assert d.unchanged == 1 and not d.same
    assert tk.diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors").same
    # Across formats: a torch.save file against its conversion.
    torch.save(a, tmp_path / "a.pt")
    assert tk.diff(tmp_path / "a.pt", tmp_path / "a.safetensors").same


def test_convert_of_a_corrupt_torch_file_commits_nothing(tmp_path):
    source = tmp_path / "model.pth"
    torch.save({f"w{i}": torch.randn(100_000) for i in range(8)}, source)
    data = bytearray(source.read_bytes())
    data[data.find(b"data/5") + 300_000] ^= 0xFF  # inside a storage, past the small headers
    source.write_bytes(bytes(data))
    target = tmp_path / "model.safetensors"
    tk.save_weights({"previous": torch.ones(2)}, target)
    with pytest.raises(tk.CorruptCheckpointError, match="CRC-32"):
        tk.convert(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model.safetensors"]
    assert torch.equal(tk.load_state_dict(target)["previous"], torch.ones(2))
    with pytest.raises(tk.CorruptCheckpointError):
        tk.convert(source, tmp_path / "as_dir")
    assert not (tmp_path / "as_dir").exists()


def test_convert_refuses_unsafe_torch_file_before_writing(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'canary'}",))

    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(tk.UnsafeFileError):
        tk.convert(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]
