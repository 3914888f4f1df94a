"""CheckpointManager: steps on disk, retention, restarts, async saves, failures, preemption."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchkeep as tk
from conftest import SimpleNet, assert_same_state, assert_same_tree, run_script, small_filesystem
from torchkeep.format import FORMAT_VERSION, signed_manifest_text
from torchkeep.manager import LOCK_FILE
from torchkeep.storage import LocalStorage, Sink

# ---------------------------------------------------------------------------------------------
# helpers


def _trained(seed: int) -> tuple[SimpleNet, torch.optim.Optimizer]:
    """A small model and an AdamW optimizer that has taken two steps (so it has state)."""
    torch.manual_seed(seed)
    model = SimpleNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 10)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _w(step: int) -> dict[str, torch.Tensor]:
    """A tiny state whose values say which step wrote them."""
    return {"w": torch.full((4,), float(step))}


def _restored_w(mgr: tk.CheckpointManager, step: int | str = "latest") -> tuple[Any, float]:
    state = {"w": torch.zeros(4)}
    got = mgr.restore(state, step=step)
    assert torch.equal(state["w"], torch.full((4,), state["w"][0].item()))
    return got, state["w"][0].item()


def _listing(root: Path) -> list[str]:
    """The root's entries, without the writer's lock file."""
    return sorted(n for n in os.listdir(root) if n != LOCK_FILE)


def _step_name(step: int) -> str:
    return f"step_{step:09d}"


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _reseal_manifest(step_dir: Path, edit: Any) -> None:
    """Rewrite a step's manifest changed by ``edit``, with a valid checksum of its own."""
    manifest = step_dir / "manifest.json"
    body = json.loads(manifest.read_text())
    edit(body)
    body.pop("manifest_checksum", None)
    manifest.write_text(signed_manifest_text(body))


class InjectedFault(OSError):
    pass


class _FailingSink:
    def __init__(self, inner: Sink) -> None:
        self._inner = inner

    def pwrite(self, data: memoryview, offset: int) -> None:
        raise InjectedFault(errno.EIO, "injected write failure")

    def written(self, offset: int, nbytes: int) -> None:
        self._inner.written(offset, nbytes)


class FaultyStorage(LocalStorage):
    """Local storage that, once ``fail`` names a phase, fails that phase of every save.

    Phases: ``write`` (the data), ``fsync`` (a file's fsync; the library turns it into a
    StorageError), ``manifest`` (the fsync of the manifest, the commit marker), ``mkdir`` (the
    staging directory) and ``commit`` (the rename that commits the step).
    """

    def __init__(self) -> None:
        self.fail: str | None = None
        self.commits: list[list[str]] = []

    def _sink(self, fd: int, path: str) -> Sink:
        sink = super()._sink(fd, path)
        return _FailingSink(sink) if self.fail == "write" else sink

    def write_file(self, path: str, size: int, fill: Any) -> None:
        self._path = path
        super().write_file(path, size, fill)

    def _fsync(self, fd: int) -> None:
        is_manifest = self._path.endswith("/manifest.json")
        if self.fail == "fsync" or (self.fail == "manifest" and is_manifest):
            raise InjectedFault(errno.EIO, "injected fsync failure")
        super()._fsync(fd)

    def staging_dir(self, path: str) -> str:
        if self.fail == "mkdir":
            raise InjectedFault(errno.EACCES, "injected mkdir failure")
        return super().staging_dir(path)

    def commit_dir(self, staging: str, path: str) -> None:
        # What is on disk when a step commits: retention must not have run yet.
        self.commits.append(_listing(Path(os.path.dirname(path))))
        if self.fail == "commit":
            raise InjectedFault(errno.EIO, "injected directory rename failure")
        super().commit_dir(staging, path)


class GatedStorage(LocalStorage):
    """Local storage whose file writes wait at a gate while it is held: a save kept in flight."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()
        self._lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    def hold(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def write_file(self, path: str, size: int, fill: Any) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if not self._open.is_set():
                self.waiting.set()
                if not self._open.wait(30):
                    raise TimeoutError("the test never released the gate")
            super().write_file(path, size, fill)
        finally:
            with self._lock:
                self.active -= 1


def _release_later(storage: GatedStorage, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, storage.release)
    timer.start()
    return timer


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_of_a_training_state_is_bitwise(tmp_path, async_save):
    model, optimizer = _trained(0)
    sampler = tk.ResumableSampler(50, seed=3)
    sampler.epoch = 1
    seen = iter(sampler)
    for _ in range(17):
        next(seen)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.random(), np.random.rand(), torch.rand(1)  # move the generators off their seeds
    state = {"model": model, "optimizer": optimizer, "sampler": sampler, "rng": tk.RNGState()}

    with tk.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        result = mgr.save(100, state, metrics={"loss": 0.5})
        if async_save:
            assert isinstance(result, Future)
            result = result.result()
        assert isinstance(result, tk.SaveInfo)
        assert result.path == mgr.path(100) == str(tmp_path / "step_000000100")
    # What a run that never stopped would have seen next.
    expected_model = copy.deepcopy(model.state_dict())
    expected_optimizer = copy.deepcopy(optimizer.state_dict())
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    expected_rest = list(seen)  # the rest of epoch 1, from sample 17 on
    assert len(expected_rest) == 33

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    fresh_model, fresh_optimizer = _trained(1)
    fresh_sampler = tk.ResumableSampler(50, seed=3)
    fresh = {
        "model": fresh_model,
        "optimizer": fresh_optimizer,
        "sampler": fresh_sampler,
        "rng": tk.RNGState(),
    }
    with tk.CheckpointManager(tmp_path, async_save=async_save) as mgr:
        assert mgr.restore(fresh) == 100
    assert_same_state(fresh_model, model)
    assert_same_tree(fresh_optimizer.state_dict(), expected_optimizer)
    assert_same_tree(fresh_model.state_dict(), expected_model)
    assert (fresh_sampler.epoch, fresh_sampler.index) == (1, 17)
    assert list(iter(fresh_sampler)) == expected_rest
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == expected_draws[:2]
    assert torch.equal(draws[2], expected_draws[2])


@pytest.mark.parametrize("async_save", [False, True])
def test_steps_are_directories_committed_by_their_manifest(tmp_path, async_save):
    with tk.CheckpointManager(tmp_path, keep_last=None, async_save=async_save) as mgr:
        for step in (0, 5, 1000):
            mgr.save(step, _w(step))
        mgr.wait()
        assert mgr.steps() == [0, 5, 1000]
        assert mgr.latest_step == 1000
    assert _listing(tmp_path) == ["step_000000000", "step_000000005", "step_000001000"]
    assert "manifest.json" in os.listdir(tmp_path / "step_000001000")
    assert tk.verify(tmp_path / "step_000001000").ok
    assert torch.equal(tk.load(tmp_path / "step_000000005")["w"], _w(5)["w"])


def test_path_names_the_step_directory(tmp_path):
    with tk.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.path(1000) == str(tmp_path / "ckpt" / "step_000001000")
        assert mgr.path(1234567890) == str(tmp_path / "ckpt" / "step_1234567890")
        assert not os.path.exists(mgr.path(1000))  # whether or not it exists
    assert (tmp_path / "ckpt").is_dir()  # the root is created


def test_steps_beyond_nine_digits(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(999_999_999, _w(1))
        mgr.save(1_000_000_000, _w(2))
        assert mgr.steps() == [999_999_999, 1_000_000_000]
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.steps() == [999_999_999, 1_000_000_000]
        assert _restored_w(mgr) == (1_000_000_000, 2.0)


def test_saving_a_step_again_replaces_it(tmp_path):
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _w(1), metrics={"loss": 1.0})
        mgr.save(2, _w(2), metrics={"loss": 2.0})
        mgr.save(2, _w(7), metrics={"loss": 0.5})
        assert mgr.steps() == [1, 2]
        assert mgr.metrics(2) == {"loss": 0.5}
        assert _restored_w(mgr, 2) == (2, 7.0)
    assert _listing(tmp_path) == ["step_000000001", "step_000000002"]


# ---------------------------------------------------------------------------------------------
# listing, metrics and best across restarts


def test_steps_latest_and_metrics_survive_a_restart(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="loss") as mgr:
        assert (mgr.steps(), mgr.latest_step, mgr.best_step) == ([], None, None)
        mgr.save(10, _w(10), metrics={"loss": 0.9, "acc": 0.1})
        mgr.save(20, _w(20), metrics={"loss": 0.2, "acc": 0.7})
        mgr.save(30, _w(30))  # no metrics
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="loss") as mgr:
        assert mgr.steps() == [10, 20, 30]
        assert mgr.latest_step == 30
        assert mgr.best_step == 20
        assert mgr.metrics(10) == {"loss": 0.9, "acc": 0.1}
        assert mgr.metrics(30) == {}
        assert mgr.problems == []
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="acc", mode="max") as mgr:
        assert mgr.best_step == 20
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.best_step is None  # no monitor


def test_best_step_survives_restarts_and_keeps_being_kept(tmp_path):
    def open_manager() -> tk.CheckpointManager:
        return tk.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss")

    with open_manager() as mgr:
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.4)]:
            mgr.save(step, _w(step), metrics={"loss": loss})
        assert mgr.steps() == [2, 3]
        assert mgr.best_step == 2
    with open_manager() as mgr:
        assert mgr.steps() == [2, 3]
        assert mgr.best_step == 2
        assert mgr.metrics(2) == {"loss": 0.1}
        for step, loss in [(4, 0.3), (5, 0.2), (6, 0.25)]:
            mgr.save(step, _w(step), metrics={"loss": loss})
        assert mgr.steps() == [2, 6]  # the best from before the restart is still kept
        assert _restored_w(mgr, "best") == (2, 2.0)
    assert _listing(tmp_path) == ["step_000000002", "step_000000006"]
    with open_manager() as mgr:
        mgr.save(7, _w(7), metrics={"loss": 0.05})  # a new best: the old one may go
        assert mgr.steps() == [7]
        assert mgr.best_step == 7
    assert _listing(tmp_path) == ["step_000000007"]


def test_keep_every_keeps_milestones_on_disk(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=2, keep_every=4) as mgr:
        for step in range(1, 11):
            mgr.save(step, _w(step))
        assert mgr.steps() == [4, 8, 9, 10]
    assert _listing(tmp_path) == [_step_name(s) for s in (4, 8, 9, 10)]


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_last_deletes_old_steps_from_disk(tmp_path, async_save):
    with tk.CheckpointManager(tmp_path, keep_last=2, async_save=async_save) as mgr:
        for step in range(1, 6):
            mgr.save(step, _w(step))
        mgr.wait()
        assert mgr.steps() == [4, 5]
    assert _listing(tmp_path) == ["step_000000004", "step_000000005"]


def test_keep_last_zero_keeps_the_newest(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=0) as mgr:
        mgr.save(1, _w(1))
        mgr.save(2, _w(2))
        assert mgr.steps() == [2]
        assert _restored_w(mgr) == (2, 2.0)


def test_metrics_of_a_missing_step(tmp_path):
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _w(1))
        with pytest.raises(tk.CheckpointNotFoundError, match=r"step 9 .*committed: 1\)"):
            mgr.metrics(9)


# ---------------------------------------------------------------------------------------------
# restore


def test_restore_on_an_empty_root_is_a_fresh_start(tmp_path):
    state = _w(3)
    with tk.CheckpointManager(tmp_path / "new") as mgr:
        assert mgr.restore(state) is None
        assert mgr.restore(state, step="latest") is None
    assert torch.equal(state["w"], _w(3)["w"])  # untouched


def test_restore_best_without_monitored_metrics_is_a_fresh_start(tmp_path):
    with tk.CheckpointManager(tmp_path, monitor="loss") as mgr:
        assert mgr.restore(_w(0), step="best") is None
        mgr.save(1, _w(1), metrics={"acc": 0.5})  # not the monitored metric
        state = _w(0)
        assert mgr.restore(state, step="best") is None
        assert torch.equal(state["w"], _w(0)["w"])
        assert _restored_w(mgr) == (1, 1.0)


def test_restore_best_and_a_given_step(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="acc", mode="max") as mgr:
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.4)]:
            mgr.save(step, _w(step), metrics={"acc": acc})
        assert _restored_w(mgr, "best") == (2, 2.0)
        assert _restored_w(mgr, 1) == (1, 1.0)
        assert _restored_w(mgr) == (3, 3.0)


def test_restore_of_a_missing_step_lists_the_committed_ones(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        with pytest.raises(tk.CheckpointNotFoundError, match=r"committed: none"):
            mgr.restore(_w(0), step=5)
        mgr.save(10, _w(10))
        mgr.save(20, _w(20))
        with pytest.raises(tk.CheckpointNotFoundError) as e:
            mgr.restore(_w(0), step=15)
        assert isinstance(e.value, FileNotFoundError)
        message = str(e.value)
        assert "step 15" in message and "committed: 10, 20" in message


def test_restore_best_without_monitor(tmp_path):
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _w(1), metrics={"loss": 0.1})
        with pytest.raises(ValueError, match="monitor"):
            mgr.restore(_w(0), step="best")


@pytest.mark.parametrize("step", ["newest", "3", True, 2.0, None])
def test_restore_of_an_invalid_step(tmp_path, step):
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _w(1))
        with pytest.raises(ValueError, match="step must be"):
            mgr.restore(_w(0), step=step)


def test_restore_of_a_damaged_step_is_a_clear_error_naming_an_older_step(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, _w(1))
        mgr.save(2, {"w": torch.arange(4096, dtype=torch.float32)})
    shard = tmp_path / "step_000000002" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.steps() == [1, 2]
        with pytest.raises(tk.CorruptCheckpointError, match=r"step=1\)"):
            mgr.restore({"w": torch.zeros(4096)})
        assert _restored_w(mgr, 1) == (1, 1.0)


# ---------------------------------------------------------------------------------------------
# what else is in the root


def test_stale_temporaries_are_removed_at_open_and_foreign_things_are_not(tmp_path):
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _w(1))
    stale = [
        ".step_000000002.tmp-0123456789ab",
        ".step_000000002.tmp-0123456789ab.old",
        ".step_000000001.tmp-ffffffffffff",
    ]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-00000.safetensors").write_bytes(b"x" * 100)
    (tmp_path / stale[0] / ".manifest.json.tmp-aaaaaaaaaaaa").write_bytes(b"{")
    foreign_files = {
        "notes.txt": b"my notes",
        ".step_000000003.tmp-0123456789ab": b"a file, not a directory",
        "step_000000099": b"a file named like a step",
        "other/data.bin": b"\x00\x01",
        "step_abc/manifest.json": b"{}",
        "step_12/x": b"too few digits",
        ".step_000000005.tmp-XYZ/x": b"not a staging name",
        ".step_000000005.tmp-0123456789abc/x": b"13 hex digits",
        "step_000000001.tmp-0123456789ab/x": b"no leading dot",
    }
    for name, data in foreign_files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)

    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [1]
        for name in stale:
            assert not (tmp_path / name).exists(), name
        for name, data in foreign_files.items():
            assert (tmp_path / name).read_bytes() == data, name
        for step in range(2, 8):  # retention deletes old steps, never foreign things
            mgr.save(step, _w(step))
        assert mgr.steps() == [5, 6, 7]
        assert _restored_w(mgr) == (7, 7.0)
    for name, data in foreign_files.items():
        assert (tmp_path / name).read_bytes() == data, name
    ours = {
        p for p in _listing(tmp_path) if re.fullmatch(r"step_\d{9}", p) and (tmp_path / p).is_dir()
    }
    assert ours == {"step_000000005", "step_000000006", "step_000000007"}


def _damaged_root(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """A root with one good step (2) and damaged steps 3, 4, 5, 6 and 8; return their files."""
    with tk.CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (2, 3, 4, 5, 6):
            mgr.save(step, _w(step), metrics={"loss": 0.25})
    (tmp_path / "step_000000003" / "manifest.json").unlink()  # a half-written step
    manifest = tmp_path / "step_000000004" / "manifest.json"
    text = manifest.read_bytes()
    assert text.count(b'"loss":0.25') == 1
    manifest.write_bytes(text.replace(b'"loss":0.25', b'"loss":0.15'))  # one byte changed
    _reseal_manifest(
        tmp_path / "step_000000005", lambda b: b.update(format_version=FORMAT_VERSION + 1)
    )
    _reseal_manifest(  # a step that claims to be another one (renamed)
        tmp_path / "step_000000006",
        lambda b: b["metadata"]["checkpoint_manager"].update(step=60),
    )
    tk.save({"w": torch.ones(2)}, tmp_path / "step_000000008")  # a torchkeep save, not a step
    damaged = ("step_000000003", "step_000000004", "step_000000005", "step_000000006")
    return {name: _tree_bytes(tmp_path / name) for name in (*damaged, "step_000000008")}


def test_damaged_steps_are_not_committed_explained_and_never_deleted(tmp_path):
    damaged = _damaged_root(tmp_path)
    mgr = tk.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss")
    try:
        assert mgr.steps() == [2]
        assert mgr.latest_step == 2
        assert mgr.best_step == 2
        assert len(mgr.problems) == 5
        by_step = {name: [p for p in mgr.problems if name in p] for name in damaged}
        assert all(len(found) == 1 for found in by_step.values()), mgr.problems
        assert "manifest.json" in by_step["step_000000003"][0]
        assert "checksum" in by_step["step_000000004"][0]
        assert f"format version {FORMAT_VERSION + 1}" in by_step["step_000000005"][0]
        assert "Upgrade torchkeep" in by_step["step_000000005"][0]
        assert "checkpoint manager" in by_step["step_000000006"][0]
        assert "checkpoint manager" in by_step["step_000000008"][0]
        assert _restored_w(mgr) == (2, 2.0)  # restore never trips over them
        for step in (3, 4, 5, 6, 8):
            with pytest.raises(tk.CheckpointNotFoundError, match=r"committed: 2\)"):
                mgr.restore(_w(0), step=step)
        for step in (10, 11, 12):
            mgr.save(step, _w(step), metrics={"loss": 1.0})
        assert mgr.steps() == [2, 12]  # step 2 is still the best
        mgr.save(13, _w(13), metrics={"loss": 0.01})
        assert mgr.steps() == [13]
    finally:
        mgr.close()
    for name, files in damaged.items():
        assert _tree_bytes(tmp_path / name) == files, name
    reopened = tk.CheckpointManager(tmp_path)
    assert reopened.steps() == [13]
    assert len(reopened.problems) == 5
    reopened.close()


def test_step_directory_with_a_non_canonical_name_is_not_listed_unless_restorable(tmp_path):
    # A committed step renamed with one more digit of padding: it parses as step 10, but the
    # manager's path for step 10 is another directory.
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(10, _w(10))
    os.rename(tmp_path / "step_000000010", tmp_path / "step_0000000010")
    with tk.CheckpointManager(tmp_path) as mgr:
        if 10 in mgr.steps():
            assert _restored_w(mgr, 10) == (10, 10.0)
            assert _restored_w(mgr) == (10, 10.0)
        else:
            assert mgr.restore(_w(0)) is None
            assert any("step_0000000010" in p for p in mgr.problems), mgr.problems


def test_root_that_is_a_file(tmp_path):
    root = tmp_path / "ckpt"
    root.write_bytes(b"not a directory")
    with pytest.raises(tk.StorageError, match="not a directory") as e:
        tk.CheckpointManager(root)
    assert str(root) in str(e.value)
    assert root.read_bytes() == b"not a directory"


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("step", [-1, True, False, "3", 1.0, None])
def test_invalid_step(tmp_path, step):
    with tk.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="step must be an integer of 0 or more"):
            mgr.save(step, _w(1))
        assert mgr.steps() == []
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    "metrics",
    [
        pytest.param({"loss": math.nan}, id="nan"),
        pytest.param({"loss": math.inf}, id="inf"),
        pytest.param({"loss": torch.tensor(math.nan)}, id="nan-tensor"),
        pytest.param({"loss": "0.5"}, id="string"),
        pytest.param({"loss": None}, id="none"),
        pytest.param({"loss": True}, id="bool"),
        pytest.param({"loss": [0.5]}, id="list"),
        pytest.param({"loss": torch.ones(2)}, id="tensor-of-two"),
        pytest.param({"loss": torch.tensor(True)}, id="bool-tensor"),
        pytest.param({1: 0.5}, id="int-name"),
        pytest.param([("loss", 0.5)], id="not-a-mapping"),
        pytest.param({"loss": 10**400}, id="int-too-large-for-a-float"),
    ],
)
def test_invalid_metrics(tmp_path, metrics):
    with tk.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ValueError, match="metric"):
            mgr.save(1, _w(1), metrics=metrics)
        assert mgr.steps() == []
    assert _listing(tmp_path) == []


def test_metrics_as_zero_dim_tensors(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="loss") as mgr:
        mgr.save(1, _w(1), metrics={"loss": torch.tensor(0.5), "tokens": torch.tensor(7)})
        mgr.save(2, _w(2), metrics={"loss": torch.tensor(0.25, requires_grad=True) * 1})
        mgr.save(3, _w(3), metrics={"loss": torch.tensor(0.75, dtype=torch.float64)})
        assert mgr.metrics(1) == {"loss": 0.5, "tokens": 7}
        assert type(mgr.metrics(1)["loss"]) is float and type(mgr.metrics(1)["tokens"]) is int
    with tk.CheckpointManager(tmp_path, keep_last=None, monitor="loss") as mgr:
        assert mgr.metrics(2) == {"loss": 0.25}
        assert mgr.best_step == 2


def test_close_is_idempotent_and_a_closed_manager_refuses_work(tmp_path):
    mgr = tk.CheckpointManager(tmp_path)
    mgr.save(1, _w(1))
    mgr.close()
    mgr.close()
    with pytest.raises(ValueError, match="closed"):
        mgr.save(2, _w(2))
    with pytest.raises(ValueError, match="closed"):
        mgr.restore(_w(0))
    assert _listing(tmp_path) == ["step_000000001"]
    with tk.CheckpointManager(tmp_path) as mgr:
        pass
    with pytest.raises(ValueError, match="closed"):
        mgr.save(2, _w(2))


def test_invalid_policy_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="keep_best needs monitor"):
        tk.CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        tk.CheckpointManager(tmp_path, mode="lowest")
    with pytest.raises(ValueError, match="keep_last"):
        tk.CheckpointManager(tmp_path, keep_last=-1)


# ---------------------------------------------------------------------------------------------
# async saves


def test_async_save_copies_the_state_before_returning(tmp_path):
    model, optimizer = _trained(0)
    big = torch.nn.Linear(512, 512)  # enough data that the write is still going on
    state = {"model": model, "optimizer": optimizer, "big": big}
    with tk.CheckpointManager(tmp_path, async_save=True) as mgr:
        for step in (1, 2):  # the second save reuses the staging buffers of the first
            expected = {
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict()),
                "big": copy.deepcopy(big.state_dict()),
            }
            future = mgr.save(step, state)
            with torch.no_grad():  # change everything in place the moment save() returns
                for p in [*model.parameters(), *big.parameters()]:
                    p.add_(1000.0)
            optimizer.zero_grad()
            model(torch.randn(4, 10)).sum().backward()
            optimizer.step()
            future.result()
            fresh_model, fresh_optimizer = _trained(5)
            fresh_big = torch.nn.Linear(512, 512)
            fresh = {"model": fresh_model, "optimizer": fresh_optimizer, "big": fresh_big}
            assert mgr.restore(fresh, step=step) == step
            assert_same_tree(fresh_model.state_dict(), expected["model"])
            assert_same_tree(fresh_optimizer.state_dict(), expected["optimizer"])
            assert_same_tree(fresh_big.state_dict(), expected["big"])


def test_one_async_save_in_flight_and_only_committed_steps_listed(tmp_path):
    storage = GatedStorage()
    with tk.CheckpointManager(tmp_path, async_save=True, storage=storage) as mgr:
        mgr.save(1, _w(1)).result()
        storage.hold()
        first = mgr.save(2, _w(2))
        assert storage.waiting.wait(10)
        assert not first.done()
        assert mgr.steps() == [1]  # step 2 is being written, not committed
        assert mgr.latest_step == 1
        assert any(n.startswith(".step_000000002.tmp-") for n in os.listdir(tmp_path))
        timer = _release_later(storage, 0.3)
        started = time.monotonic()
        second = mgr.save(3, _w(3))  # waits for the first
        assert first.done() and first.exception() is None
        assert time.monotonic() - started >= 0.25
        second.result()
        timer.join()
        assert storage.most_active == 1
        assert mgr.steps() == [1, 2, 3]


def test_close_waits_for_the_save_in_flight(tmp_path):
    storage = GatedStorage()
    mgr = tk.CheckpointManager(tmp_path, async_save=True, storage=storage)
    storage.hold()
    future = mgr.save(1, _w(1))
    assert storage.waiting.wait(10)
    timer = _release_later(storage, 0.2)
    mgr.close()
    timer.join()
    assert future.done() and future.exception() is None
    assert _listing(tmp_path) == ["step_000000001"]
    with tk.CheckpointManager(tmp_path) as reopened:
        assert _restored_w(reopened) == (1, 1.0)


@pytest.mark.parametrize("surfaces_from", ["save", "wait", "close", "exit", "restore"])
def test_background_error_is_raised_once_by_the_next_call(tmp_path, surfaces_from):
    storage = FaultyStorage()
    mgr = tk.CheckpointManager(tmp_path, async_save=True, storage=storage)
    mgr.save(1, _w(1)).result()
    storage.fail = "fsync"
    future = mgr.save(2, _w(2))
    assert isinstance(future.exception(timeout=10), tk.StorageError)
    storage.fail = None
    if surfaces_from == "save":
        with pytest.raises(tk.StorageError, match="injected fsync failure"):
            mgr.save(3, _w(3))
        assert mgr.steps() == [1]  # the save that raised did not run
        mgr.wait()  # raised once: not again
        mgr.save(3, _w(3)).result()
        assert mgr.steps() == [1, 3]
        mgr.close()
    elif surfaces_from == "wait":
        with pytest.raises(tk.StorageError, match="injected fsync failure"):
            mgr.wait()
        mgr.wait()
        mgr.close()
    elif surfaces_from == "close":
        with pytest.raises(tk.StorageError, match="injected fsync failure"):
            mgr.close()
        mgr.close()
    elif surfaces_from == "exit":
        with pytest.raises(tk.StorageError, match="injected fsync failure"), mgr:
            pass
    else:
        with pytest.raises(tk.StorageError, match="injected fsync failure"):
            mgr.restore(_w(0))
        assert _restored_w(mgr) == (1, 1.0)
        mgr.close()
    names = _listing(tmp_path)
    assert "step_000000002" not in names
    assert not [n for n in names if ".tmp-" in n], names  # nothing half-written left
    with tk.CheckpointManager(tmp_path) as reopened:
        assert 1 in reopened.steps() and 2 not in reopened.steps()
        assert _restored_w(reopened, 1) == (1, 1.0)
        assert reopened.problems == []


def test_error_in_with_block_is_not_masked_by_a_background_error(tmp_path):
    storage = FaultyStorage()
    with (
        pytest.raises(KeyError, match="from the loop"),
        tk.CheckpointManager(tmp_path, async_save=True, storage=storage) as mgr,
    ):
        mgr.save(1, _w(1)).result()
        storage.fail = "fsync"
        mgr.save(2, _w(2))
        raise KeyError("from the loop")
    assert _listing(tmp_path) == ["step_000000001"]


# ---------------------------------------------------------------------------------------------
# failures never cost the previous step


@pytest.mark.parametrize("phase", ["write", "fsync", "manifest", "mkdir", "commit"])
@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_keeps_the_previous_step(tmp_path, phase, async_save):
    storage = FaultyStorage()
    with tk.CheckpointManager(tmp_path, keep_last=1, async_save=async_save, storage=storage) as mgr:
        mgr.save(1, _w(1), metrics={"loss": 1.0})
        mgr.wait()
        storage.fail = phase
        with pytest.raises(OSError, match="injected") as e:
            mgr.save(2, _w(2), metrics={"loss": 0.5})
            mgr.wait()
        if phase in ("fsync", "manifest"):
            assert isinstance(e.value, tk.StorageError)
        assert mgr.steps() == [1]
        assert mgr.latest_step == 1
        assert _listing(tmp_path) == ["step_000000001"]  # no temporary left
        assert _restored_w(mgr) == (1, 1.0)
        storage.fail = None
        mgr.save(3, _w(3))  # the manager keeps working
        mgr.wait()
        assert mgr.steps() == [3]
    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [3]
        assert mgr.problems == []


def test_old_steps_are_deleted_only_after_the_new_one_is_committed(tmp_path):
    storage = FaultyStorage()
    with tk.CheckpointManager(tmp_path, keep_last=2, storage=storage) as mgr:
        for step in range(1, 5):
            mgr.save(step, _w(step))
        # When each step committed, every older step retention would keep was still there.
        for step, listing in zip(range(1, 5), storage.commits, strict=True):
            committed_before = [n for n in listing if n.startswith("step_")]
            assert committed_before == [_step_name(s) for s in range(max(1, step - 2), step)]
            assert any(n.startswith(f".{_step_name(step)}.tmp-") for n in listing)
        assert mgr.steps() == [3, 4]
        storage.fail = "commit"
        with pytest.raises(OSError, match="injected directory rename failure"):
            mgr.save(5, _w(5))
        assert mgr.steps() == [3, 4]  # nothing deleted for a step that never committed
        assert _listing(tmp_path) == ["step_000000003", "step_000000004"]
        storage.fail = "manifest"
        with pytest.raises(tk.StorageError):
            mgr.save(5, _w(5))
        assert _listing(tmp_path) == ["step_000000003", "step_000000004"]
        assert _restored_w(mgr) == (4, 4.0)


def test_opening_the_root_again_never_deletes_a_step_being_written(tmp_path):
    # Another manager opened on the same root (an evaluation job listing the steps, a restarted
    # shell) while a save is being written must not take that save's directory for a crash's.
    storage = GatedStorage()
    with tk.CheckpointManager(tmp_path, async_save=True, storage=storage) as mgr:
        mgr.save(1, _w(1)).result()
        storage.hold()
        future = mgr.save(2, _w(2))
        assert storage.waiting.wait(10)
        with tk.CheckpointManager(tmp_path) as reader:
            assert reader.steps() == [1]
        storage.release()
        assert future.exception(timeout=10) is None
        assert mgr.steps() == [1, 2]
    with tk.CheckpointManager(tmp_path) as mgr:
        assert _restored_w(mgr) == (2, 2.0)


def test_the_old_step_stays_while_the_new_one_is_written(tmp_path):
    # Retention runs after each save; while a save is held mid-write, all older steps and the
    # staging directory are there, and the old one goes only once the new one is committed.
    storage = GatedStorage()
    with tk.CheckpointManager(tmp_path, keep_last=1, async_save=True, storage=storage) as mgr:
        mgr.save(1, _w(1)).result()
        storage.hold()
        future = mgr.save(2, _w(2))
        assert storage.waiting.wait(10)
        names = _listing(tmp_path)
        assert "step_000000001" in names
        assert any(n.startswith(".step_000000002.tmp-") for n in names)
        assert torch.equal(tk.load(tmp_path / "step_000000001")["w"], _w(1)["w"])
        storage.release()
        future.result()
        assert mgr.steps() == [2]
    assert _listing(tmp_path) == ["step_000000002"]


def test_full_disk_is_a_storage_error_and_keeps_the_previous_step(tmp_path):
    mount = small_filesystem(tmp_path) if os.geteuid() == 0 else None
    if mount is None:
        pytest.skip("cannot mount a small tmpfs here; the RLIMIT_FSIZE test covers the path")
    try:
        with tk.CheckpointManager(mount, keep_last=1) as mgr:
            mgr.save(1, {"w": torch.full((100, 1000), 1.0)})  # 400 kB of 1 MiB
            with pytest.raises(tk.StorageError, match="free some disk") as e:
                mgr.save(2, {"w": torch.full((200, 1000), 2.0)})  # 800 kB: no room for both
            assert e.value.errno == errno.ENOSPC
            assert mgr.steps() == [1]
            assert _listing(mount) == ["step_000000001"]
            state = {"w": torch.zeros(100, 1000)}
            assert mgr.restore(state) == 1
            assert torch.equal(state["w"], torch.full((100, 1000), 1.0))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_script(script, cwd=tmp_path, timeout=120)


def test_file_size_limit_mid_save_is_a_storage_error_and_keeps_the_previous_step(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk refuses them.
    root = tmp_path / "ckpt"
    with tk.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(1, {"w": torch.full((100, 100), 1.0)}, metrics={"loss": 1.0})
    before = _tree_bytes(root / "step_000000001")
    result = _run_script(
        f"""
        import resource, signal, torch, torchkeep as tk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mgr = tk.CheckpointManager({str(root)!r}, keep_last=1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            mgr.save(2, {{"w": torch.full((1000, 1000), 2.0)}}, metrics={{"loss": 0.5}})
        except tk.StorageError as e:
            print("StorageError:", e)
        print("steps:", mgr.steps())
        mgr.close()
        """,
        tmp_path,
    )
    assert "StorageError:" in result.stdout, result.stdout + result.stderr
    assert "free some disk" in result.stdout
    assert "steps: [1]" in result.stdout
    assert _listing(root) == ["step_000000001"]
    assert _tree_bytes(root / "step_000000001") == before
    with tk.CheckpointManager(root) as mgr:
        assert mgr.steps() == [1] and mgr.problems == []
        state = {"w": torch.zeros(100, 100)}
        assert mgr.restore(state) == 1
        assert torch.equal(state["w"], torch.full((100, 100), 1.0))


# ---------------------------------------------------------------------------------------------
# preemption


@pytest.mark.parametrize(
    ("preemption", "signame", "other"),
    [("True", "SIGTERM", "SIGUSR1"), ("(signal.SIGUSR1,)", "SIGUSR1", "SIGTERM")],
)
def test_preemption_signal_sets_should_stop_and_handlers_come_back(
    tmp_path, preemption, signame, other
):
    root = tmp_path / "ckpt"
    result = _run_script(
        f"""
        import os, signal, sys, time, torch, torchkeep as tk
        sig, other = signal.{signame}, signal.{other}
        assert signal.getsignal(sig) is signal.SIG_DFL
        mgr = tk.CheckpointManager({str(root)!r}, preemption={preemption})
        assert not mgr.should_stop and mgr.stop_signal is None
        assert signal.getsignal(sig) is not signal.SIG_DFL
        assert signal.getsignal(other) is signal.SIG_DFL  # only the signals asked for
        os.kill(os.getpid(), sig)
        for _ in range(200):
            if mgr.should_stop:
                break
            time.sleep(0.01)
        assert mgr.should_stop, "no stop"
        assert mgr.stop_signal == sig, mgr.stop_signal
        mgr.save(7, {{"w": torch.ones(2)}})
        mgr.close()
        assert signal.getsignal(sig) is signal.SIG_DFL, signal.getsignal(sig)
        print("survived", flush=True)
        os.kill(os.getpid(), sig)  # the default handler again: this ends the process
        time.sleep(5)
        print("still alive", flush=True)
        """,
        tmp_path,
    )
    assert "survived" in result.stdout, result.stdout + result.stderr
    assert "still alive" not in result.stdout
    assert result.returncode == -getattr(signal, signame), result.stderr
    with tk.CheckpointManager(root) as mgr:
        assert mgr.steps() == [7]


def test_preemption_restores_the_previous_handler(tmp_path):
    received: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        received.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        mgr = tk.CheckpointManager(tmp_path, preemption=[signal.SIGUSR2])
        assert signal.getsignal(signal.SIGUSR2) is not previous
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while not mgr.should_stop and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mgr.stop_signal == signal.SIGUSR2
        assert received == []  # the manager's handler took it
        mgr.close()
        assert signal.getsignal(signal.SIGUSR2) is previous
        mgr.close()
        assert signal.getsignal(signal.SIGUSR2) is previous
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_without_preemption_no_handler_is_installed(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with tk.CheckpointManager(tmp_path) as mgr:
        assert signal.getsignal(signal.SIGTERM) is before
        assert not mgr.should_stop and mgr.stop_signal is None


def test_preemption_from_another_thread_is_refused(tmp_path):
    errors: list[BaseException] = []

    def open_manager() -> None:
        try:
            tk.CheckpointManager(tmp_path, preemption=True)
        except BaseException as e:
            errors.append(e)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=open_manager)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_manager_on_the_same_root_can_restore_but_not_save(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=2) as writer:
        writer.save(1, {"w": torch.ones(4)})
        with tk.CheckpointManager(tmp_path) as reader:
            assert reader.steps() == [1]
            state = {"w": torch.zeros(4)}
            assert reader.restore(state) == 1 and torch.equal(state["w"], torch.ones(4))
            with pytest.raises(tk.StorageError, match="another CheckpointManager"):
                reader.save(2, {"w": torch.ones(4)})
        writer.save(2, {"w": torch.ones(4)})
    with tk.CheckpointManager(tmp_path, keep_last=2) as next_writer:  # the lock was released
        next_writer.save(3, {"w": torch.ones(4)})
        assert next_writer.steps() == [2, 3]


def test_saving_a_step_older_than_the_newest_is_refused(tmp_path):
    with tk.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(20, {"w": torch.ones(4)})
        with pytest.raises(ValueError, match="older than the newest committed step 20"):
            mgr.save(5, {"w": torch.ones(4)})
        mgr.save(20, {"w": torch.full((4,), 2.0)})  # the same step again: replaced
        assert mgr.steps() == [20]
        state = {"w": torch.zeros(4)}
        mgr.restore(state)
        assert torch.equal(state["w"], torch.full((4,), 2.0))


def test_without_file_locks_stale_directories_are_left_alone(tmp_path, monkeypatch):
    import torchkeep.manager.steps as steps

    stale = tmp_path / ".step_000000001.tmp-0123456789ab"
    stale.mkdir()
    monkeypatch.setattr(steps, "_writer_lock", lambda root: (True, None))
    with tk.CheckpointManager(tmp_path) as mgr:  # cannot tell whether another one writes
        assert stale.exists()
        mgr.save(1, {"w": torch.ones(2)})
        assert mgr.steps() == [1]


def test_a_step_moved_aside_by_an_interrupted_replacement_comes_back(tmp_path):
    # Where the atomic exchange is missing, a replacement renames the old step aside, then the
    # new one into place; killed in between, the old version must not be lost.
    with tk.CheckpointManager(tmp_path) as mgr:
        mgr.save(7, {"w": torch.full((2,), 7.0)})
    aside = tmp_path / ".step_000000007.tmp-0123456789ab.old"
    os.rename(tmp_path / "step_000000007", aside)
    (tmp_path / ".step_000000007.tmp-0123456789ab").mkdir()  # the new version, unfinished
    with tk.CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [7]
        state = {"w": torch.zeros(2)}
        assert mgr.restore(state) == 7 and torch.equal(state["w"], torch.full((2,), 7.0))
    assert _listing(tmp_path) == ["step_000000007"]


_SIGNALS_SCRIPT = """
import os, signal, sys, torch, torchkeep as tk
root = sys.argv[1]
try:
    tk.CheckpointManager(root + "/a", preemption=[signal.SIGTERM, signal.SIGKILL])
except ValueError as e:
    print("refused:", "SIGKILL" in str(e) or "9" in str(e), flush=True)
print("default again:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
with tk.CheckpointManager(root + "/a") as mgr:  # the failed one released its lock
    mgr.save(1, {"w": torch.ones(2)})
first = tk.CheckpointManager(root + "/b", preemption=True)
second = tk.CheckpointManager(root + "/c", preemption=True)
first.close()   # out of order: the second one's handler stays
os.kill(os.getpid(), signal.SIGTERM)
print("second stops:", second.should_stop, flush=True)
second.close()
os.kill(os.getpid(), signal.SIGTERM)  # both closed: the default action, the process ends
print("still alive", flush=True)
"""


def test_signal_handlers_survive_failures_and_any_closing_order(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "refused: True" in done.stdout, done.stdout + done.stderr
    assert "default again: True" in done.stdout
    assert "second stops: True" in done.stdout
    assert "still alive" not in done.stdout
    assert done.returncode == -signal.SIGTERM, done.stderr
