"""The Lightning plugin: real Trainers on the CPU, checkpointing through torchkeep."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pathlib
import subprocess
import sys
import uuid
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from conftest import assert_same_tree
from torchkeep.format import pickle_kind
from torchkeep.integrations.lightning import CHECKPOINT_FILE, TorchkeepCheckpointIO

STEPS_PER_EPOCH = 4

# Resuming into the directory a run checkpointed to is what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.01, **extra: object) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8 * STEPS_PER_EPOCH, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(8 * STEPS_PER_EPOCH, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def make_trainer(root, epochs, callbacks=(), plugin=None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        plugins=[plugin if plugin is not None else TorchkeepCheckpointIO()],
        callbacks=list(callbacks),
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
    )


def fit(model, root, epochs, callbacks=(), plugin=None, ckpt_path=None) -> pl.Trainer:
    trainer = make_trainer(root, epochs, callbacks, plugin)
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return trainer


def fit_without_plugin(model, root, epochs, callbacks=()) -> None:
    """Lightning's own checkpoints: torch.save files."""
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        default_root_dir=root,
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(), loader())


def files_under(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_no_pickle(root: pathlib.Path) -> None:
    for path in files_under(root):
        with open(path, "rb") as f:
            head = f.read(16)
        assert pickle_kind(head) is None, path
        assert path.suffix == ".safetensors", path


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Probe(Callback):
    """Records where a (resumed) fit starts."""

    def on_train_start(self, trainer, pl_module):
        self.epoch = trainer.current_epoch
        self.step = trainer.global_step
        self.weights = weights_of(pl_module)


class RemovalLog(TorchkeepCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.removed: list[str] = []

    def remove_checkpoint(self, path) -> None:
        self.removed.append(os.fspath(path))
        super().remove_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# saving


def test_fit_writes_verified_torchkeep_checkpoints_and_no_pickle(tmp_path):
    pl.seed_everything(0)
    model = Regressor()
    ckpts = tmp_path / "ckpts"
    trainer = fit(
        model, tmp_path, 2, [ModelCheckpoint(dirpath=ckpts, save_top_k=-1, save_last=True)]
    )

    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    for name in names:
        assert sorted(p.name for p in (ckpts / name).iterdir()) == [CHECKPOINT_FILE]
        report = tk.verify(ckpts / name / CHECKPOINT_FILE)
        assert report.ok, report.problems
    assert_no_pickle(tmp_path)

    # The file is Lightning's checkpoint dict, readable by torchkeep alone.
    saved = tk.load(ckpts / "last.ckpt" / CHECKPOINT_FILE)
    assert saved["epoch"] == 1 and saved["global_step"] == 2 * STEPS_PER_EPOCH
    assert saved["pytorch-lightning_version"] == pl.__version__
    assert saved["hyper_parameters"] == {"hidden": 8, "lr": 0.01}
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    assert_same_tree(saved["optimizer_states"][0], trainer.optimizers[0].state_dict())

    # Through the plugin, the state dict is an OrderedDict with the modules' versions again.
    loaded = TorchkeepCheckpointIO().load_checkpoint(ckpts / "last.ckpt")
    assert isinstance(loaded["state_dict"], OrderedDict)
    assert loaded["state_dict"]._metadata == model.state_dict()._metadata


def test_checkpoint_dicts_round_trip_with_their_types(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state_dict = model.state_dict()
    ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": state_dict,
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"base_lrs": [0.1], "last_epoch": 3, "_last_lr": [0.025]}],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'train_time_interval': None}": {
                "best_model_score": torch.tensor(0.25),
                "best_k_models": {"/run/ckpts/epoch=2-step=90.ckpt": torch.tensor(0.25)},
                "kth_value": torch.tensor(float("inf")),
                "dirpath": "/run/ckpts",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0,
                "stopping_reason_message": None,
            },
        },
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"ready": 120}}}},
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "sizes": (3, 2), "eps": float("nan"), "tag": b"\x00"},
        "extra": {7: "int key", (1, 2): "tuple key", None: [], 0.5: {}},
        # Other module state dicts, wherever they are, keep their modules' versions too.
        "averaged": {"ema": [ema.state_dict()], 3: nn.Linear(1, 1).state_dict()},
    }
    path = tmp_path / "epoch=3-step=120.ckpt"
    plugin = TorchkeepCheckpointIO()
    plugin.save_checkpoint(checkpoint, path)

    back = plugin.load_checkpoint(path)
    assert_same_tree(back, checkpoint)
    assert back["state_dict"]._metadata == state_dict._metadata
    assert back["averaged"]["ema"][0]._metadata == ema.state_dict()._metadata
    assert back["averaged"][3]._metadata == {"": {"version": 1}}
    plugin.save_checkpoint(ema.state_dict(), tmp_path / "ema.ckpt")  # a checkpoint that is one
    assert_same_tree(plugin.load_checkpoint(tmp_path / "ema.ckpt"), ema.state_dict())
    assert plugin.load_checkpoint(tmp_path / "ema.ckpt")._metadata == ema.state_dict()._metadata
    assert plugin.load_checkpoint(str(path), map_location="cpu")["global_step"] == 120
    with pytest.raises(TypeError, match="map_location"):
        plugin.load_checkpoint(path, map_location=lambda storage, loc: storage)


# ---------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize("resume_from", ["path", "last"])
def test_resume_continues_the_run_exactly(tmp_path, resume_from):
    epochs, stop = 4, 2
    pl.seed_everything(0)
    whole = Regressor()
    whole_trainer = fit(whole, tmp_path / "whole", epochs, [ModelCheckpoint(save_last=True)])

    pl.seed_everything(0)
    first = Regressor()
    ckpts = tmp_path / "ckpts"
    fit(first, tmp_path / "first", stop, [ModelCheckpoint(dirpath=ckpts, save_last=True)])
    stopped = weights_of(first)

    pl.seed_everything(1)  # other initial weights: only the checkpoint can make the runs agree
    resumed = Regressor()
    probe = Probe()
    ckpt_path = ckpts / f"epoch={stop - 1}-step={stop * STEPS_PER_EPOCH}.ckpt"
    trainer = fit(
        resumed,
        tmp_path / "second",
        epochs,
        [ModelCheckpoint(dirpath=ckpts, save_last=True), probe],
        ckpt_path=str(ckpt_path) if resume_from == "path" else "last",
    )

    assert probe.epoch == stop and probe.step == stop * STEPS_PER_EPOCH
    assert_same_tree(probe.weights, stopped)
    assert trainer.current_epoch == epochs and trainer.global_step == epochs * STEPS_PER_EPOCH
    assert_same_tree(resumed.state_dict(), whole.state_dict())
    assert_same_tree(trainer.optimizers[0].state_dict(), whole_trainer.optimizers[0].state_dict())
    assert_same_tree(
        trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        whole_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    )
    # The resumed run went on checkpointing through the plugin into the same directory.
    last = TorchkeepCheckpointIO().load_checkpoint(ckpts / "last.ckpt")
    assert last["global_step"] == epochs * STEPS_PER_EPOCH
    assert_no_pickle(ckpts)


def test_resume_from_a_torch_save_checkpoint_written_before_the_plugin(tmp_path):
    pl.seed_everything(0)
    ckpts = tmp_path / "ckpts"
    model = Regressor()
    fit_without_plugin(model, tmp_path, 1, [ModelCheckpoint(dirpath=ckpts, save_last=True)])
    assert (ckpts / "last.ckpt").is_file()  # torch.save's pickle

    probe = Probe()
    callbacks = [ModelCheckpoint(dirpath=ckpts, save_last=True), probe]
    trainer = fit(Regressor(), tmp_path, 2, callbacks, ckpt_path=str(ckpts / "last.ckpt"))
    assert probe.step == STEPS_PER_EPOCH
    assert_same_tree(probe.weights, weights_of(model))
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    # The pickle at last.ckpt was replaced by a torchkeep checkpoint.
    assert (ckpts / "last.ckpt" / CHECKPOINT_FILE).is_file()
    assert tk.verify(ckpts / "last.ckpt" / CHECKPOINT_FILE).ok


def test_a_corrupted_checkpoint_is_refused_not_loaded(tmp_path):
    pl.seed_everything(0)
    ckpts = tmp_path / "ckpts"
    fit(Regressor(), tmp_path, 1, [ModelCheckpoint(dirpath=ckpts, save_last=True)])
    target = ckpts / "last.ckpt" / CHECKPOINT_FILE
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # tensor data: the header comes first
    target.write_bytes(bytes(data))

    model = Regressor()
    before = weights_of(model)
    with pytest.raises(tk.CorruptCheckpointError):
        fit(
            model, tmp_path, 2, [ModelCheckpoint(dirpath=ckpts)], ckpt_path=str(ckpts / "last.ckpt")
        )
    assert_same_tree(weights_of(model), before)

    with pytest.raises(tk.CheckpointNotFoundError):
        fit(Regressor(), tmp_path, 2, ckpt_path=str(ckpts / "missing.ckpt"))


# ---------------------------------------------------------------------------------------------
# ModelCheckpoint: top-k, links


def test_top_k_removal_goes_through_the_plugin(tmp_path):
    pl.seed_everything(0)
    ckpts = tmp_path / "ckpts"
    plugin = RemovalLog()
    callback = ModelCheckpoint(dirpath=ckpts, monitor="step", mode="max", save_top_k=2)
    fit(Regressor(), tmp_path, 4, [callback], plugin=plugin)

    assert [os.path.basename(p) for p in plugin.removed] == [
        "epoch=0-step=4.ckpt",
        "epoch=1-step=8.ckpt",
    ]
    assert sorted(os.listdir(ckpts)) == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt"]
    assert callback.best_model_path == str(ckpts / "epoch=3-step=16.ckpt")

    probe = Probe()
    trainer = make_trainer(tmp_path, 4, [callback, probe], plugin)
    trainer.validate(Regressor(), loader(), ckpt_path="best", verbose=False)
    assert_same_tree(
        trainer.lightning_module.state_dict(),
        OrderedDict(tk.load(ckpts / "epoch=3-step=16.ckpt" / CHECKPOINT_FILE)["state_dict"]),
    )


def test_save_last_link_resumes_and_is_never_written_through(tmp_path):
    pl.seed_everything(0)
    ckpts = tmp_path / "ckpts"
    fit(Regressor(), tmp_path, 2, [ModelCheckpoint(dirpath=ckpts, save_last="link")])
    link = ckpts / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "epoch=1-step=8.ckpt"

    probe = Probe()
    fit(
        Regressor(),
        tmp_path,
        3,
        [ModelCheckpoint(dirpath=ckpts, save_last="link"), probe],
        ckpt_path="last",
    )
    assert probe.step == 2 * STEPS_PER_EPOCH
    assert os.readlink(link) == "epoch=2-step=12.ckpt"

    # Saving to the link replaces the link; removing it removes the link alone.
    plugin = TorchkeepCheckpointIO()
    target = ckpts / "epoch=2-step=12.ckpt"
    before = (target / CHECKPOINT_FILE).read_bytes()
    plugin.save_checkpoint({"global_step": 99}, link)
    assert not link.is_symlink() and plugin.load_checkpoint(link) == {"global_step": 99}
    assert (target / CHECKPOINT_FILE).read_bytes() == before
    os.remove(link / CHECKPOINT_FILE)
    os.rmdir(link)
    os.symlink(target.name, link)
    plugin.remove_checkpoint(link)
    assert not os.path.lexists(link)
    assert (target / CHECKPOINT_FILE).read_bytes() == before


def test_saves_replace_checkpoints_remove_leftovers_and_spare_other_files(tmp_path, caplog):
    plugin = TorchkeepCheckpointIO()
    ckpts = tmp_path / "ckpts"
    path = ckpts / "last.ckpt"
    plugin.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert plugin.load_checkpoint(path)["global_step"] == 2
    assert os.listdir(ckpts) == ["last.ckpt"]  # nothing left beside it

    # Crashes leave hidden entries, of this name and of other checkpoints' (a top-k save or
    # removal cut short: Lightning may never save that name again), directories or, after an
    # exchange with a torch.save file, a file. The next save removes them all, and nothing else.
    hidden = [".last.ckpt.tmp-0123456789ab", ".epoch=3-step=40.ckpt.tmp-0123456789ab"]
    for name in hidden:
        (ckpts / name).mkdir()
        (ckpts / name / CHECKPOINT_FILE).write_bytes(b"x")
    (ckpts / ".epoch=4-step=50.ckpt.tmp-0123456789ab").write_bytes(b"a torch.save file")
    (ckpts / ".notes.txt.tmp-0123456789ab").write_text("another writer's temporary file")
    # A replacement cut short between its two renames (where the exchange is unavailable) left
    # the previous version aside: it goes back where its path is missing, if it is whole.
    plugin.save_checkpoint({"global_step": 30}, ckpts / "epoch=2-step=30.ckpt")
    os.rename(ckpts / "epoch=2-step=30.ckpt", ckpts / ".epoch=2-step=30.ckpt.tmp-0123456789ab.old")
    damaged = ckpts / ".epoch=5-step=60.ckpt.tmp-0123456789ab.old"
    damaged.mkdir()
    (damaged / CHECKPOINT_FILE).write_bytes(b"x")
    plugin.save_checkpoint({"global_step": 3}, path)
    assert sorted(os.listdir(ckpts)) == [
        ".notes.txt.tmp-0123456789ab",
        "epoch=2-step=30.ckpt",
        "last.ckpt",
    ]
    assert plugin.load_checkpoint(ckpts / "epoch=2-step=30.ckpt") == {"global_step": 30}
    os.remove(ckpts / ".notes.txt.tmp-0123456789ab")
    plugin.remove_checkpoint(ckpts / "epoch=2-step=30.ckpt")

    # A directory that is not a checkpoint is never replaced, nor emptied by a removal.
    other = ckpts / "notes.ckpt"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(tk.StorageError, match="not a checkpoint"):
        plugin.save_checkpoint({"global_step": 4}, other)
    with pytest.raises(tk.IncompleteCheckpointError, match=f"holds no {CHECKPOINT_FILE}"):
        plugin.load_checkpoint(other)
    plugin.remove_checkpoint(other)
    assert (other / "notes.txt").read_text() == "keep me"

    # Nor is a checkpoint whose directory holds the user's files too: saving would delete them.
    mixed = ckpts / "mixed.ckpt"
    plugin.save_checkpoint({"global_step": 5}, mixed)
    (mixed / "notes.txt").write_text("keep me")
    with pytest.raises(tk.StorageError, match=r"besides the checkpoint's .*\(notes\.txt\)") as e:
        plugin.save_checkpoint({"global_step": 6}, mixed)
    assert e.value.errno == errno.EEXIST
    assert plugin.load_checkpoint(mixed)["global_step"] == 5
    with caplog.at_level("WARNING", logger="torchkeep.integrations.lightning"):
        plugin.remove_checkpoint(mixed)
    assert "kept the directory" in caplog.text and "notes.txt" in caplog.text
    assert os.listdir(mixed) == ["notes.txt"]

    plugin.remove_checkpoint(path)
    plugin.remove_checkpoint(path)  # already gone: nothing to do
    assert sorted(os.listdir(ckpts)) == ["mixed.ckpt", "notes.ckpt"]


# ---------------------------------------------------------------------------------------------
# crashes: a save or a removal ended at a named step, as a kill there would

KILLED = 75  # the process ended at its step (and not elsewhere)
NO_EXCHANGE = 76  # the file system has no RENAME_EXCHANGE
ENTRIES = ["directory", "file", "link"]  # what last.ckpt is before the killed save
# The steps of a replacement: before the commit; after the atomic exchange, before the old
# entry is deleted; and where the exchange is unavailable, between the two renames (the old
# entry moved aside) and after them (the old entry not yet deleted).
REPLACE_STEPS = ["commit", "exchanged", "moved-aside", "renamed"]
COMMITTED = {"exchanged", "renamed"}  # the new checkpoint is in place

# One interpreter imports Lightning once (seconds); each crash runs in a process forked from it,
# which ends with os._exit at its step, so the save's `finally` and `except` blocks never run.
_CRASH = """
import json, os, sys, traceback
import torch
import torchkeep.storage.local as storage
from torchkeep.integrations.lightning import TorchkeepCheckpointIO

job = json.loads(sys.argv[1])
rename, exchange = os.rename, storage._exchange


def end():
    os._exit(job["killed"])


def arm(step):
    if step in ("commit", "top-k"):
        storage.LocalStorage.commit_dir = lambda self, staging, path, **options: end()
    elif step == "remove":
        storage.LocalStorage.remove_dir = lambda self, path: end()
    elif step == "exchanged":
        def exchanged(a, b):
            if exchange(a, b):
                end()
            os._exit(job["no_exchange"])
        storage._exchange = exchanged
    else:  # the two renames, as where RENAME_EXCHANGE is unavailable
        storage._exchange = lambda a, b: False
        def renamed(a, b):
            second = os.path.lexists(f"{a}.old")  # the staging directory goes into place
            rename(a, b)
            if (step == "moved-aside" and b.endswith(".old")) or (step == "renamed" and second):
                end()
        os.rename = renamed


plugin = TorchkeepCheckpointIO()
codes = {}
for case, (step, path) in job["cases"].items():
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            arm(step)
            if step == "remove":
                plugin.remove_checkpoint(path)
            else:
                plugin.save_checkpoint({"global_step": 99, "w": torch.ones(3)}, path)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    codes[case] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


def _previous_run(root: pathlib.Path, entry: str) -> pathlib.Path:
    """One epoch of training, checkpointed: last.ckpt is a checkpoint directory, a torch.save
    file (written before the plugin was used) or a link to the epoch's checkpoint."""
    ckpts = root / "ckpts"
    if entry == "file":
        fit_without_plugin(Regressor(), root, 1, [ModelCheckpoint(dirpath=ckpts, save_last=True)])
    else:
        save_last = "link" if entry == "link" else True
        fit(Regressor(), root, 1, [ModelCheckpoint(dirpath=ckpts, save_last=save_last)])
    return ckpts


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Every crash case, run once: {case: (its checkpoint directory, its exit code, stderr)}."""
    root = tmp_path_factory.mktemp("crashes")
    cases, dirs = {}, {}
    for entry in ENTRIES:
        for step in REPLACE_STEPS:
            case = f"{entry}-{step}"
            dirs[case] = _previous_run(root / case, entry)
            cases[case] = (step, str(dirs[case] / "last.ckpt"))
    # A top-k removal, and a top-k save of a name no save will use again.
    for step, name in (("remove", "epoch=0-step=4.ckpt"), ("top-k", "epoch=1-step=8.ckpt")):
        dirs[step] = _previous_run(root / step, "directory")
        cases[step] = (step, str(dirs[step] / name))
    job = {"killed": KILLED, "no_exchange": NO_EXCHANGE, "cases": cases}
    done = subprocess.run(
        [sys.executable, "-c", _CRASH, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.splitlines()[-1])
    return {case: (dirs[case], codes[case], done.stderr) for case in cases}


def hidden_in(ckpts: pathlib.Path) -> list[str]:
    return sorted(n for n in os.listdir(ckpts) if n.startswith("."))


def verified(path: pathlib.Path) -> bool:
    inner = path / CHECKPOINT_FILE
    report = tk.verify(inner if inner.exists() else path)
    return report.ok


@pytest.mark.parametrize("step", REPLACE_STEPS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_save_killed_while_replacing_last_leaves_a_whole_checkpoint(crashed, entry, step):
    ckpts, code, stderr = crashed[f"{entry}-{step}"]
    if code == NO_EXCHANGE:
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert code == KILLED, stderr[-3000:]
    last = ckpts / "last.ckpt"
    plugin = TorchkeepCheckpointIO()
    if step in COMMITTED:
        assert plugin.load_checkpoint(last)["global_step"] == 99 and verified(last)
        assert hidden_in(ckpts)  # the previous entry, not yet deleted
        plugin.save_checkpoint({"global_step": 100}, last)
        assert hidden_in(ckpts) == []  # the next save removed it
        return

    if step == "moved-aside":
        # Only between the fallback's two renames is the path missing: Lightning's "last"
        # would find nothing, but loading the path puts the previous checkpoint back.
        assert not os.path.lexists(last) and hidden_in(ckpts)
    previous = plugin.load_checkpoint(last)
    assert previous["global_step"] == STEPS_PER_EPOCH and verified(last)
    if entry == "file":
        assert last.is_file() and not last.is_symlink()
    elif entry == "link":
        assert os.readlink(last) == "epoch=0-step=4.ckpt"
    assert (last / CHECKPOINT_FILE).is_file() is (entry != "file")

    # A run resumed with ckpt_path="last" starts from it, and its first save cleans up.
    probe = Probe()
    save_last = "link" if entry == "link" else True
    callbacks = [ModelCheckpoint(dirpath=ckpts, save_last=save_last), probe]
    trainer = fit(Regressor(), ckpts.parent, 2, callbacks, ckpt_path="last")
    assert probe.step == STEPS_PER_EPOCH
    assert_same_tree(probe.weights, dict(previous["state_dict"]))
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert hidden_in(ckpts) == []


def test_a_removal_killed_halfway_leaves_no_half_removed_checkpoint(crashed):
    ckpts, code, stderr = crashed["remove"]
    assert code == KILLED, stderr[-3000:]
    # Renamed out of sight before any of it was deleted: Lightning sees no empty epoch=0-step=4.ckpt
    # (which it would count as taken), and the next save removes the hidden rest.
    assert not os.path.lexists(ckpts / "epoch=0-step=4.ckpt")
    assert [n.split(".tmp-")[0] for n in hidden_in(ckpts)] == [".epoch=0-step=4.ckpt"]
    TorchkeepCheckpointIO().save_checkpoint({"global_step": 99}, ckpts / "last.ckpt")
    assert sorted(os.listdir(ckpts)) == ["last.ckpt"]


def test_a_top_k_save_killed_before_its_commit_is_removed_by_the_next_save(crashed):
    ckpts, code, stderr = crashed["top-k"]
    assert code == KILLED, stderr[-3000:]
    assert not os.path.lexists(ckpts / "epoch=1-step=8.ckpt")
    (staging,) = hidden_in(ckpts)
    assert (ckpts / staging / CHECKPOINT_FILE).stat().st_size > 0  # a whole save's worth
    # Lightning never saves that name again; a save of another checkpoint removes it.
    TorchkeepCheckpointIO().save_checkpoint({"global_step": 99}, ckpts / "last.ckpt")
    assert sorted(os.listdir(ckpts)) == ["epoch=0-step=4.ckpt", "last.ckpt"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_commit_failing_between_the_two_renames_puts_the_previous_entry_back(
    tmp_path, monkeypatch, entry
):
    import torchkeep.storage.local as storage

    plugin = TorchkeepCheckpointIO()
    ckpts = tmp_path / "ckpts"
    last = ckpts / "last.ckpt"
    if entry == "file":
        ckpts.mkdir()
        torch.save({"global_step": 1}, last)
    elif entry == "link":
        plugin.save_checkpoint({"global_step": 1}, ckpts / "epoch=0-step=4.ckpt")
        last.symlink_to("epoch=0-step=4.ckpt")
    else:
        plugin.save_checkpoint({"global_step": 1}, last)

    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    rename = os.rename

    def second_fails(a, b):
        if os.path.lexists(f"{a}.old"):
            raise OSError(errno.EIO, "injected failure")
        rename(a, b)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(tk.StorageError, match="injected failure"):
        plugin.save_checkpoint({"global_step": 2}, last)
    monkeypatch.undo()
    assert os.path.lexists(last) and last.is_symlink() is (entry == "link")
    assert plugin.load_checkpoint(last) == {"global_step": 1}
    assert hidden_in(ckpts) == []


def test_checkpoints_on_an_object_store(tmp_path):
    root = f"memory://tk-lightning-{uuid.uuid4().hex[:12]}/ckpts"
    plugin = RemovalLog()
    callback = ModelCheckpoint(dirpath=root, monitor="step", mode="max", save_top_k=1)
    pl.seed_everything(0)
    model = Regressor()
    fit(model, tmp_path, 2, [callback], plugin=plugin)
    assert [p.rsplit("/", 1)[-1] for p in plugin.removed] == ["epoch=0-step=4.ckpt"]
    best = f"{root}/epoch=1-step=8.ckpt"
    assert callback.best_model_path == best
    assert tk.verify(f"{best}/{CHECKPOINT_FILE}").ok
    assert plugin.load_checkpoint(best)["global_step"] == 2 * STEPS_PER_EPOCH

    probe = Probe()
    callbacks = [ModelCheckpoint(dirpath=root, monitor="step", mode="max", save_top_k=1), probe]
    fit(Regressor(), tmp_path, 3, callbacks, plugin=plugin, ckpt_path=best)
    assert probe.step == 2 * STEPS_PER_EPOCH
    assert_same_tree(probe.weights, weights_of(model))
    plugin.remove_checkpoint(best)
    with pytest.raises(tk.CheckpointNotFoundError):
        plugin.load_checkpoint(best)


def test_fabric_saves_and_loads_through_the_plugin(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[TorchkeepCheckpointIO()])
    model, optimizer = fabric.setup(*_model_and_optimizer())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "state.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 5})
    assert tk.verify(path / CHECKPOINT_FILE).ok
    # The model's state dict keeps its modules' versions, as torch.save would.
    saved = TorchkeepCheckpointIO().load_checkpoint(path)["model"]
    assert isinstance(saved, OrderedDict)
    assert saved._metadata == model.state_dict()._metadata == {"": {"version": 1}}

    fresh, fresh_optimizer = fabric.setup(*_model_and_optimizer())
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(path, state)
    assert state["step"] == 5
    assert_same_tree(weights_of(fresh), weights_of(model))
    assert_same_tree(fresh_optimizer.state_dict(), optimizer.state_dict())


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters())


# ---------------------------------------------------------------------------------------------
# what cannot be stored, and a missing Lightning


def test_a_value_that_cannot_be_stored_is_refused_by_name(tmp_path):
    ckpts = tmp_path / "ckpts"
    model = Regressor(data_dir=pathlib.Path("/data"))
    with pytest.raises(tk.UnsupportedObjectError) as info:
        fit(model, tmp_path, 1, [ModelCheckpoint(dirpath=ckpts)])
    message = str(info.value)
    assert "hyper_parameters.data_dir" in message and "pathlib" in message
    assert "save_hyperparameters(ignore=['data_dir'])" in message
    assert files_under(tmp_path) == []  # nothing written, nothing left behind

    plugin = TorchkeepCheckpointIO()
    path = tmp_path / "x.ckpt"
    # An object with state_dict() would come back as a dict: refused too.
    with pytest.raises(tk.UnsupportedObjectError, match=r"hyper_parameters\.backbone: .*Linear"):
        plugin.save_checkpoint({"hyper_parameters": {"backbone": nn.Linear(2, 2)}}, path)
    with pytest.raises(tk.UnsupportedObjectError, match=r"extra\.when\.1: .*set"):
        plugin.save_checkpoint({"extra": {"when": [1, {2, 3}]}}, path)
    # A checkpoint is a dict; anything else is refused, by torchkeep's error (a TypeError).
    with pytest.raises(tk.UnsupportedObjectError, match=r"x\.ckpt: .*is a dict.*type list") as e:
        plugin.save_checkpoint([1, 2], path)
    assert isinstance(e.value, TypeError)
    assert files_under(tmp_path) == [] and list(tmp_path.rglob("*.ckpt*")) == []


def test_missing_lightning_raises_missing_dependency_error(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("lightning", "lightning_fabric"):
            monkeypatch.setitem(sys.modules, name, None)  # None: the import fails
    monkeypatch.delitem(sys.modules, "torchkeep.integrations.lightning")
    with pytest.raises(
        tk.MissingDependencyError, match=r"pip install 'torchkeep\[lightning\]'"
    ) as info:
        importlib.import_module("torchkeep.integrations.lightning")
    assert isinstance(info.value, ImportError)


def test_pytorch_lightning_trainer_accepts_the_plugin(tmp_path):
    import pytorch_lightning as ptl  # a separate package, which `lightning` installs

    class Tiny(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    options = {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "logger": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "plugins": [TorchkeepCheckpointIO()],
    }
    ckpts = tmp_path / "ckpts"
    callback = ptl.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True)
    ptl.Trainer(max_epochs=1, callbacks=[callback], **options).fit(Tiny(), loader())
    assert tk.verify(ckpts / "last.ckpt" / CHECKPOINT_FILE).ok
    callback = ptl.callbacks.ModelCheckpoint(dirpath=ckpts, save_last=True)
    trainer = ptl.Trainer(max_epochs=2, callbacks=[callback], **options)
    trainer.fit(Tiny(), loader(), ckpt_path="last")
    assert trainer.global_step == 2 * STEPS_PER_EPOCH


def test_the_path_lightning_reports_opens_with_every_reader(tmp_path, capsys):
    from torchkeep.cli import main

    pl.seed_everything(0)
    model = Regressor()
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=1, monitor="train_loss")
    fit(model, tmp_path, 1, [callback])
    path = callback.best_model_path  # the directory, as Lightning names it
    assert path.endswith(".ckpt") and os.path.isdir(path)

    saved = tk.load(path)
    assert saved["epoch"] == 0 and saved["hyper_parameters"] == {"hidden": 8, "lr": 0.01}
    assert saved["state_dict"]._metadata == model.state_dict()._metadata
    weights = tk.load_state_dict(path)
    assert weights.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    described = tk.describe(path)
    assert described.format == "torchkeep file" and described.checksummed
    report = tk.verify(path)
    assert report.ok and report.checksummed and report.tensors == len(described.tensors)
    assert tk.diff(path, path).same
    for command in (["inspect", path], ["verify", path]):
        assert main(command) == 0, command
    assert f"ok {path}" in capsys.readouterr().out
