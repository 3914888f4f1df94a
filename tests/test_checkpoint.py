from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from conftest import SimpleNet, TheModelClass, assert_same_state


def test_tutorial_general_checkpoint(tmp_path):
    # The tutorial: torch.save({"epoch", "model_state_dict", "optimizer_state_dict", "loss"}).
    model = TheModelClass()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    path = tmp_path / "ckpt.safetensors"
    tk.save_checkpoint(path, model=model, optimizer=optimizer, epoch=5, loss=loss)

    # Resume training: rebuild, load, model.train().
    model2 = TheModelClass()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.001, momentum=0.9)
    ckpt = tk.load_checkpoint(path, model=model2, optimizer=optimizer2)
    model2.train()
    assert ckpt.epoch == 5
    assert torch.equal(ckpt.loss, loss.detach())
    assert_same_state(model, model2)
    assert str(optimizer2.state_dict()) == str(optimizer.state_dict())

    # The file also reads as the tutorial's dict.
    as_dict = tk.load(path)
    assert as_dict["epoch"] == 5
    assert set(as_dict) >= {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}
    inference = TheModelClass()
    inference.load_state_dict(as_dict["model_state_dict"])
    inference.eval()


def test_checkpoint_fields(tmp_path):
    model = SimpleNet()
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu")
    optimizer.step()
    scheduler.step()
    tk.save_checkpoint(
        tmp_path / "c",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        epoch=2,
        step=400,
        loss=0.25,
        metrics={"val_loss": 0.3, "acc": 0.9},
        extra={"data_position": {"epoch": 2, "batch": 17}, "tokens": 10**12},
    )
    m2 = SimpleNet()
    o2 = torch.optim.Adam(m2.parameters())
    s2 = torch.optim.lr_scheduler.ExponentialLR(o2, gamma=0.5)
    ckpt = tk.load_checkpoint(tmp_path / "c", model=m2, optimizer=o2, scheduler=s2)
    assert (ckpt.epoch, ckpt.step, ckpt.loss) == (2, 400, 0.25)
    assert ckpt.metrics == {"val_loss": 0.3, "acc": 0.9}
    assert ckpt.extra == {"data_position": {"epoch": 2, "batch": 17}, "tokens": 10**12}
    assert s2.state_dict() == scheduler.state_dict()
    assert o2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_load_checkpoint_for_inference_only(tmp_path):
    model = SimpleNet()
    tk.save_checkpoint(tmp_path / "c.safetensors", model=model, rng=False)
    fresh = SimpleNet()
    tk.load_checkpoint(tmp_path / "c.safetensors", model=fresh)
    fresh.eval()
    assert_same_state(model, fresh)


def test_missing_component_is_reported(tmp_path):
    tk.save_checkpoint(tmp_path / "c.safetensors", model=SimpleNet())
    with pytest.raises(tk.StateMismatchError, match="optimizer_state_dict"):
        tk.load_checkpoint(
            tmp_path / "c.safetensors",
            model=SimpleNet(),
            optimizer=torch.optim.SGD(SimpleNet().parameters(), lr=0.1),
        )


def test_rng_state_restores_every_generator(tmp_path):
    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tk.save({"rng": tk.RNGState()}, tmp_path / "rng.safetensors")
    expected = (random.random(), np.random.rand(), torch.rand(3))

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    tk.load(tmp_path / "rng.safetensors", into={"rng": tk.RNGState()})
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


# ---------------------------------------------------------------------------------------------
# Exact resume: a run interrupted by a checkpoint and restored into fresh objects continues
# bit for bit like a run that never stopped.


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object, DataLoader]:
    torch.manual_seed(seed)
    model = DropoutNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(96, 10, generator=data)
    y = (x.sum(1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    return model, optimizer, scheduler, loader


def _epoch(model, optimizer, scheduler, loader) -> list[float]:
    model.train()
    losses = []
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    scheduler.step()
    return losses


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    model, optimizer, scheduler, loader = _setup(seed=0)
    reference = [_epoch(model, optimizer, scheduler, loader) for _ in range(4)]
    final_reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler, loader = _setup(seed=0)
    first_half = [_epoch(model, optimizer, scheduler, loader) for _ in range(2)]
    tk.save_checkpoint(
        tmp_path / "ckpt.safetensors",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=1,
    )
    assert first_half == reference[:2]

    # A "new process": different seed, fresh objects, generators disturbed.
    model, optimizer, scheduler, loader = _setup(seed=123)
    random.random()
    torch.rand(7)
    ckpt = tk.load_checkpoint(
        tmp_path / "ckpt.safetensors", model=model, optimizer=optimizer, scheduler=scheduler
    )
    resumed = [_epoch(model, optimizer, scheduler, loader) for _ in range(ckpt.epoch + 1, 4)]

    assert resumed == reference[2:]  # every loss equal, bit for bit
    for key, value in model.state_dict().items():
        assert torch.equal(value, final_reference[key]), key
