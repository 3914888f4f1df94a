"""Checkpoints at a URL: every path argument also takes s3://, gs://, memory://... (fsspec).

This runs against fsspec's in-memory file system; for S3 pass the same code an ``s3://``
URL and ``storage_options`` (credentials, ``{"client_kwargs": {"endpoint_url": ...}}``).
Needs the extra: pip install 'torchkeep[remote]'.
"""

import torch
from torch import nn

import torchkeep as tk

model = nn.Linear(32, 4)
tk.save_weights(model, "memory://bucket/model.safetensors")
fresh = nn.Linear(32, 4)
tk.load_weights(fresh, "memory://bucket/model.safetensors")
assert torch.equal(fresh.weight, model.weight)
print(f"verify at a URL: {tk.verify('memory://bucket/model.safetensors').ok}")

# The manager commits each step by writing its manifest last: object stores have no rename.
state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
with tk.CheckpointManager("memory://bucket/run1", keep_last=2) as mgr:
    for step in (100, 200, 300):
        mgr.save(step, state)
    print(f"committed steps at memory://bucket/run1: {mgr.steps()}")
    assert mgr.steps() == [200, 300]
with tk.CheckpointManager("memory://bucket/run1") as mgr:
    print(f"restored step {mgr.restore(state)}")
