"""The demo behind ``torchkeep demo``: the tutorials' workflows, end to end, with torchkeep.

It trains a small network on a synthetic two-class problem, checkpoints every epoch, resumes
from a checkpoint in a new process and proves the resumed run identical to an uninterrupted
one, then reloads the weights in another process for inference. Steps report through a
callback; only the CLI prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk

EPOCHS = 8
RESUME_FROM = 4


class SimpleNet(nn.Module):
    """The tutorials' small fully connected network, with dropout so that RNG state matters."""

    def __init__(self, features: int = 10, hidden: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return out


@dataclass(frozen=True)
class Step:
    """One thing the demo did, for the CLI to show."""

    title: str
    detail: str
    ok: bool = True


@dataclass
class DemoResult:
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2400, 10, generator=g)
    w = torch.randn(10, generator=g)
    y = ((x @ w + 0.5 * torch.sin(3 * x[:, 0])) > 0).long()
    return TensorDataset(x[:2000], y[:2000]), TensorDataset(x[2000:], y[2000:])


def _setup(seed: int) -> tuple[SimpleNet, torch.optim.Optimizer, Any, DataLoader[Any]]:
    torch.manual_seed(seed)
    model = SimpleNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    train, _ = _data()
    return model, optimizer, scheduler, DataLoader(train, batch_size=50, shuffle=True)


def _train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loader: DataLoader[Any]
) -> float:
    model.train()
    total = 0.0
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        total += loss.item()
    scheduler.step()
    return total / len(loader)


def accuracy(model: nn.Module) -> float:
    _, test = _data()
    model.eval()
    with torch.no_grad():
        predicted = model(test.tensors[0]).argmax(1)
    return float((predicted == test.tensors[1]).float().mean())


def train(
    out: Path, epochs: int, *, resume: Path | None, progress: Callable[[int], None]
) -> dict[str, Any]:
    """Train to ``epochs``, checkpointing each epoch; resume from ``resume`` if given."""
    model, optimizer, scheduler, loader = _setup(seed=0 if resume is None else 999)
    start = 0
    if resume is not None:
        ckpt = tk.load_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler)
        assert ckpt.epoch is not None
        start = ckpt.epoch + 1
    losses = []
    for epoch in range(start, epochs):
        losses.append(_train_epoch(model, optimizer, scheduler, loader))
        tk.save_checkpoint(
            out / f"epoch_{epoch:03d}.safetensors",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            loss=losses[-1],
        )
        progress(epoch)
    tk.save_weights(model, out / "final.safetensors")
    return {"losses": losses, "accuracy": accuracy(model)}


def worker(args: list[str]) -> dict[str, Any]:
    """Run one task of the demo's child processes; the CLI prints the result as JSON."""
    task = args[0]
    if task == "resume":
        out, checkpoint = Path(args[1]), Path(args[2])
        result = train(out, EPOCHS, resume=checkpoint, progress=lambda _: None)
    elif task == "infer":
        model = SimpleNet()
        tk.load_weights(model, Path(args[1]))
        model.eval()
        result = {"accuracy": accuracy(model)}
    else:
        raise SystemExit(f"unknown demo task {task}")
    return result


def _child(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep.cli", "demo-worker", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"demo child process failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_demo(
    out_dir: Path, *, report: Callable[[Step], None], progress: Callable[[str, int, int], None]
) -> DemoResult:
    """Run every step of the demo, writing into ``out_dir``."""
    result = DemoResult(out_dir)

    def add(step: Step) -> None:
        result.steps.append(step)
        report(step)

    reference_dir = out_dir / "uninterrupted"
    resumed_dir = out_dir / "resumed"
    reference_dir.mkdir(parents=True, exist_ok=True)
    resumed_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    reference = train(
        reference_dir, EPOCHS, resume=None, progress=lambda e: progress("training", e + 1, EPOCHS)
    )
    add(
        Step(
            "Trained with a checkpoint every epoch",
            f"{EPOCHS} epochs in {time.perf_counter() - started:.1f}s, loss "
            f"{reference['losses'][0]:.3f} → {reference['losses'][-1]:.3f}, "
            f"test accuracy {reference['accuracy']:.1%}",
        )
    )

    checkpoint = reference_dir / f"epoch_{RESUME_FROM - 1:03d}.safetensors"
    report_ = tk.verify(checkpoint)
    add(
        Step(
            "Verified a checkpoint",
            f"{checkpoint.name}: {report_.tensors} tensors, every checksum matches",
            report_.ok,
        )
    )

    progress("resuming in a new process", 0, 1)
    resumed = _child("resume", str(resumed_dir), str(checkpoint))
    progress("resuming in a new process", 1, 1)
    final_ref = tk.load_state_dict(reference_dir / "final.safetensors")
    final_res = tk.load_state_dict(resumed_dir / "final.safetensors")
    identical = all(torch.equal(final_ref[k], final_res[k]) for k in final_ref)
    same_losses = resumed["losses"] == reference["losses"][RESUME_FROM:]
    add(
        Step(
            f"Resumed from epoch {RESUME_FROM - 1} in a new process",
            f"epochs {RESUME_FROM}–{EPOCHS - 1}: losses equal bit for bit: {same_losses}; "
            f"final weights identical: {identical}",
            identical and same_losses,
        )
    )

    inferred = _child("infer", str(reference_dir / "final.safetensors"))
    add(
        Step(
            "Loaded the weights in a fresh process for inference",
            f"test accuracy {inferred['accuracy']:.1%} (same as after training: "
            f"{inferred['accuracy'] == reference['accuracy']})",
            inferred["accuracy"] == reference["accuracy"],
        )
    )

    try:
        tk.save_weights(SimpleNet(), out_dir / "model.pth")
    except tk.UnsupportedFormatError as e:
        add(Step("Refused a pickle-era file name", str(e).split(": ", 1)[1]))

    result.files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    return result
