"""The Hugging Face Trainer integration: real ``transformers.Trainer`` runs on the CPU with a
tiny GPT-2 built from its config (tied embedding and output weights, dropout), checkpoints
without pickle, exact resumption, rotation, damage, failed saves and runs killed mid-way."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported: no download, ever

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

import torchkeep as tk
from torchkeep.integrations.transformers import TorchkeepTrainer
from torchkeep.storage import LocalStorage
from torchkeep.testing import EXIT_CODE

STEPS = 6
EVERY = 2
# Evaluated at every save, with the highest loss the best: the best step is the first, not the
# last, and with save_total_limit=1 the Trainer deletes every other step at the end.
BEST: dict[str, object] = {
    "eval_strategy": "steps",
    "eval_steps": EVERY,
    "load_best_model_at_end": True,
    "metric_for_best_model": "loss",
    "greater_is_better": True,
    "save_total_limit": 1,
}


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences; the model learns to predict them (labels are the inputs)."""

    def __init__(self, n: int = 48, length: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(*, seed: int = 0, dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _args(out: Path, **overrides: object) -> TrainingArguments:
    options: dict[str, object] = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "max_steps": STEPS,
        "save_steps": EVERY,
        "per_device_train_batch_size": 8,
        "logging_steps": 1000,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)


def _trainer(
    out: Path, *, model: GPT2LMHeadModel | None = None, **kwargs: object
) -> TorchkeepTrainer:
    storage = kwargs.pop("storage", None)
    callbacks = kwargs.pop("callbacks", None)
    return TorchkeepTrainer(
        model=model if model is not None else _model(),
        args=_args(out, **kwargs),
        train_dataset=_Tokens(),
        eval_dataset=_Tokens(16) if kwargs.get("eval_strategy") else None,
        callbacks=callbacks,
        storage=storage,
    )


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"


def _forbid(what: str):
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} was called: a pickle would have been written or read")

    return forbidden


def _pickles(root: Path) -> list[str]:
    """Files that are pickles or torch.save archives, by name or by their first bytes."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        head = path.read_bytes()[:4]
        if (
            path.suffix in (".pt", ".pth", ".bin", ".pkl")
            or head[:1] == b"\x80"
            or head == b"PK\x03\x04"
        ):
            found.append(str(path.relative_to(root)))
    return found


class _Interrupt(Exception):
    pass


class _InterruptAfterSave(TrainerCallback):
    """Stops the run the way a crash would, right after the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run, checkpoints every EVERY steps, with torch.save and torch.load
    made to fail: its output directory and final weights."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", _forbid("torch.save"))
        patch.setattr(torch, "load", _forbid("torch.load"))
        trainer = _trainer(out)
        result = trainer.train()
    assert result.global_step == STEPS
    return out, _weights(trainer.model)


def test_checkpoints_hold_no_pickle_and_verify(reference):
    out, final = reference
    steps = sorted(p.name for p in out.iterdir())
    assert steps == [f"checkpoint-{s}" for s in range(EVERY, STEPS + 1, EVERY)]
    assert _pickles(out) == []
    for name in steps:
        step = out / name
        assert {p.name for p in step.iterdir()} == {
            "manifest.json",
            "shard-00000.safetensors",
            "config.json",
            "generation_config.json",
            "trainer_state.json",
            "training_args.json",
        }
        report = tk.verify(step)
        assert report.ok and report.checksummed, report.problems
        assert json.loads((step / "trainer_state.json").read_text())["global_step"] == int(
            name.split("-")[1]
        )
    assert get_last_checkpoint(str(out)) == str(out / f"checkpoint-{STEPS}")
    # The last step's model is the trained model: built from the step's config, it loads with
    # torchkeep alone.
    last = out / f"checkpoint-{STEPS}"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(last))
    tk.load_weights(model, last)
    _assert_same_weights(_weights(model), final)


@pytest.mark.parametrize("resume", ["latest", "path"])
def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    tmp_path, reference, monkeypatch, resume
):
    _, final = reference
    out = tmp_path / "run"
    if resume == "latest":
        with pytest.raises(_Interrupt):
            _trainer(out, callbacks=[_InterruptAfterSave(4)]).train()
        assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
        start: bool | str = True
    else:  # an earlier step while later ones exist: they are written again, replaced whole
        _trainer(out).train()
        start = str(out / "checkpoint-2")
    monkeypatch.setattr(torch, "save", _forbid("torch.save"))
    monkeypatch.setattr(torch, "load", _forbid("torch.load"))
    trainer = _trainer(out, model=_model(seed=1))
    result = trainer.train(resume_from_checkpoint=start)
    assert result.global_step == trainer.state.global_step == STEPS
    _assert_same_weights(_weights(trainer.model), final)
    assert all(tk.verify(step).ok for step in out.iterdir())


def test_save_total_limit_keeps_the_newest_steps(tmp_path):
    out = tmp_path / "run"
    _trainer(out, max_steps=8, save_total_limit=2).train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert all(tk.verify(step).ok for step in out.iterdir())


def _flip_tensor_byte(shard: Path, tensor: str | None = None) -> None:
    """Flip a bit in the data of ``tensor``, or at the 100th byte of the tensors' data."""
    data = bytearray(shard.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    offset = 100 if tensor is None else json.loads(data[8 : 8 + header])[tensor]["data_offsets"][0]
    data[8 + header + offset] ^= 0x01
    shard.write_bytes(bytes(data))


def _change_trainer_state(step: Path) -> None:
    # Still valid JSON, and the same size: only the checksum can tell.
    path = step / "trainer_state.json"
    text = path.read_text()
    assert '"global_step": 2,' in text
    path.write_text(text.replace('"global_step": 2,', '"global_step": 3,'))


@pytest.mark.parametrize("damage", ["tensor", "trainer_state"])
def test_damaged_checkpoint_refuses_to_resume(tmp_path, reference, damage):
    out, _ = reference
    step = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", step)
    if damage == "tensor":
        _flip_tensor_byte(step / "shard-00000.safetensors")
    else:
        _change_trainer_state(step)
    assert not tk.verify(step).ok
    model = _model(seed=1)
    before = _weights(model)
    trainer = _trainer(tmp_path / "run", model=model)
    with pytest.raises(tk.CorruptCheckpointError, match="checkpoint-2"):
        trainer.train(resume_from_checkpoint=str(step))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # Refused before a byte was read into the model: not one parameter changed.
    _assert_same_weights(_weights(model), before)


class _FailingCommit(LocalStorage):
    """Fails the rename that would commit ``checkpoint-4`` with an error, as a failing disk
    would (the runs killed there are in test_a_killed_run_leaves_whole_steps_to_resume_from)."""

    def commit_dir(self, staging: str, path: str, *, replace_entry: bool = False) -> None:
        if path.endswith("checkpoint-4"):
            raise OSError(errno.EIO, "injected failure of the commit")
        super().commit_dir(staging, path, replace_entry=replace_entry)


def test_failed_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, reference):
    _, final = reference
    out = tmp_path / "run"
    with pytest.raises(OSError, match="injected failure"):
        _trainer(out, storage=_FailingCommit()).train()
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert tk.verify(out / "checkpoint-2").ok
    # A process killed mid-save leaves its staging directory: never taken for a checkpoint,
    # and removed before training resumes.
    (out / ".checkpoint-4.tmp-0123456789ab").mkdir()
    (out / ".checkpoint-4.tmp-0123456789ab" / "shard-00000.safetensors").write_bytes(b"torn")
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    trainer = _trainer(out, model=_model(seed=1))
    trainer.train(resume_from_checkpoint=True)
    _assert_same_weights(_weights(trainer.model), final)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def _stock_run(out: Path) -> Trainer:
    """Four steps of the stock Trainer, without dropout: its checkpoints' random generator
    state (which cannot be read without running numpy code) then does not matter."""
    stock = Trainer(
        model=_model(dropout=0.0), args=_args(out, max_steps=4), train_dataset=_Tokens()
    )
    stock.train()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    return stock


def _after_stock(out: Path, storage: LocalStorage | None = None) -> TorchkeepTrainer:
    """The trainer that goes on from a stock run's checkpoint, writing its steps into ``out``."""
    return TorchkeepTrainer(
        model=_model(seed=1, dropout=0.0),
        args=_args(out, max_steps=4),
        train_dataset=_Tokens(),
        storage=storage,
    )


def test_resumes_a_checkpoint_of_the_stock_trainer_without_torch_load(
    tmp_path, monkeypatch, caplog
):
    out = tmp_path / "stock"
    stock = _stock_run(out)
    monkeypatch.setattr(torch, "load", _forbid("torch.load"))
    trainer = _after_stock(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="torchkeep.integrations.transformers"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.state.global_step == 4
    _assert_same_weights(_weights(trainer.model), _weights(stock.model))
    assert "random generators' state not restored" in caplog.text


def test_stock_step_in_the_way_is_replaced_whole_and_put_back_on_failure(tmp_path):
    out = tmp_path / "stock"
    _stock_run(out)
    stock_step = {p.name: p.read_bytes() for p in (out / "checkpoint-4").iterdir()}
    # The save of checkpoint-4 fails: the stock step it was replacing is back, as it was.
    with pytest.raises(OSError, match="injected failure"):
        _after_stock(out, _FailingCommit()).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-4").iterdir()} == stock_step
    # It succeeds: checkpoint-4 is now a torchkeep save, and nothing is left beside it.
    _after_stock(out).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4"]
    assert tk.verify(out / "checkpoint-4").ok


@pytest.mark.parametrize("extra", ["a file", "a directory"])
def test_directory_not_clearly_a_stock_step_is_never_replaced(tmp_path, extra):
    out = tmp_path / "stock"
    _stock_run(out)
    if extra == "a file":  # nothing the stock Trainer writes: the user's own directory
        shutil.rmtree(out / "checkpoint-4")
        (out / "checkpoint-4").mkdir()
        (out / "checkpoint-4" / "notes.txt").write_text("mine")
    else:
        (out / "checkpoint-4" / "mine").mkdir()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(tk.StorageError, match="checkpoint-4: exists and is not a checkpoint"):
        _after_stock(out).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


class _RecordWeights(TrainerCallback):
    """Keeps the model's weights at every save, by step."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = _weights(model)


def test_best_model_comes_back_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    record = _RecordWeights()
    trainer = _trainer(out, callbacks=[record], **BEST)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(out / f"checkpoint-{EVERY}")
    # The other steps were deleted at the end (save_total_limit=1), the best one is whole.
    assert os.listdir(out) == [f"checkpoint-{EVERY}"]
    assert tk.verify(best).ok
    # The model holds the best step's weights, not the last step's.
    assert any(not torch.equal(record.saved[EVERY][k], v) for k, v in record.saved[STEPS].items())
    _assert_same_weights(_weights(trainer.model), record.saved[EVERY])
    saved = _model(seed=1)
    tk.load_weights(saved, best)
    _assert_same_weights(_weights(saved), record.saved[EVERY])


class _DamageBestAtLastSave(TrainerCallback):
    """Flips a bit of the best step's position embeddings (read after most of the model's
    tensors) once the last step is saved."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == STEPS:
            shard = self.out / f"checkpoint-{EVERY}" / "shard-00000.safetensors"
            _flip_tensor_byte(shard, "model.transformer.wpe.weight")


@pytest.mark.parametrize("limit", [1, None])
def test_damaged_best_model_is_refused_and_the_other_steps_kept(tmp_path, limit):
    # With save_total_limit=1 the Trainer would delete every other step at the end.
    out = tmp_path / "run"
    record = _RecordWeights()
    options = {**BEST, "save_total_limit": limit}
    trainer = _trainer(out, callbacks=[record, _DamageBestAtLastSave(out)], **options)
    with pytest.raises(tk.CorruptCheckpointError, match=f"checkpoint-{EVERY}"):
        trainer.train()
    # The last step is still there to resume from, and the model holds the weights it had.
    assert tk.verify(out / f"checkpoint-{STEPS}").ok
    _assert_same_weights(_weights(trainer.model), record.saved[STEPS])


# Run in a fresh interpreter (argv: the point where the process ends, the output directory),
# which ends on the spot, as a kill would, at that point of a training run.
_KILLED_RUN = """
import os, shutil, sys

import torchkeep.storage.local
from torchkeep.testing import EXIT_CODE
from test_transformers import BEST, _after_stock, _model, _trainer
from torchkeep.storage import LocalStorage

point, out = sys.argv[1], sys.argv[2]


class KilledAtCommit(LocalStorage):
    def commit_dir(self, staging, path, **options):
        if path.endswith("checkpoint-4"):
            os._exit(EXIT_CODE)
        super().commit_dir(staging, path, **options)


if point == "commit":
    _trainer(out, storage=KilledAtCommit()).train()
elif point == "between-renames":
    # Without the atomic exchange (macOS), checkpoint-4, written again, replaces the previous
    # version in two renames: the process ends after the first.
    torchkeep.storage.local._exchange = lambda a, b: False
    rename = os.rename

    def rename_then_end(src, dst):
        rename(src, dst)
        if os.path.basename(src) == "checkpoint-4":
            os._exit(EXIT_CODE)

    os.rename = rename_then_end
    _trainer(out, model=_model(seed=1)).train(os.path.join(out, "checkpoint-2"))
elif point == "final-deletion":
    # The last step, deleted at the end because it is not the best: half deleted, then killed.
    rmtree = shutil.rmtree

    def rmtree_ends_halfway(path, *args, **kwargs):
        if "checkpoint-6" in os.path.basename(path):
            os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
            os._exit(EXIT_CODE)
        rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree_ends_halfway
    _trainer(out, **BEST).train()
elif point == "stock-replaced":
    _after_stock(out, KilledAtCommit()).train(os.path.join(out, "checkpoint-2"))
sys.exit(f"{point}: the run finished without being killed")
"""


def test_a_killed_run_leaves_whole_steps_to_resume_from(tmp_path, reference, caplog):
    _, final = reference
    points = ["commit", "between-renames", "final-deletion", "stock-replaced"]
    outs = {point: tmp_path / point for point in points}
    with pytest.raises(_Interrupt):
        _trainer(outs["between-renames"], callbacks=[_InterruptAfterSave(4)]).train()
    _stock_run(outs["stock-replaced"])
    stock_step = sorted(os.listdir(outs["stock-replaced"] / "checkpoint-4"))
    tests = os.path.dirname(os.path.abspath(__file__))
    src = os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, tests])}
    # One interpreter each (most of their time is imports), all at once.
    runs = {
        point: subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, point, str(outs[point])],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for point in points
    }
    for point, run in runs.items():
        output, _ = run.communicate(timeout=300)
        assert run.returncode == EXIT_CODE, f"{point}: {output[-3000:]}"

    for point in ["commit", "between-renames", "final-deletion"]:
        out = outs[point]
        last = get_last_checkpoint(str(out))
        assert last == str(out / "checkpoint-2"), (point, os.listdir(out))
        assert tk.verify(last).ok
        caplog.clear()
        trainer = _trainer(out, model=_model(seed=1), **(BEST if point == "final-deletion" else {}))
        with caplog.at_level(logging.INFO, logger="torchkeep.integrations.transformers"):
            assert trainer.train(resume_from_checkpoint=True).global_step == STEPS
        assert all(tk.verify(step).ok for step in out.iterdir())
        if point == "between-renames":
            # The previous checkpoint-4, left only at ….old, was put back before the Trainer
            # looked for the last step: training went on from it.
            assert f"resuming from {out / 'checkpoint-4'}" in caplog.text
        if point != "final-deletion":
            _assert_same_weights(_weights(trainer.model), final)

    # The stock Trainer's step being replaced comes back whole, and training goes on from it.
    out = outs["stock-replaced"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchkeep.integrations.transformers"):
        _after_stock(out).train(resume_from_checkpoint=True)
    assert f"{out / 'checkpoint-4'} was written by transformers.Trainer" in caplog.text
    assert sorted(os.listdir(out / "checkpoint-4")) == stock_step
    assert not [name for name in os.listdir(out) if name.startswith(".")]


def test_save_model_writes_no_training_args_pickle(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _forbid("torch.save"))
    trainer = _trainer(tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    names = set(os.listdir(tmp_path / "final"))
    assert "training_args.bin" not in names
    assert {"config.json", "model.safetensors", "training_args.json"} <= names
    assert json.loads((tmp_path / "final" / "training_args.json").read_text())["max_steps"] == STEPS
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    _assert_same_weights(_weights(loaded), _weights(trainer.model))


def test_push_to_hub_is_refused_before_reaching_the_hub(tmp_path):
    with pytest.raises(ValueError, match="push_to_hub"):
        _trainer(tmp_path / "run", push_to_hub=True, hub_model_id="nobody/nothing")


@pytest.mark.parametrize("missing", ["transformers", "accelerate"])
def test_missing_extra_raises_missing_dependency_error(monkeypatch, missing):
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.transformers")
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` sees when it is not installed
    with pytest.raises(tk.MissingDependencyError, match=r"pip install 'torchkeep\[transformers\]'"):
        importlib.import_module("torchkeep.integrations.transformers")
