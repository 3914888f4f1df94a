"""A training loop with CheckpointManager: asynchronous saves, retention, exact resume."""

from pathlib import Path

import torch
from _tutorial import same_weights, workdir
from torch import nn

import torchkeep as tk

out = workdir()


def run(root: Path, total_steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": optimizer, "rng": tk.RNGState()}
    with tk.CheckpointManager(
        root, keep_last=2, keep_best=1, monitor="val_loss", async_save=True, preemption=True
    ) as mgr:
        start = mgr.restore(state) or 0  # the latest committed step, or a fresh start
        print(f"starting at step {start + 1}; committed steps {mgr.steps()}")
        for step in range(start + 1, total_steps + 1):
            x = torch.randn(64, 16)
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0 or mgr.should_stop:
                val_loss = loss.item()  # stands in for a validation pass
                mgr.save(step, state, metrics={"val_loss": val_loss})  # returns at once
            if mgr.should_stop:  # SIGTERM from a scheduler: saved, now exit
                break
        mgr.wait()
        print(f"kept steps {mgr.steps()}, best by val_loss: step {mgr.best_step}")
    return model


run(out / "checkpoints", 30)  # stops at step 30, as a job's time limit would
resumed = run(out / "checkpoints", 60)  # a new run picks up at step 31
reference = run(out / "uninterrupted", 60)
same = same_weights(resumed, reference)
print(f"resumed run identical to an uninterrupted one: {same}")
assert same
with tk.CheckpointManager(out / "checkpoints") as mgr:  # every kept step verifies
    assert all(tk.verify(mgr.path(step)).ok for step in mgr.steps())
