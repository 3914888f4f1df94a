"""Look inside checkpoints, check them and compare them, from Python (the CLI does the same)."""

import torch
from _tutorial import TheModelClass, workdir

import torchkeep as tk

out = workdir()
torch.manual_seed(0)
model = TheModelClass()
tk.save_weights(model, out / "epoch_1.safetensors", metadata={"run": "demo"})
with torch.no_grad():
    model.fc3.bias += 0.5
tk.save_weights(model, out / "epoch_2.safetensors")

info = tk.describe(out / "epoch_1.safetensors")  # headers only: no tensor data is read
print(f"{info.format}, {len(info.tensors)} tensors, parameters per module: {info.modules}")

report = tk.verify(out / "epoch_1.safetensors")  # every checksum
print(f"verify: ok={report.ok}, {report.tensors} tensors")

changes = tk.diff(out / "epoch_1.safetensors", out / "epoch_2.safetensors")
for change in changes.changed:
    print(f"changed: {change}")
assert [c.name for c in changes.changed] == ["fc3.bias"]

# One flipped bit is found, and named; loading refuses the file rather than return it.
path = out / "epoch_2.safetensors"
data = bytearray(path.read_bytes())
data[-3] ^= 0x10
path.write_bytes(bytes(data))
report = tk.verify(path)
print(f"after a flipped bit: ok={report.ok}: {report.problems[0]}")
try:
    tk.load_state_dict(path)
except tk.CorruptCheckpointError as e:
    print(f"load refused: {type(e).__name__}")
