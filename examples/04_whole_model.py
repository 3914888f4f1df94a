"""Save a whole model and load it without pickle: ``torch.save(model)`` done safely.

The directory holds the weights, a recipe that rebuilds the module (its class and arguments),
and the model exported with torch.export, which runs where the class does not exist.
"""

import subprocess
import sys

import torch
from _tutorial import TheModelClass, workdir

import torchkeep as tk

out = workdir()
model = TheModelClass().eval()
x = torch.randn(2, 3, 32, 32)
tk.save_model(model, out / "model", example_inputs=x[:1])

# Here the class is imported, so the recipe rebuilds a TheModelClass with the saved weights.
loaded = tk.load_model(out / "model")
print(f"rebuilt as {type(loaded).__name__}, in eval mode: {not loaded.training}")
assert torch.equal(loaded(x), model(x))

# A process that has never seen the class runs the exported program instead.
code = (
    "import sys, torch, torchkeep as tk\n"
    "m = tk.load_model(sys.argv[1])\n"
    "print(type(m).__name__, tuple(m(torch.randn(2, 3, 32, 32)).shape))\n"
)
done = subprocess.run(
    [sys.executable, "-c", code, str(out / "model")], capture_output=True, text=True, check=True
)
print(f"in a fresh process without the class: {done.stdout.strip()}")

# For a small device: cast the weights, re-export at that dtype, measure what moved.
tk.convert(out / "model", out / "model-fp16", dtype=torch.float16)
print(tk.describe(out / "model-fp16").model["converted"])
half = tk.load_model(out / "model-fp16")
drift = (half(x.half()).float() - model(x)).abs().max().item()
print(f"float16 output differs by at most {drift:.4f}")
assert drift < 0.05
