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

The package: ``training`` holds the model, the data and the training the child processes run,
``processes`` starts those processes from the parent, ``steps`` holds the demo's steps and
``run_demo``, ``report`` what they report.
"""

from torchkeep.demo.processes import Progress, run_training
from torchkeep.demo.report import DemoResult, Step
from torchkeep.demo.steps import run_demo
from torchkeep.demo.training import (
    BATCH,
    CHILD_TIMEOUT,
    EPOCHS,
    KEEP_BEST,
    KEEP_LAST,
    KILLED_AT,
    DigitsMLP,
    Emit,
    train,
    worker,
    write_digits,
)

# The name the single demo module gave it, which the tests still call.
_run_training = run_training

__all__ = [
    "BATCH",
    "CHILD_TIMEOUT",
    "EPOCHS",
    "KEEP_BEST",
    "KEEP_LAST",
    "KILLED_AT",
    "DemoResult",
    "DigitsMLP",
    "Emit",
    "Progress",
    "Step",
    "run_demo",
    "run_training",
    "train",
    "worker",
    "write_digits",
]
