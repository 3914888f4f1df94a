"""The demo's child processes, seen from the parent: a training run (its events read as they
come, its process handed back while it is paused mid-save), a ``torchkeep`` command, and
inference in a fresh interpreter that imports torchkeep only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from torchkeep.demo.training import CHILD_TIMEOUT, EPOCHS

Progress = Callable[[str, int, int], None]


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


def _events(stream: IO[str]) -> Iterator[dict[str, Any]]:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def _child_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torchkeep.cli", "demo-worker", *args]


def run_training(
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


def run_command(*args: str) -> tuple[int, str]:
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


def infer(model_dir: Path, data: Path) -> dict[str, Any]:
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
