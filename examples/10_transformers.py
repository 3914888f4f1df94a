"""Hugging Face transformers: a Trainer whose checkpoints are torchkeep saves, resumed exactly.

Needs the extra: pip install 'torchkeep[transformers]'. The model is a tiny GPT-2 built from a
config, so nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _tutorial import same_weights, workdir
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import torchkeep as tk
from torchkeep.integrations.transformers import TorchkeepTrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):
    """Ends training after a given step, as a job's time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def trainer(out, callbacks=()) -> TorchkeepTrainer:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=12,
        save_steps=4,
        save_total_limit=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    model = GPT2LMHeadModel(config)
    return TorchkeepTrainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks)
    )


out = workdir()
trainer(out / "run", [StopAt(8)]).train()  # the job ends after step 8
steps = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
print(f"checkpoints: {steps}; pickle files: {sorted(p.name for p in out.rglob('*.pt*'))}")
print(f"verify {steps[-1]}: ok={tk.verify(out / 'run' / steps[-1]).ok}")

resumed = trainer(out / "run")
resumed.train(resume_from_checkpoint=True)  # the latest checkpoint, every checksum checked
reference = trainer(out / "reference")
reference.train()
same = same_weights(resumed.model, reference.model)
print(f"resumed at step 8, ended at {resumed.state.global_step}; identical to one run: {same}")
assert same
