"""Incremental checkpoints: a save writes only the tensors that changed since an earlier one and
shares that save's files for the rest; every step stays whole on its own."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.format import MANIFEST_FILE, SHARD_NAME
from torchkeep.testing import EXIT_CODE, INCREMENTAL_STEPS, FaultyStorage

MiB = 1 << 20


class FrozenBase(nn.Module):
    """A frozen encoder (about 4 MiB) under a small trainable head: a linear probe."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
        self.head = nn.Linear(512, 4)
        self.encoder.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 512)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _probe() -> tuple[FrozenBase, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FrozenBase()
    return model, torch.optim.AdamW(model.head.parameters(), lr=0.01)


def _flat(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shards(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if SHARD_NAME.fullmatch(n))


def _manifest(directory) -> dict:
    with open(os.path.join(directory, MANIFEST_FILE)) as f:
        return json.load(f)


def _inodes(directory) -> dict[str, int]:
    return {n: os.stat(os.path.join(directory, n)).st_ino for n in _shards(directory)}


def _encoder_bytes(model: FrozenBase) -> int:
    return sum(p.numel() * p.element_size() for p in model.encoder.state_dict().values())


# ---------------------------------------------------------------------------------------------
# The manager


def test_a_frozen_base_is_written_once_and_every_step_is_whole(tmp_path):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    saved: dict[int, dict[str, torch.Tensor]] = {}
    infos = {}
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in range(1, 5):
            _train_step(model, optimizer)
            infos[step] = mgr.save(step, state)
            saved[step] = _flat(model)
        paths = {s: mgr.path(s) for s in mgr.steps()}

    encoder = _encoder_bytes(model)
    assert infos[1].shared_bytes == 0 and infos[1].file_bytes > encoder
    for step in (2, 3, 4):
        info = infos[step]
        # Only the head and its optimizer state are written: a few KiB, not the encoder.
        assert info.shared_bytes == encoder, (step, info)
        assert info.file_bytes < 64 * 1024, (step, info)
        assert info.tensor_bytes == infos[1].tensor_bytes
    # The encoder's shard is one file, linked into every step.
    first = _inodes(paths[1])
    assert len(first) == 1
    (name, inode), = first.items()
    for step in (2, 3, 4):
        assert _inodes(paths[step])[name] == inode
        assert len(_shards(paths[step])) == 2  # the shared shard and the step's own
        manifest = _manifest(paths[step])
        assert manifest["format_version"] == 4
        assert manifest["shared"] == {name: _manifest(paths[1])["save_id"]}
    assert os.stat(os.path.join(paths[1], name)).st_nlink == 4
    # Every step reads back as it was saved, through every reader.
    for step, path in paths.items():
        assert tk.verify(path).ok
        loaded = tk.load(path)
        for key, value in saved[step].items():
            assert torch.equal(loaded["model"][key], value), (step, key)
        weights = tk.load_state_dict(path)  # the model's weights in the checkpoint
        assert torch.equal(weights["encoder.0.weight"], saved[step]["encoder.0.weight"])
        lazy = tk.load_state_dict(path, lazy=True)
        assert torch.equal(lazy["head.weight"], saved[step]["head.weight"])
        assert tk.describe(path).tensors
    difference = tk.diff(paths[3], paths[4])
    changed = {c.name for c in difference.changed}
    assert "model.head.weight" in changed and not any("encoder" in n for n in changed)


def test_deleting_the_step_that_wrote_a_shared_file_keeps_the_others_whole(tmp_path):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in range(1, 6):
            _train_step(model, optimizer)
            mgr.save(step, state)
        assert mgr.steps() == [4, 5]
        fresh, fresh_optimizer = _probe()
        fresh.encoder[0].weight.data.zero_()
        assert mgr.restore({"model": fresh, "optimizer": fresh_optimizer}) == 5
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for step in (4, 5):
        assert tk.verify(tmp_path / f"step_{step:09d}").ok
    # The disk holds the encoder once, plus each kept step's own few KiB.
    inodes = {}
    for step_dir in tmp_path.glob("step_*"):
        for name in _shards(step_dir):
            st = os.stat(step_dir / name)
            inodes[st.st_ino] = st.st_size
    assert sum(inodes.values()) < _encoder_bytes(model) + 256 * 1024


def test_incremental_false_writes_every_step_whole(tmp_path):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=None, incremental=False) as mgr:
        for step in (1, 2):
            _train_step(model, optimizer)
            info = mgr.save(step, state)
        assert info.shared_bytes == 0 and info.file_bytes > _encoder_bytes(model)
        manifest = _manifest(mgr.path(2))
        assert "shared" not in manifest and manifest["format_version"] < 4
        assert _shards(mgr.path(2)) == ["shard-00000.safetensors"]
        assert _inodes(mgr.path(1)) != _inodes(mgr.path(2))


def test_a_change_the_version_counter_misses_is_written(tmp_path):
    """Writes through .data or numpy leave the version counter as it was: the checksum, not
    the hint, decides what is shared."""
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, state)
        version = model.encoder[0].weight._version
        model.encoder[0].weight.data[0, 0] += 1.0
        model.encoder[2].bias.numpy()[3] = 7.0
        assert model.encoder[0].weight._version == version
        info = mgr.save(2, state)
        assert 0 < info.shared_bytes < _encoder_bytes(model)
        loaded = tk.load(mgr.path(2))["model"]
        assert torch.equal(loaded["encoder.0.weight"], model.encoder[0].weight)
        assert loaded["encoder.2.bias"][3] == 7.0
        assert tk.load(mgr.path(1))["model"]["encoder.2.bias"][3] != 7.0


def test_a_change_back_to_the_same_bytes_is_still_correct(tmp_path):
    """A tensor changed in place (its version moved) but holding the same bytes is written
    again: the hint said changed. The step is whole and right either way."""
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, state)
        with torch.no_grad():
            model.encoder[0].weight.add_(0.0)
        info = mgr.save(2, state)
        assert info.shared_bytes > 0
        own = [n for n in _shards(mgr.path(2)) if n not in _manifest(mgr.path(2))["shared"]]
        entry = _manifest(mgr.path(2))["tensors"]["model.encoder.0.weight"]
        assert [entry["file"]] == own  # written again, into the step's own shard
        assert tk.verify(mgr.path(2)).ok
        assert torch.equal(tk.load(mgr.path(2))["model"]["encoder.0.weight"], model.encoder[0].weight)


def test_a_new_manager_shares_with_the_steps_on_disk(tmp_path):
    """After a restart there are no hints: every tensor is hashed, and the unchanged shared."""
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(state) == 1
        _train_step(model, optimizer)
        info = mgr.save(2, state)
    assert info.shared_bytes == _encoder_bytes(model)
    assert tk.verify(tmp_path / "step_000000002").ok


def test_async_incremental_saves(tmp_path):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    saved = {}
    with tk.CheckpointManager(tmp_path, keep_last=None, async_save=True) as mgr:
        for step in range(1, 4):
            _train_step(model, optimizer)
            future = mgr.save(step, state)
            saved[step] = _flat(model)
            _train_step(model, optimizer)  # the model changes while the save is written
            info = future.result()
            if step > 1:
                assert info.shared_bytes == _encoder_bytes(model)
        for step in range(1, 4):
            assert tk.verify(mgr.path(step)).ok
            loaded = tk.load(mgr.path(step))["model"]
            for key, value in saved[step].items():
                assert torch.equal(loaded[key], value), (step, key)


def test_a_full_fine_tune_shares_nothing_and_writes_everything(tmp_path):
    torch.manual_seed(0)
    model = FrozenBase().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, state)
        _train_step(model, optimizer)
        info = mgr.save(2, state)
        assert info.shared_bytes == 0
        assert "shared" not in _manifest(mgr.path(2))
        loaded = tk.load(mgr.path(2))["model"]
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_damaged_newest_step_is_not_a_base_and_the_next_step_is_written_whole(tmp_path, caplog):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, state)
        shard = os.path.join(mgr.path(1), _shards(mgr.path(1))[0])
        with open(shard, "r+b") as f:
            f.seek(8)
            f.write(b"{{")  # the header no longer parses
        with caplog.at_level("WARNING", logger="torchkeep.manager"):
            info = mgr.save(2, state)
        assert "cannot be a base" in caplog.text
        assert info.shared_bytes == 0 and tk.verify(mgr.path(2)).ok


# ---------------------------------------------------------------------------------------------
# Missing and substituted shared files


def _two_steps(root):
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, state)
        first = _flat(model)
        _train_step(model, optimizer)
        mgr.save(2, state)
    return first, _flat(model)


def test_a_step_whose_shared_file_is_gone_is_incomplete_and_latest_skips_it(tmp_path, caplog):
    first, _ = _two_steps(tmp_path)
    step2 = tmp_path / "step_000000002"
    shared = next(iter(_manifest(step2)["shared"]))
    os.remove(step2 / shared)

    report = tk.verify(step2)
    assert not report.ok and report.incomplete
    assert shared in report.problems[0] and "incomplete" in report.problems[0]
    with pytest.raises(tk.IncompleteCheckpointError, match="shares that shard"):
        tk.load(step2)

    model, optimizer = _probe()
    model.encoder[0].weight.data.zero_()
    with tk.CheckpointManager(tmp_path) as mgr:
        with caplog.at_level("WARNING", logger="torchkeep.manager"):
            assert mgr.restore({"model": model, "optimizer": optimizer}) == 1
        assert "restoring step 1 instead" in caplog.text
        for key, value in first.items():
            assert torch.equal(model.state_dict()[key], value), key
        with pytest.raises(tk.IncompleteCheckpointError):
            mgr.restore({"model": model, "optimizer": optimizer}, step=2)


def test_the_command_line_says_incomplete(tmp_path):
    _two_steps(tmp_path)
    step2 = tmp_path / "step_000000002"
    os.remove(step2 / next(iter(_manifest(step2)["shared"])))
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "verify", str(step2)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "INCOMPLETE" in done.stdout + done.stderr


def test_a_shared_file_from_another_save_is_refused(tmp_path):
    _two_steps(tmp_path / "a")
    _two_steps(tmp_path / "b")
    step2 = tmp_path / "a" / "step_000000002"
    shared = next(iter(_manifest(step2)["shared"]))
    os.remove(step2 / shared)
    os.link(tmp_path / "b" / "step_000000001" / shared, step2 / shared)
    with pytest.raises(tk.CorruptCheckpointError, match="the save it is shared from"):
        tk.load(step2)
    assert not tk.verify(step2).ok


def _resign(directory, change) -> None:
    from torchkeep.format import signed_manifest_text

    body = _manifest(directory)
    body.pop("manifest_checksum")
    change(body)
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        f.write(signed_manifest_text(body))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(shared=["x"]), "not an object"),
        (lambda b: b["shared"].update({"manifest.json": "0" * 32}), "not a shard of this save"),
        (lambda b: b["shared"].update({"shard-00001.safetensors": "0" * 32}), "not a shard"),
        (
            lambda b: b["shared"].update({k: "zz" for k in list(b["shared"])}),
            "not the id of an earlier save",
        ),
        (
            lambda b: b["shared"].update({k: b["save_id"] for k in list(b["shared"])}),
            "not the id of an earlier save",
        ),
    ],
)
def test_a_malformed_shared_table_is_corrupt(tmp_path, change, message):
    _two_steps(tmp_path)
    step2 = tmp_path / "step_000000002"
    _resign(step2, change)
    with pytest.raises(tk.CorruptCheckpointError, match=message):
        tk.load(step2)


def test_a_shared_shard_may_hold_tensors_the_step_took_from_elsewhere(tmp_path):
    """The encoder's shard of step 1 also holds step 1's head: step 2 reads only what its
    manifest names there; a tensor the manifest places in the shared shard at the wrong span
    is refused."""
    _two_steps(tmp_path)
    step2 = tmp_path / "step_000000002"
    shared = next(iter(_manifest(step2)["shared"]))

    def move(body):
        entry = body["tensors"]["model.encoder.0.bias"]
        assert entry["file"] == shared
        entry["offsets"] = [entry["offsets"][0] + 4, entry["offsets"][1] + 4]

    _resign(step2, move)
    with pytest.raises(tk.CorruptCheckpointError, match=r"model\.encoder\.0\.bias"):
        tk.load(step2)


# ---------------------------------------------------------------------------------------------
# tk.save(base=)


def test_save_with_a_base_shares_unchanged_tensors(tmp_path):
    model, optimizer = _probe()
    base = tk.save({"model": model}, tmp_path / "v1")
    _train_step(model, optimizer)
    info = tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert info.shared_bytes == _encoder_bytes(model)
    assert info.file_bytes < base.file_bytes / 50
    # The new save is whole without its base.
    import shutil

    shutil.rmtree(tmp_path / "v1")
    assert tk.verify(tmp_path / "v2").ok
    loaded = tk.load(tmp_path / "v2")["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # A chain: v3 shares the encoder (first written by v1) through v2.
    info = tk.save({"model": model}, tmp_path / "v3", base=tmp_path / "v2")
    assert info.shared_bytes == info.tensor_bytes and info.file_bytes < 16 * 1024
    assert _shards(tmp_path / "v3") == _shards(tmp_path / "v2")
    assert tk.verify(tmp_path / "v3").ok


def _nothing_written(tmp_path, target) -> None:
    assert not os.path.exists(target)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_missing_base_is_an_error_before_anything_is_written(tmp_path):
    model, _ = _probe()
    with pytest.raises(tk.CheckpointNotFoundError, match="no such checkpoint"):
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    _nothing_written(tmp_path, tmp_path / "v2")


def test_a_damaged_base_is_an_error_before_anything_is_written(tmp_path):
    model, _ = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    with open(tmp_path / "v1" / MANIFEST_FILE, "r+b") as f:
        f.seek(40)
        f.write(b"X")
    with pytest.raises(tk.CorruptCheckpointError):
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert not os.path.exists(tmp_path / "v2")


def test_an_uncommitted_base_is_an_error(tmp_path):
    model, _ = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    os.remove(tmp_path / "v1" / MANIFEST_FILE)
    with pytest.raises(tk.IncompleteCheckpointError):
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert not os.path.exists(tmp_path / "v2")


def test_a_base_from_another_run_is_an_error(tmp_path):
    tk.save({"other": nn.Linear(3, 3)}, tmp_path / "v1")
    model, _ = _probe()
    with pytest.raises(tk.StateMismatchError, match="not an earlier save of this state"):
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert not os.path.exists(tmp_path / "v2")


@pytest.mark.parametrize(
    "target, base, message",
    [
        ("v2.safetensors", "v1", "one-file save cannot share"),
        ("v2", "v1.safetensors", "one-file save cannot be a base"),
        ("v1", "v1", "its own base"),
        ("v2", "memory://bucket/v1", "on the storage the save goes to"),
    ],
)
def test_bases_that_cannot_be_are_usage_errors(tmp_path, target, base, message):
    model, _ = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    tk.save({"model": model}, tmp_path / "v1.safetensors")
    base_path = base if "://" in base else str(tmp_path / base)
    with pytest.raises(ValueError, match=message):
        tk.save({"model": model}, tmp_path / target, base=base_path)


def test_everything_unchanged_writes_only_a_manifest(tmp_path):
    model, _ = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    info = tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert info.shared_bytes == info.tensor_bytes
    assert set(os.listdir(tmp_path / "v2")) == {MANIFEST_FILE, *_shards(tmp_path / "v1")}
    assert info.file_bytes == os.path.getsize(tmp_path / "v2" / MANIFEST_FILE)
    assert tk.verify(tmp_path / "v2").ok


def test_a_dtype_or_shape_change_is_written(tmp_path):
    tk.save({"a": torch.ones(4, 4), "b": torch.ones(8), "c": torch.ones(1000)}, tmp_path / "v1")
    info = tk.save(
        {"a": torch.ones(4, 4, dtype=torch.float64), "b": torch.ones(2, 4), "c": torch.ones(1000)},
        tmp_path / "v2",
        base=tmp_path / "v1",
    )
    assert info.shared_bytes == 4000  # c alone
    loaded = tk.load(tmp_path / "v2")
    assert loaded["a"].dtype == torch.float64 and loaded["b"].shape == (2, 4)


# ---------------------------------------------------------------------------------------------
# Where hard links are refused, and failures at every step


def test_where_hard_links_are_refused_the_shared_file_is_copied(tmp_path, monkeypatch):
    model, optimizer = _probe()
    tk.save({"model": model}, tmp_path / "v1")

    def no_links(source, path):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    _train_step(model, optimizer)
    info = tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert info.shared_bytes == _encoder_bytes(model)
    name = _shards(tmp_path / "v1")[0]
    assert os.stat(tmp_path / "v2" / name).st_ino != os.stat(tmp_path / "v1" / name).st_ino
    assert tk.verify(tmp_path / "v2").ok
    loaded = tk.load(tmp_path / "v2")["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_another_link_error_fails_the_save_and_keeps_the_previous(tmp_path, monkeypatch):
    model, optimizer = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    tk.save({"model": model}, tmp_path / "v2")

    def failing(source, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", failing)
    _train_step(model, optimizer)
    with pytest.raises(tk.StorageError) as raised:
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert raised.value.errno == errno.EIO
    assert tk.verify(tmp_path / "v2").ok and tk.verify(tmp_path / "v1").ok
    assert sorted(os.listdir(tmp_path)) == ["v1", "v2"]


_INCREMENTAL_MANAGER = """
import sys
sys.path.insert(0, {tests!r})
import torch
import torchkeep as tk
from torchkeep.testing import FaultyStorage
frozen = torch.arange(1024 * 1024, dtype=torch.float32)
storage = FaultyStorage({step!r}, "exit")
storage.armed = False
with tk.CheckpointManager({root!r}, keep_last=1, storage=storage) as mgr:
    mgr.save(1, {{"frozen": frozen, "w": torch.full((512, 1024), 1.0)}})
    storage.armed = True
    mgr.save(2, {{"frozen": frozen, "w": torch.full((512, 1024), 2.0)}})
"""


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", INCREMENTAL_STEPS)
def test_an_incremental_save_failing_at_each_step(tmp_path, caplog, step, action):
    root = tmp_path / "run"
    frozen = torch.arange(1024 * 1024, dtype=torch.float32)
    if action == "raise":
        storage = FaultyStorage(step)
        storage.armed = False
        with tk.CheckpointManager(root, keep_last=1, storage=storage) as mgr:
            mgr.save(1, {"frozen": frozen, "w": torch.full((512, 1024), 1.0)})
            storage.armed = True
            state2 = {"frozen": frozen, "w": torch.full((512, 1024), 2.0)}
            if step == "delete":
                with caplog.at_level("WARNING", logger="torchkeep.manager"):
                    info = mgr.save(2, state2)
                assert info.shared_bytes == frozen.numel() * 4
            else:
                with pytest.raises(OSError, match="injected"):
                    mgr.save(2, state2)
    else:
        script = tmp_path / "manager.py"
        here = os.path.dirname(__file__)
        script.write_text(
            textwrap.dedent(_INCREMENTAL_MANAGER.format(tests=here, root=str(root), step=step))
        )
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == EXIT_CODE, done.stderr[-2000:]
    with tk.CheckpointManager(root, keep_last=1) as mgr:
        expected = 2 if step == "delete" else 1
        assert mgr.steps() == [expected], (step, mgr.steps())
        state = {"frozen": torch.zeros_like(frozen), "w": torch.zeros(512, 1024)}
        assert mgr.restore(state) == expected
        assert torch.equal(state["frozen"], frozen)
        assert torch.equal(state["w"], torch.full((512, 1024), float(expected)))
        assert tk.verify(mgr.path(expected)).ok
        info = mgr.save(3, {"frozen": frozen, "w": torch.full((512, 1024), 3.0)})
        assert info.shared_bytes == frozen.numel() * 4
        assert mgr.steps() == [3] and tk.verify(mgr.path(3)).ok
    assert sorted(p.name for p in root.iterdir() if p.name != ".torchkeep-writer.lock") == [
        "step_000000003"
    ]


# ---------------------------------------------------------------------------------------------
# Object storage: the store copies the shared files


def test_incremental_steps_on_s3(s3):
    root, opts = s3
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    saved = {}
    with tk.CheckpointManager(root, keep_last=2, storage_options=opts) as mgr:
        for step in range(1, 5):
            _train_step(model, optimizer)
            info = mgr.save(step, state)
            saved[step] = _flat(model)
            if step > 1:
                assert info.shared_bytes == _encoder_bytes(model)
                assert info.file_bytes < 64 * 1024
        assert mgr.steps() == [3, 4]
        for step in (3, 4):
            report = tk.verify(mgr.path(step), storage_options=opts)
            assert report.ok, report.problems
            loaded = tk.load(mgr.path(step), storage_options=opts)["model"]
            for key, value in saved[step].items():
                assert torch.equal(loaded[key], value), (step, key)
    with tk.CheckpointManager(root, storage_options=opts) as mgr:
        model, optimizer = _probe()
        assert mgr.restore({"model": model, "optimizer": optimizer}) == 4
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved[4].items())


def test_save_with_a_base_on_s3(s3):
    root, opts = s3
    model, optimizer = _probe()
    tk.save({"model": model}, f"{root}/v1", storage_options=opts)
    _train_step(model, optimizer)
    info = tk.save({"model": model}, f"{root}/v2", storage_options=opts, base=f"{root}/v1")
    assert info.shared_bytes == _encoder_bytes(model)
    loaded = tk.load(f"{root}/v2", storage_options=opts)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.save({"model": model}, f"{root}/v3", storage_options=opts, base=f"{root}/nothing")


def test_a_base_without_a_save_id_is_read_but_not_shared(tmp_path):
    """Directory saves made before saves had ids: their shards name no save to share from."""
    model, _ = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    _resign(tmp_path / "v1", lambda b: b.pop("save_id"))
    assert tk.verify(tmp_path / "v1").ok
    info = tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert info.shared_bytes == 0 and "shared" not in _manifest(tmp_path / "v2")
    assert tk.verify(tmp_path / "v2").ok


def test_a_few_small_unchanged_tensors_are_written_again_rather_than_share_a_large_file(tmp_path):
    """A full fine-tune with one constant buffer: sharing it would keep the whole first step's
    shard alive for a few bytes, so it is written again."""
    torch.manual_seed(0)
    model = FrozenBase().requires_grad_(True)
    model.register_buffer("positions", torch.arange(64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, state)
        _train_step(model, optimizer)
        info = mgr.save(2, state)
        assert info.shared_bytes == 0 and "shared" not in _manifest(mgr.path(2))
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_000000002"]


def test_a_storage_without_link_file_writes_every_step_whole(tmp_path):
    from torchkeep.storage import Linking, LocalStorage, Storage

    class Plain(Storage):
        """A storage written for an earlier torchkeep: every method but link_file."""

        atomic_dirs = True

        def __init__(self) -> None:
            self._inner = LocalStorage()

    for name in (
        "write_file", "open", "exists", "is_dir", "staging_dir", "commit_dir", "remove_dir",
        "remove_file", "make_dirs", "list_dir", "retire_dir", "leftovers", "recover",
    ):  # fmt: skip
        setattr(Plain, name, lambda self, *a, _n=name, **k: getattr(self._inner, _n)(*a, **k))
    assert not isinstance(Plain(), Linking)
    model, optimizer = _probe()
    state = {"model": model, "optimizer": optimizer}
    with tk.CheckpointManager(tmp_path, storage=Plain()) as mgr:
        mgr.save(1, state)
        _train_step(model, optimizer)
        info = mgr.save(2, state)
        assert info.shared_bytes == 0 and tk.verify(mgr.path(2)).ok
    with pytest.raises(ValueError, match="cannot share files"):
        tk.save({"model": model}, tmp_path / "v2", base=mgr.path(1), storage=Plain())


def test_a_base_replaced_while_the_save_links_it_commits_nothing(tmp_path, monkeypatch):
    import torchkeep.container.share as share

    model, optimizer = _probe()
    tk.save({"model": model}, tmp_path / "v1")
    opened = share.open_base

    def then_replaced(path, storage):
        base = opened(path, storage)
        tk.save({"model": model, "other": torch.ones(3)}, tmp_path / "v1")  # another save there
        return base

    monkeypatch.setattr(share, "open_base", then_replaced)
    _train_step(model, optimizer)
    with pytest.raises(tk.CorruptCheckpointError, match="replaced while this save shared it"):
        tk.save({"model": model}, tmp_path / "v2", base=tmp_path / "v1")
    assert not (tmp_path / "v2").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_in_place_a_failed_save_keeps_the_files_the_saved_one_shares(monkeypatch):
    """On an object store a save is built in place: a failed save over a save that shares the
    same base files must not delete them."""
    import uuid

    from torchkeep.storage import FsspecStorage

    root = f"memory://tk-{uuid.uuid4().hex[:12]}"
    model, optimizer = _probe()
    tk.save({"model": model}, f"{root}/v1")
    _train_step(model, optimizer)
    tk.save({"model": model}, f"{root}/v2", base=f"{root}/v1")
    written = FsspecStorage.write_file

    def failing(self, path, size, fill):
        if "/shard-" in path:
            raise OSError(errno.EIO, "injected")
        return written(self, path, size, fill)

    monkeypatch.setattr(FsspecStorage, "write_file", failing)
    _train_step(model, optimizer)
    with pytest.raises(OSError, match="injected"):
        tk.save({"model": model}, f"{root}/v2", base=f"{root}/v1")
    monkeypatch.setattr(FsspecStorage, "write_file", written)
    for path in (f"{root}/v1", f"{root}/v2"):
        report = tk.verify(path)
        assert report.ok, report.problems
    # And a save over it that succeeds keeps them, and deletes the replaced save's own shard.
    info = tk.save({"model": model}, f"{root}/v2", base=f"{root}/v1")
    assert info.shared_bytes == _encoder_bytes(model)
    assert tk.verify(f"{root}/v2").ok and tk.verify(f"{root}/v1").ok
    from torchkeep.storage import storage_for

    storage, _ = storage_for(f"{root}/v2")
    assert len([n for n in storage.list_dir(f"{root}/v2") if SHARD_NAME.fullmatch(n)]) == 2


def test_a_missing_file_to_share_on_an_object_store_is_named():
    import uuid

    from torchkeep.storage import storage_for

    storage, root = storage_for(f"memory://tk-{uuid.uuid4().hex[:12]}")
    with pytest.raises(tk.CheckpointNotFoundError, match="no such object"):
        storage.link_file(f"{root}/v1/shard-00000.safetensors", f"{root}/v2/shard-00000.safetensors")


def test_the_command_line_opens_incremental_steps_as_whole(tmp_path, capsys):
    from torchkeep.cli import main

    _two_steps(tmp_path)
    step1, step2 = str(tmp_path / "step_000000001"), str(tmp_path / "step_000000002")
    assert main(["inspect", step2]) == 0
    assert "model.encoder.0.weight" in capsys.readouterr().out
    assert main(["verify", step1, step2]) == 0
    assert main(["diff", step1, step2]) == 1  # the head changed
    out = capsys.readouterr().out
    assert "model.head.weight" in out and "model.encoder.0.weight" not in out
