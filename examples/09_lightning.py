"""Lightning: the Trainer's checkpoints through torchkeep, and a resumed fit.

Needs the extra: pip install 'torchkeep[lightning]'.
"""

import lightning.pytorch as pl
import torch
from _tutorial import workdir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep.integrations.lightning import TorchkeepCheckpointIO


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def trainer(out, epochs: int) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=out,
        max_epochs=epochs,
        plugins=[TorchkeepCheckpointIO()],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


out = workdir()
pl.seed_everything(0, verbose=False)
x = torch.randn(256, 8)
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)

trainer(out, epochs=2).fit(Regressor(), data)
saved = sorted(p.name for p in (out / "ckpt").iterdir())
print(f"checkpoints: {saved}")
last = out / "ckpt" / "last.ckpt" / "checkpoint.safetensors"
print(f"last.ckpt is a torchkeep save: verify ok={tk.verify(last).ok}")

resumed = trainer(out, epochs=4)
resumed.fit(Regressor(), data, ckpt_path="last")  # continues at epoch 2
print(f"resumed and finished at epoch {resumed.current_epoch}, step {resumed.global_step}")
assert resumed.global_step == 4 * len(data)
