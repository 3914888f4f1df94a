"""Save a model's weights for inference and load them back: the tutorials' first recipe.

torch.save(model.state_dict(), PATH)       ->  tk.save_weights(model, PATH)
model.load_state_dict(torch.load(PATH))    ->  tk.load_weights(model, PATH)
"""

import torch
from _tutorial import TheModelClass, same_weights, workdir

import torchkeep as tk

out = workdir()
model = TheModelClass()
path = out / "model.safetensors"
tk.save_weights(model, path)  # one standard safetensors file, written atomically

fresh = TheModelClass()
result = tk.load_weights(fresh, path)  # read straight into the parameters, checksums checked
fresh.eval()  # dropout and batch norm in inference mode, as the tutorials say
print(f"loaded {path.name}: missing {list(result.missing)}, unexpected {list(result.unexpected)}")
assert same_weights(model, fresh)

# map_location: choose the device (and dtype) on the way in
state = tk.load_state_dict(path, device="cpu", dtype=torch.bfloat16)
print(f"{len(state)} tensors as {state['fc1.weight'].dtype} on {state['fc1.weight'].device}")

# A half-size copy for deployment
tk.save_weights(model, out / "model-bf16.safetensors", dtype=torch.bfloat16)
half = (out / "model-bf16.safetensors").stat().st_size
print(f"bfloat16 copy: {half} bytes, float32: {path.stat().st_size}")

# A pickle-era name is refused: those suffixes mean code may run when the file is loaded
try:
    tk.save_weights(model, out / "model.pth")
except tk.UnsupportedFormatError as e:
    print(f"refused: {e}")
