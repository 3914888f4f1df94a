"""The general checkpoint for resuming training: model, optimizer, scheduler, epoch and loss.

torch.save({"epoch": ..., "model_state_dict": ..., "optimizer_state_dict": ...}, PATH)
    ->  tk.save_checkpoint(PATH, model=..., optimizer=..., epoch=..., loss=...)
"""

import torch
from _tutorial import TheModelClass, batches, same_weights, workdir
from torch import nn

import torchkeep as tk


def setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = TheModelClass()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> float:
    model.train()
    for x, y in batches(4, seed=epoch):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return loss.item()


out = workdir()
path = out / "checkpoint.safetensors"

# A run of 4 epochs that stops after the second, saving every epoch...
model, optimizer, scheduler = setup()
for epoch in range(2):
    loss = train_epoch(model, optimizer, epoch)
    scheduler.step()
    tk.save_checkpoint(
        path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, loss=loss
    )

# ...resumed in what could be a new process: everything comes back in place.
model, optimizer, scheduler = setup()
ckpt = tk.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
print(f"resuming after epoch {ckpt.epoch} (loss {ckpt.loss:.4f}), lr {scheduler.get_last_lr()}")
for epoch in range(ckpt.epoch + 1, 4):
    train_epoch(model, optimizer, epoch)
    scheduler.step()

# The same as a run that never stopped, bit for bit.
reference, ref_optimizer, ref_scheduler = setup()
for epoch in range(4):
    train_epoch(reference, ref_optimizer, epoch)
    ref_scheduler.step()
same = same_weights(model, reference)
print(f"resumed run identical to an uninterrupted one: {same}")
assert same
