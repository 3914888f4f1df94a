"""Incremental checkpoints: fine-tuning a frozen base writes only what it trains."""

import os

import torch
from _tutorial import same_weights, workdir
from torch import nn

import torchkeep as tk

out = workdir()
torch.manual_seed(0)

# A linear probe: a frozen encoder (about 16 MiB of weights) under a small trainable head.
encoder = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024))
encoder.requires_grad_(False)
head = nn.Linear(1024, 10)
model = nn.Sequential(encoder, head)
optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
state = {"model": model, "optimizer": optimizer}


def train_one_step() -> float:
    x, y = torch.randn(32, 1024), torch.randint(0, 10, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


# CheckpointManager saves incrementally by default: each step writes the tensors whose bytes
# changed since the newest committed step, and hard-links that step's files for the rest.
with tk.CheckpointManager(out / "probe", keep_last=3) as mgr:
    for step in range(1, 6):
        train_one_step()
        info = mgr.save(step, state)
        print(
            f"step {step}: wrote {info.file_bytes / 1024:.0f} KiB, "
            f"shared {info.shared_bytes / 2**20:.1f} MiB with the step before"
        )
    steps = mgr.steps()

# Every kept step is a whole checkpoint on its own: it verifies and loads without the others,
# and retention deleted steps 1 and 2 (the encoder's file lives on in the steps that use it).
print(f"kept steps {steps}")
for step in steps:
    path = out / "probe" / f"step_{step:09d}"
    assert tk.verify(path).ok
    files = sorted(os.listdir(path))
    print(f"step {step}: verifies; files {files}")
restored = nn.Sequential(
    nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024)), nn.Linear(1024, 10)
)
with tk.CheckpointManager(out / "probe") as mgr:
    mgr.restore({"model": restored, "optimizer": torch.optim.AdamW(restored[1].parameters())})
same = same_weights(restored, model)
print(f"restored the latest step, identical to the model: {same}")
assert same

# The same for the functional API: base= names an earlier directory save of the same state.
v1 = tk.save({"model": model}, out / "model-v1")
train_one_step()
v2 = tk.save({"model": model}, out / "model-v2", base=out / "model-v1")
print(
    f"model-v1 wrote {v1.file_bytes / 2**20:.1f} MiB; model-v2 wrote "
    f"{v2.file_bytes / 1024:.0f} KiB and shares {v2.shared_bytes / 2**20:.1f} MiB with it"
)
assert v2.file_bytes < v1.file_bytes / 100
