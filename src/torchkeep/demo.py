"""The demo behind ``torchkeep demo``: what torchkeep does for a training run, end to end.

On scikit-learn's bundled handwritten digits it trains the tutorials' small multilayer
perceptron with a CheckpointManager (asynchronous saves, retention by validation loss), kills
the training process with SIGKILL in the middle of a save, verifies the last committed step,
resumes and proves the resumed run bitwise identical to one that was never interrupted; then it
saves the whole model and loads it in a process that lacks its class, converts it to float16,
and shows ``inspect``, ``verify`` and ``scan`` on its files, a hostile pickle included.

Steps report through callbacks (``report`` for each result, ``progress`` for long work); only
the command line prints. The training runs in child processes (``torchkeep demo-worker``) that
stream one JSON event per line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep.errors import MissingDependencyError
from torchkeep.storage import LocalStorage, Sink, hidden_target
from torchkeep.tree import flatten

EPOCHS = 12
KILLED_AT = 8  # the step whose save the training process is killed in the middle of
KEEP_LAST = 2
KEEP_BEST = 1
BATCH = 32
CHILD_TIMEOUT = 300  # seconds a demo child process may take before the demo gives up on it

Emit = Callable[[dict[str, Any]], None]
Progress = Callable[[str, int, int], None]


class DigitsMLP(nn.Module):
    """The tutorials' multilayer perceptron (a 3×3 convolution, then three linear layers),
    sized for 8×8 images of the ten digits."""

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


@dataclass(frozen=True)
class Step:
    """One thing the demo did, for the command line to show."""

    title: str
    detail: str
    ok: bool = True
    output: str = ""  # a command's own output, shown as it printed it


@dataclass
class DemoResult:
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


# ---------------------------------------------------------------------------------------------
# data and training (these run in the child processes)


def write_digits(path: Path) -> dict[str, int]:
    """Save scikit-learn's 1,797 handwritten digits, split into train, validation and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError(
            "torchkeep demo trains on scikit-learn's bundled handwritten digits, and "
            "scikit-learn is not installed; install it with: pip install 'torchkeep[demo]'"
        ) from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    parts = {"train": order[:1200], "val": order[1200:1500], "test": order[1500:]}
    data = {name: {"x": images[i], "y": labels[i]} for name, i in parts.items()}
    tk.save(data, path)
    return {name: len(i) for name, i in parts.items()}


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
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
            val_loss, val_accuracy = _evaluate(model, data["val"]["x"], data["val"]["y"])
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


# A fresh interpreter that imports torchkeep only: the demo's model class is not there.
_INFER = r"""
import json, sys
import torch
import torchkeep as tk
model = tk.load_model(sys.argv[1])
test = tk.load(sys.argv[2])["test"]
dtype = next(iter(model.state_dict().values())).dtype
with torch.no_grad():
    predicted = model(test["x"].to(dtype)).argmax(1)
print(json.dumps({
    "accuracy": float((predicted == test["y"]).float().mean()),
    "dtype": str(dtype).removeprefix("torch."),
    "class_imported": "torchkeep.demo" in sys.modules,
    "rebuilt_as": type(model).__module__ + "." + type(model).__name__,
}))
"""


# ---------------------------------------------------------------------------------------------
# the parent: runs the children and checks what they did


def _events(stream: IO[str]) -> Iterator[dict[str, Any]]:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def _child_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torchkeep.cli", "demo-worker", *args]


def _run_training(
    root: Path, data: Path, label: str, progress: Progress, *, pause_at: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, subprocess.Popen[str]]:
    """Run a training child; return its epoch events, its pause event (then it is still
    running, paused mid-save) and the process."""
    args = ["train", str(root), str(data)] + ([str(pause_at)] if pause_at is not None else [])
    # The child's stderr goes to a file, read on failure: a pipe nobody reads could fill up.
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            _child_command(*args), stdout=subprocess.PIPE, stderr=log, text=True
        )
        assert child.stdout is not None
        epochs: list[dict[str, Any]] = []
        try:
            for event in _events(child.stdout):
                if event["event"] == "start":
                    progress(label, event["from"], EPOCHS)
                elif event["event"] == "epoch":
                    epochs.append(event)
                    progress(label, event["epoch"], EPOCHS)
                elif event["event"] == "paused":
                    return epochs, event, child
            child.wait(CHILD_TIMEOUT)
        except BaseException:
            child.kill()  # an interrupted demo leaves no training process behind
            child.wait()
            raise
        if child.returncode != 0:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"the demo's training process failed:\n{err[-3000:]}")
    return epochs, None, child


def _final_state(root: Path) -> dict[str, Any]:
    mgr = tk.CheckpointManager(root, keep_last=None)
    try:
        latest = mgr.latest_step
        assert latest is not None
        state: dict[str, Any] = tk.load(mgr.path(latest))
        return state
    finally:
        mgr.close()


def _identical(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, int]:
    """Whether two states are equal bit for bit: the same skeleton and values (as a save would
    write them), the same tensors byte for byte. Also the number of tensors compared."""
    fa, fb = flatten(a), flatten(b)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    ta, tb = fa.tensors, fb.tensors
    same = (
        fa.tree == fb.tree
        and fa.aliases == fb.aliases
        and ta.keys() == tb.keys()
        and all(
            ta[k].dtype == tb[k].dtype
            and ta[k].shape == tb[k].shape
            and torch.equal(bits(ta[k]), bits(tb[k]))
            for k in ta
        )
    )
    return same, len(ta)


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def _mib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _cli(*args: str) -> tuple[int, str]:
    """Run ``torchkeep ARGS`` in a child process; its exit code and output."""
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep.cli", *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env={**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"},
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).rstrip()


def _infer(model_dir: Path, data: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _INFER, str(model_dir), str(data)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the demo's inference process failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class _Hostile:
    """Pickles as a call to os.system: what a malicious torch.save file holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def run_demo(out_dir: Path, *, report: Callable[[Step], None], progress: Progress) -> DemoResult:
    """Run every step of the demo, writing into ``out_dir``."""
    result = DemoResult(out_dir)

    def add(step: Step) -> None:
        result.steps.append(step)
        report(step)

    data = out_dir / "data" / "digits.safetensors"
    data.parent.mkdir(parents=True, exist_ok=True)
    sizes = write_digits(data)

    # 1. an uninterrupted run, the reference
    started = time.perf_counter()
    reference_root = out_dir / "uninterrupted"
    reference, _, _ = _run_training(reference_root, data, "training (uninterrupted run)", progress)
    mgr = tk.CheckpointManager(reference_root, keep_last=None, monitor="val_loss")
    kept, best = mgr.steps(), mgr.best_step
    mgr.close()
    first, last = reference[0], reference[-1]
    add(
        Step(
            "Trained the tutorials' MLP on handwritten digits with a CheckpointManager",
            f"{sizes['train']} training, {sizes['val']} validation, {sizes['test']} test "
            f"images; {EPOCHS} epochs in {time.perf_counter() - started:.1f} s, an asynchronous "
            f"save after each; validation loss {first['val_loss']:.3f} → {last['val_loss']:.3f}, "
            f"accuracy {last['val_accuracy']:.1%}. Kept steps {kept} "
            f"(keep_last={KEEP_LAST}, keep_best={KEEP_BEST} by val_loss: step {best})",
            ok=len(reference) == EPOCHS and best in kept,
        )
    )

    # 2. killed mid-save, verified, resumed, compared
    started = time.perf_counter()
    root = out_dir / "interrupted"
    _, paused, child = _run_training(
        root, data, "training (to be killed)", progress, pause_at=KILLED_AT
    )
    if paused is None:
        add(Step("Killed the training mid-save", "the training never reached the save", False))
        return _finish(result)
    partial = Path(paused["file"])
    child.send_signal(signal.SIGKILL)
    child.wait(CHILD_TIMEOUT)
    killed = child.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".step_"))
    mgr = tk.CheckpointManager(root, keep_last=None)  # opening the root clears dead saves
    steps, latest = mgr.steps(), mgr.latest_step
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".step_"))
    mgr.close()
    check = tk.verify(root / f"step_{latest:09d}") if latest is not None else None
    add(
        Step(
            f"Killed the training process with SIGKILL in the middle of saving step {KILLED_AT}",
            f"{_mib(paused['written'])} of {_mib(paused['size'])} of "
            f"{partial.parent.name}/{partial.name} written when it died; committed steps "
            f"{steps}, the latest (step {latest}) verified: {check.tensors if check else 0} "
            f"tensors, every checksum matches; the half-written step is not listed, and its "
            f"staging directory was removed when the root was next opened",
            ok=killed
            and leftovers == [partial.parent.name]
            and not left
            and latest == KILLED_AT - 1
            and check is not None
            and check.ok
            and KILLED_AT not in steps,
        )
    )
    resumed, _, _ = _run_training(root, data, "training (resumed)", progress)
    same_losses = [e["val_loss"] for e in resumed] == [
        e["val_loss"] for e in reference[KILLED_AT - 1 :]
    ]
    identical, count = _identical(_final_state(reference_root), _final_state(root))
    add(
        Step(
            f"Resumed from step {KILLED_AT - 1} in a new process",
            f"epochs {KILLED_AT}–{EPOCHS} in {time.perf_counter() - started:.1f} s; the final "
            f"checkpoint equals the uninterrupted run's bit for bit ({count} tensors: weights, "
            f"optimizer moments, every RNG state): {identical}; validation losses equal: "
            f"{same_losses}",
            ok=identical and same_losses,
        )
    )

    # 3. the whole model, loaded where its class does not exist
    model = DigitsMLP()
    model.load_state_dict(_final_state(reference_root)["model"])
    model.eval()
    test = tk.load(data)["test"]
    _, accuracy = _evaluate(model, test["x"], test["y"])
    model_dir = out_dir / "model"
    tk.save_model(model, model_dir, example_inputs=torch.zeros(1, 1, 8, 8))
    loaded = _infer(model_dir, data)
    add(
        Step(
            "Saved the whole model and loaded it in a fresh process without its class",
            f"the process imported torchkeep only (the class DigitsMLP "
            f"{'was imported there' if loaded['class_imported'] else 'was never imported'}); "
            f"rebuilt as {loaded['rebuilt_as']} from the exported "
            f"program; test accuracy {loaded['accuracy']:.1%} (in this process: {accuracy:.1%})",
            ok=not loaded["class_imported"] and loaded["accuracy"] == accuracy,
        )
    )

    # 4. float16 for a small device
    half_dir = out_dir / "model-fp16"
    tk.convert(model_dir, half_dir, dtype=torch.float16)
    half = _infer(half_dir, data)
    before, after = _size(model_dir), _size(half_dir)
    add(
        Step(
            "Converted the model to float16",
            f"{_mib(before)} → {_mib(after)} ({after / before:.0%}); test accuracy "
            f"{loaded['accuracy']:.1%} → {half['accuracy']:.1%} ({half['dtype']})",
            ok=half["dtype"] == "float16" and abs(half["accuracy"] - loaded["accuracy"]) < 0.02,
        )
    )

    # 5. the command line on these files, a damaged copy and a hostile pickle
    code, text = _cli("inspect", str(half_dir))
    add(
        Step(
            "torchkeep inspect model-fp16",
            "the model's tensors, tree and how it is rebuilt",
            code == 0,
            text,
        )
    )
    damaged = out_dir / "damaged" / f"step_{EPOCHS:09d}"
    shutil.copytree(reference_root / f"step_{EPOCHS:09d}", damaged)
    shard = max(damaged.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit of bit rot
    shard.write_bytes(bytes(blob))
    good = reference_root / f"step_{EPOCHS:09d}"
    code, text = _cli("verify", str(good), str(model_dir), str(half_dir), str(damaged))
    add(
        Step(
            "torchkeep verify: three saves and a copy with one flipped bit",
            "every checksum of the good ones matches; the flipped bit is found and named",
            code == 1 and "CORRUPT" in text and text.count("CORRUPT") == 1,
            text,
        )
    )
    hostile = out_dir / "downloaded_model.pt"
    canary = out_dir / "hostile-pickle-ran"
    torch.save({"model": model.state_dict(), "hook": _Hostile(f"touch {canary}")}, hostile)
    code, text = _cli("scan", str(hostile))
    try:
        tk.load(hostile)
        refused = "loaded"
    except tk.UnsafeFileError as e:
        refused = f"tk.load refused it: {type(e).__name__}"
    add(
        Step(
            "torchkeep scan on a hostile torch.save file (it calls os.system when unpickled)",
            f"{refused}; nothing ran ({canary.name} "
            f"{'EXISTS: the pickle ran' if canary.exists() else 'was never created'})",
            code == 1 and refused != "loaded" and not canary.exists(),
            text,
        )
    )
    return _finish(result)


def _finish(result: DemoResult) -> DemoResult:
    result.files = sorted(p for p in result.out_dir.rglob("*") if p.is_file())
    return result
