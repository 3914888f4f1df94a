"""Read the torch.save files you already have, without running their pickles, and convert them."""

import os

import torch
from _tutorial import TheModelClass, workdir

import torchkeep as tk

out = workdir()
model = TheModelClass()
optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

# What the tutorials wrote: a weights file and a general checkpoint dict.
torch.save(model.state_dict(), out / "model.pth")
torch.save(
    {
        "epoch": 5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.42,
    },
    out / "checkpoint.tar",
)

fresh = TheModelClass()
tk.load_weights(fresh, out / "model.pth")  # identified by content, read without pickle
old = tk.load(out / "checkpoint.tar")  # the dict, plain data only
print(f"epoch {old['epoch']}, loss {old['loss']}, {len(old['model_state_dict'])} weights")

# A wrapped model's keys (DistributedDataParallel adds "module."): say which prefix to strip.
torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, out / "ddp.pth")
tk.load_weights(fresh, out / "ddp.pth", strip_prefix="module.")


# A file that runs code when unpickled is refused, and scan says what it would have called.
class Payload:
    def __reduce__(self):
        return (os.system, ("echo this never runs",))


torch.save({"weights": model.state_dict(), "payload": Payload()}, out / "downloaded.pth")
report = tk.scan(out / "downloaded.pth")
print(f"scan: safe={report.safe}, would call {list(report.unsafe)}")
try:
    tk.load(out / "downloaded.pth")
except tk.UnsafeFileError as e:
    print(f"refused: {type(e).__name__}")

# Convert once, then load the safetensors file everywhere.
tk.convert(out / "model.pth", out / "model.safetensors")
tk.convert(out / "checkpoint.tar", out / "checkpoint.safetensors")
assert tk.verify(out / "model.safetensors").ok and tk.verify(out / "checkpoint.safetensors").ok
print(f"converted: {tk.describe(out / 'checkpoint.safetensors').optimizer}")
