"""The demo's model, its data and its training. The training runs in child processes
(``torchkeep demo-worker``) and reports through ``emit``, one event at a time: a run under a
CheckpointManager that can stop halfway through one step's save, for the parent to kill it there.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep._optional import importing
from torchkeep.storage import LocalStorage, Sink, hidden_target

EPOCHS = 12
KILLED_AT = 8  # the step whose save the training process is killed in the middle of
KEEP_LAST = 2
KEEP_BEST = 1
BATCH = 32
CHILD_TIMEOUT = 300  # seconds a demo child process may take before the demo gives up on it

Emit = Callable[[dict[str, Any]], None]


class DigitsMLP(nn.Module):
    """The tutorials' multilayer perceptron (a 3×3 convolution, then three linear layers),
    sized for 8×8 images of the ten digits."""

    # A saved model names its class where users import it from, as when the demo was one module.
    __module__ = "torchkeep.demo"

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 5, kernel_size=3),
            nn.Flatten(),
            nn.Linear(6 * 6 * 5, 300),
            nn.ReLU(),
            nn.Linear(300, 64),
            nn.ReLU(),
            nn.Dropout(0.1),  # so that the random number generators' state matters on resume
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


def write_digits(path: Path) -> dict[str, int]:
    """Save scikit-learn's 1,797 handwritten digits, split into train, validation and test."""
    with importing(
        "demo",
        "torchkeep demo trains on scikit-learn's bundled handwritten digits, and "
        "scikit-learn is not installed",
    ):
        from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    parts = {"train": order[:1200], "val": order[1200:1500], "test": order[1500:]}
    data = {name: {"x": images[i], "y": labels[i]} for name, i in parts.items()}
    tk.save(data, path)
    return {name: len(i) for name, i in parts.items()}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``x``, ``y``."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    loss = float(nn.functional.cross_entropy(logits.float(), y))
    return loss, float((logits.argmax(1) == y).float().mean())


class _PausingSink:
    """Writes the first half of a file, then says so and stops (until the process is killed)."""

    def __init__(self, sink: Sink, path: str, size: int, emit: Emit) -> None:
        self._sink, self._path, self._half, self._emit = sink, path, size // 2, emit
        self._size = size

    def pwrite(self, data: memoryview, offset: int) -> None:
        if offset <= self._half < offset + len(data):
            self._sink.pwrite(data[: self._half - offset], offset)
            self._emit(
                {"event": "paused", "file": self._path, "written": self._half, "size": self._size}
            )
            threading.Event().wait(CHILD_TIMEOUT)  # the parent kills the process here
            os._exit(1)  # no parent came: give up rather than linger
        self._sink.pwrite(data, offset)

    def written(self, offset: int, nbytes: int) -> None:
        self._sink.written(offset, nbytes)


class _PausingStorage(LocalStorage):
    """Local storage that stops halfway through the largest file of one step's save."""

    def __init__(self, step: int, emit: Emit) -> None:
        self._step = f"step_{step:09d}"
        self._emit = emit

    def write_file(self, path: str, size: int, fill: Callable[[Sink], None]) -> None:
        staging = hidden_target(os.path.basename(os.path.dirname(path)))
        if staging == self._step and not path.endswith("manifest.json") and size > 64 << 10:
            super().write_file(
                path, size, lambda sink: fill(_PausingSink(sink, path, size, self._emit))
            )
        else:
            super().write_file(path, size, fill)


def train(root: Path, data_path: Path, *, pause_at: int | None, emit: Emit) -> None:
    """Train to EPOCHS under a CheckpointManager at ``root``, resuming from its latest step.

    Every epoch is saved asynchronously with its validation loss; the manager keeps the last
    KEEP_LAST steps and the KEEP_BEST best. With ``pause_at``, the save of that step stops
    halfway through its data, for the parent to kill this process there.
    """
    torch.set_num_threads(1)  # the same arithmetic in every run, for bitwise comparisons
    random.seed(0)  # every generator the checkpoint restores starts the same in every run
    numpy.random.seed(0)
    torch.manual_seed(0)
    data = tk.load(data_path)
    train_x, train_y = data["train"]["x"], data["train"]["y"]
    model = DigitsMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.5)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=BATCH, shuffle=True)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": tk.RNGState()}
    storage = _PausingStorage(pause_at, emit) if pause_at is not None else None
    with tk.CheckpointManager(
        root,
        keep_last=KEEP_LAST,
        keep_best=KEEP_BEST,
        monitor="val_loss",
        async_save=True,
        storage=storage,
    ) as mgr:
        start = mgr.restore(state) or 0
        emit({"event": "start", "from": start})
        for epoch in range(start + 1, EPOCHS + 1):
            total = 0.0
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += loss.item()
            scheduler.step()
            val_loss, val_accuracy = evaluate(model, data["val"]["x"], data["val"]["y"])
            mgr.save(epoch, state, metrics={"val_loss": val_loss, "val_accuracy": val_accuracy})
            emit(
                {
                    "event": "epoch",
                    "epoch": epoch,
                    "train_loss": total / len(loader),
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                }
            )
    emit({"event": "done"})


def worker(args: list[str], emit: Emit) -> None:
    """The demo's child process: ``train ROOT DATA [PAUSE_AT]``."""
    if not args or args[0] != "train" or len(args) not in (3, 4):
        raise SystemExit("usage: torchkeep demo-worker train ROOT DATA [PAUSE_AT]")
    pause_at = int(args[3]) if len(args) == 4 else None
    train(Path(args[1]), Path(args[2]), pause_at=pause_at, emit=emit)
