"""CUDA paths: saving from and loading onto the GPU, RNG state of CUDA devices, whole models
moved to the GPU (rebuilt and exported). These run where a CUDA device is present; the rest of
the suite covers the same code on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, assert_same_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_weights_from_the_gpu_load_onto_it(tmp_path):
    model = TheModelClass().cuda()
    tk.save_weights(model, tmp_path / "m.safetensors")
    state = tk.load_state_dict(tmp_path / "m.safetensors", device="cuda")
    assert all(t.device.type == "cuda" for t in state.values())
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)


def test_load_weights_into_a_gpu_model(tmp_path):
    source = SimpleNet()
    tk.save_weights(source, tmp_path / "m.safetensors")
    target = SimpleNet().cuda()
    tk.load_weights(target, tmp_path / "m.safetensors")
    assert all(p.device.type == "cuda" for p in target.parameters())
    assert_same_state(source, target.cpu())


def test_gpu_training_state_round_trips_with_map_location(tmp_path):
    model = SimpleNet().cuda()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 10, device="cuda")).sum().backward()
    optimizer.step()
    tk.save({"model": model, "optimizer": optimizer, "step": 1}, tmp_path / "s.safetensors")

    on_cpu = tk.load(tmp_path / "s.safetensors", map_location="cpu")
    assert on_cpu["model"]["fc1.weight"].device.type == "cpu"
    restored_model = SimpleNet().cuda()
    restored_opt = torch.optim.Adam(restored_model.parameters())
    tk.load(
        tmp_path / "s.safetensors",
        into={"model": restored_model, "optimizer": restored_opt, "step": None},
    )
    assert_same_state(model, restored_model)
    a, b = optimizer.state_dict()["state"], restored_opt.state_dict()["state"]
    for index in a:
        assert torch.equal(a[index]["exp_avg"], b[index]["exp_avg"])
        assert b[index]["exp_avg"].device.type == "cuda"


def test_checkpoint_restores_cuda_random_state(tmp_path):
    model = SimpleNet().cuda()
    torch.cuda.manual_seed_all(3)
    tk.save_checkpoint(tmp_path / "c.safetensors", model=model, epoch=1)
    expected = torch.randn(8, device="cuda")
    torch.randn(100, device="cuda")
    tk.load_checkpoint(tmp_path / "c.safetensors", model=model)
    assert torch.equal(torch.randn(8, device="cuda"), expected)


class Small(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def test_saved_model_rebuilds_on_the_gpu(tmp_path):
    model = Small(width=32).cuda().eval()
    tk.save_model(model, tmp_path / "m")
    loaded = tk.load_model(tmp_path / "m", device="cuda")
    x = torch.randn(5, 8, device="cuda")
    assert next(loaded.parameters()).device.type == "cuda"
    assert torch.equal(loaded(x), model(x))
    half = tk.load_model(tmp_path / "m", device="cuda", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.allclose(half(x.bfloat16()).float(), model(x), atol=0.1)


@pytest.mark.parametrize("exported_on", ["cpu", "cuda"])
def test_exported_program_moves_between_cpu_and_gpu(tmp_path, exported_on):
    model = Small(width=32).eval()
    x = torch.randn(5, 8)
    expected = model(x)
    tk.save_model(model.to(exported_on), tmp_path / "m", example_inputs=x[:1].to(exported_on))
    tk.save({"x": x, "expected": expected}, tmp_path / "io.safetensors")
    # A fresh process that lacks this test module's code: only the program can load it.
    script = textwrap.dedent(
        f"""
        import torch, torchkeep as tk
        io = tk.load({str(tmp_path / "io.safetensors")!r})
        for device in ("cuda", "cpu"):
            model = tk.load_model({str(tmp_path / "m")!r}, device=device)
            out = model(io["x"].to(device))
            assert out.device.type == device, out.device
            assert torch.allclose(out.cpu(), io["expected"], atol=1e-5), device
            assert model(torch.randn(17, 8, device=device)).shape == (17, 4)
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_manager_saves_gpu_state_and_restores_it(tmp_path, async_save):
    model = SimpleNet().cuda()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 10, device="cuda")).sum().backward()
    optimizer.step()
    state = {"model": model, "optimizer": optimizer, "rng": tk.RNGState()}
    with tk.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        mgr.save(1, state)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # changed at once: the save holds the values it was given
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        if async_save:  # the staging buffers of GPU tensors are pinned host memory
            assert all(b.is_pinned() for b in mgr._background.staging.values() if b.numel())
    restored = SimpleNet().cuda()
    state = {"model": restored, "optimizer": torch.optim.Adam(restored.parameters()),
             "rng": tk.RNGState()}  # fmt: skip
    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(state) == 1
    for key, value in restored.state_dict().items():
        assert value.device.type == "cuda"
        assert torch.equal(value, expected[key])


def _big_state():
    # Large tensors cut in several 16 MiB pieces, small ones batched, several dtypes.
    state = {f"layer{i}.weight": torch.randn(3000, 2048) for i in range(3)}
    state.update({f"norm{i}.bias": torch.randn(512).half() for i in range(50)})
    state["step"] = torch.tensor(7)
    return state


def test_loads_stream_to_the_gpu_through_staging_and_match(tmp_path):
    state = _big_state()
    path = tmp_path / "big.safetensors"
    tk.save_weights(state, path)
    loaded = tk.load_state_dict(path, device="cuda")
    for name, value in state.items():
        assert loaded[name].device.type == "cuda"
        assert torch.equal(loaded[name].cpu(), value), name
    cast = tk.load_state_dict(path, device="cuda", dtype=torch.bfloat16)
    assert cast["layer0.weight"].dtype == torch.bfloat16 and cast["step"].dtype == torch.int64


def test_load_weights_fills_gpu_parameters_in_place(tmp_path):
    source = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 64))
    tk.save_weights(source, tmp_path / "m.safetensors")
    target = nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 64)).cuda()
    pointers = [p.data_ptr() for p in target.parameters()]
    tk.load_weights(target, tmp_path / "m.safetensors")
    assert [p.data_ptr() for p in target.parameters()] == pointers
    assert_same_state(source, target.cpu())


def test_a_corrupt_file_is_refused_on_the_gpu_path(tmp_path):
    state = _big_state()
    path = tmp_path / "big.safetensors"
    tk.save_weights(state, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_state_dict(path, device="cuda")


def test_restoring_into_a_gpu_model_reads_into_its_memory(tmp_path):
    model = SimpleNet().cuda()
    tk.save({"model": model}, tmp_path / "c.safetensors")
    restored = SimpleNet().cuda()
    pointers = [p.data_ptr() for p in restored.parameters()]
    tk.load(tmp_path / "c.safetensors", into={"model": restored})
    assert [p.data_ptr() for p in restored.parameters()] == pointers
    assert_same_state(model, restored)


def test_one_read_into_cpu_and_gpu_destinations(tmp_path):
    # Small tensors side by side in one batch, one bound for the CPU and one for the GPU.
    tk.save({"cpu": torch.arange(4.0), "gpu": torch.arange(4.0) + 10}, tmp_path / "m.safetensors")
    into = {"cpu": torch.empty(4), "gpu": torch.empty(4, device="cuda")}
    loaded = tk.load(tmp_path / "m.safetensors", into=into)
    assert torch.equal(loaded["cpu"], torch.arange(4.0))
    assert torch.equal(loaded["gpu"].cpu(), torch.arange(4.0) + 10)
    assert loaded["gpu"].data_ptr() == into["gpu"].data_ptr()


def test_a_read_is_ordered_after_the_callers_stream(tmp_path):
    state = {"big": torch.randn(1 << 22), "small": torch.randn(16)}  # two jobs, two threads
    tk.save_weights(state, tmp_path / "w.safetensors")
    side = torch.cuda.Stream()
    dest = torch.empty(1 << 22, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(1 << 28)  # work queued before the read, on the caller's stream
        dest.zero_()
        tk.load(tmp_path / "w.safetensors", into={"big": dest, "small": None})
    torch.cuda.synchronize()
    assert torch.equal(dest.cpu(), state["big"])


def test_load_with_map_location_streams_to_the_gpu(tmp_path, monkeypatch):
    from torchkeep.io import reader

    made = []
    init = reader.Staging.__init__

    def record(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(reader.Staging, "__init__", record)
    state = _big_state()
    tk.save(state, tmp_path / "s.safetensors")
    loaded = tk.load(tmp_path / "s.safetensors", map_location="cuda")
    assert made  # read through the pinned staging buffers, not to the CPU first
    for name, value in state.items():
        assert loaded[name].device.type == "cuda"
        assert torch.equal(loaded[name].cpu(), value)
    made.clear()
    cast = tk.load(tmp_path / "s.safetensors", map_location="cuda", dtype=torch.bfloat16)
    assert not made  # cast on the CPU first: the device never holds both copies
    assert cast["layer0.weight"].dtype == torch.bfloat16 and cast["step"].dtype == torch.int64
    assert cast["layer0.weight"].device.type == "cuda"


def test_load_weights_to_cuda_reads_into_parameters_already_there(tmp_path):
    source = SimpleNet()
    tk.save_weights(source, tmp_path / "m.safetensors")
    target = SimpleNet().cuda()
    pointers = [p.data_ptr() for p in target.parameters()]
    tk.load_weights(target, tmp_path / "m.safetensors", device="cuda")  # "cuda", not "cuda:0"
    assert [p.data_ptr() for p in target.parameters()] == pointers
    assert_same_state(source, target.cpu())
