"""Every named step of every write path fails, by an exception and by the process ending there
(``os._exit``, as a kill would): the previous checkpoint still loads and verifies (or the new
one, whole, when the step came after the commit), nothing partial lists as committed, and what
a killed save left behind is ignored by readers and cleaned by the next save."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.container import WriteOptions, write_container
from torchkeep.testing import DIRECTORY_STEPS, EXIT_CODE, FILE_STEPS, MANAGER_STEPS, FaultyStorage

HERE = Path(__file__).parent
# Steps after which the new save is already in place (a failure there reports an error, yet
# the path holds the new save, whole).
AFTER_COMMIT = {"file": {"dir-fsync"}, "directory": set(), "manager": {"delete"}}


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((256, 1024), value + i) for i in range(4)}  # 4 MiB


def _holds(tensors: dict[str, torch.Tensor], value: float) -> bool:
    return all(torch.equal(t, torch.full_like(t, value + i)) for i, t in enumerate(tensors.values()))


def _check_whole(path: Path, step: str, kind: str) -> float:
    """The path holds the old save (1.0) or, after the commit, the new one (2.0); whole."""
    assert tk.verify(path).ok, tk.verify(path).problems
    loaded = tk.load_state_dict(path)
    value = 2.0 if _holds(loaded, 2.0) else 1.0
    assert _holds(loaded, value)
    assert value == 1.0 or step in AFTER_COMMIT[kind] or step == "commit", (step, value)
    return value


_RUN = """
import sys
sys.path.insert(0, {tests!r})
import torch
from torchkeep.testing import FaultyStorage
from torchkeep.container import write_container
tensors = {{f"w{{i}}": torch.full((256, 1024), 2.0 + i) for i in range(4)}}
write_container({path!r}, tensors, kind="weights", storage=FaultyStorage({step!r}, "exit"))
"""


def _exit_at(tmp_path: Path, path: Path, step: str) -> None:
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(_RUN.format(tests=str(HERE), path=str(path), step=step)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_CODE, done.stderr[-2000:]  # it ended at that step


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", FILE_STEPS)
def test_single_file_save_failing_at_each_step(tmp_path, step, action):
    path = tmp_path / "model.safetensors"
    write_container(str(path), _tensors(1.0), kind="weights")
    if action == "raise":
        with pytest.raises(OSError, match="injected"):
            write_container(str(path), _tensors(2.0), kind="weights", storage=FaultyStorage(step))
        assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary
    else:
        _exit_at(tmp_path, path, step)
    _check_whole(path, step, "file")
    # What a killed save left (a temporary beside the file) is ignored, and the next save works.
    write_container(str(path), _tensors(3.0), kind="weights")
    assert _holds(tk.load_state_dict(path), 3.0)


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", DIRECTORY_STEPS)
def test_directory_save_failing_at_each_step(tmp_path, step, action):
    path = tmp_path / "step_1"
    write_container(str(path), _tensors(1.0), kind="weights", options=WriteOptions(shard_bytes=2 << 20))
    if action == "raise":
        with pytest.raises(OSError, match="injected"):
            write_container(str(path), _tensors(2.0), kind="weights", storage=FaultyStorage(step), options=WriteOptions(shard_bytes=2 << 20))
        assert [p.name for p in tmp_path.iterdir()] == ["step_1"]  # staging removed
    else:
        _exit_at(tmp_path, path, step)
    assert _check_whole(path, step, "directory") == 1.0
    write_container(str(path), _tensors(3.0), kind="weights", options=WriteOptions(shard_bytes=2 << 20))
    assert _holds(tk.load_state_dict(path), 3.0)


_MANAGER = """
import sys
sys.path.insert(0, {tests!r})
import torch
import torchkeep as tk
from torchkeep.testing import FaultyStorage
storage = FaultyStorage({step!r}, "exit")
storage.armed = False
with tk.CheckpointManager({root!r}, keep_last=1, async_save=False, storage=storage) as mgr:
    mgr.save(1, {{"w": torch.full((512, 1024), 1.0)}})
    storage.armed = True
    mgr.save(2, {{"w": torch.full((512, 1024), 2.0)}})
"""


@pytest.mark.parametrize("action", ["raise", "exit"])
@pytest.mark.parametrize("step", MANAGER_STEPS)
def test_manager_save_failing_at_each_step(tmp_path, caplog, step, action):
    root = tmp_path / "run"
    if action == "raise":
        storage = FaultyStorage(step)
        storage.armed = False
        with tk.CheckpointManager(root, keep_last=1, async_save=False, storage=storage) as mgr:
            mgr.save(1, {"w": torch.full((512, 1024), 1.0)})
            storage.armed = True
            if step == "delete":  # the new step is committed: deleting the old costs only space
                with caplog.at_level("WARNING", logger="torchkeep.manager"):
                    mgr.save(2, {"w": torch.full((512, 1024), 2.0)})
                assert "could not finish deleting old checkpoint" in caplog.text
            else:
                with pytest.raises(OSError, match="injected"):
                    mgr.save(2, {"w": torch.full((512, 1024), 2.0)})
    else:
        script = tmp_path / "manager.py"
        script.write_text(textwrap.dedent(_MANAGER.format(tests=str(HERE), root=str(root), step=step)))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == EXIT_CODE, done.stderr[-2000:]
    # A manager opened afterwards lists committed steps only, restores the latest whole one,
    # and cleans what the failed save left.
    with tk.CheckpointManager(root, keep_last=1) as mgr:
        steps = mgr.steps()
        expected = [2] if step == "delete" else [1]  # a deleted step is moved aside first
        assert steps == expected, (step, steps)
        state = {"w": torch.zeros(512, 1024)}
        latest = mgr.restore(state)
        assert latest == steps[-1] and torch.equal(state["w"], torch.full((512, 1024), float(latest)))
        mgr.save(3, {"w": torch.full((512, 1024), 3.0)})
        assert mgr.steps() == [3]
    assert sorted(p.name for p in root.iterdir() if p.name != ".torchkeep-writer.lock") == [
        "step_000000003"
    ]


def test_an_fsync_error_fails_the_save_and_is_never_retried_into_a_success(tmp_path):
    from torchkeep.storage import LocalStorage

    class FlakyFsync(LocalStorage):
        """fsync fails once with EIO, then would succeed: the kernel may have dropped the
        dirty pages with the error, so a later success proves nothing."""

        calls = 0

        def _fsync(self, fd: int) -> None:
            FlakyFsync.calls += 1
            if FlakyFsync.calls == 1:
                raise OSError(5, "Input/output error")
            super()._fsync(fd)

    path = tmp_path / "model.safetensors"
    write_container(str(path), _tensors(1.0), kind="weights")
    with pytest.raises(tk.StorageError) as raised:
        write_container(str(path), _tensors(2.0), kind="weights", storage=FlakyFsync())
    assert raised.value.errno == 5 and str(path) in str(raised.value)
    assert FlakyFsync.calls == 1  # not retried
    assert _check_whole(path, "fsync", "file") == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("failing", ["remove_file", "remove_dir"])
def test_retention_delete_failing_on_an_object_store(caplog, failing):
    """On object stores a step is deleted manifest first: a failure before leaves the step
    committed and whole; after, the step no longer lists (its data objects stay)."""
    import uuid

    from torchkeep.errors import StorageError
    from torchkeep.storage import storage_for

    storage, root = storage_for(f"memory://faults-{uuid.uuid4().hex}/run", None)
    with tk.CheckpointManager(root, keep_last=1, async_save=False, storage=storage) as mgr:
        mgr.save(1, {"w": torch.full((64,), 1.0)})

        def fail(path: str) -> None:
            raise StorageError(5, f"{path}: injected failure")

        setattr(storage, failing, fail)
        with caplog.at_level("WARNING", logger="torchkeep.manager"):
            mgr.save(2, {"w": torch.full((64,), 2.0)})  # committed: the deletion costs space only
        assert "could not" in caplog.text and "injected failure" in caplog.text
    with tk.CheckpointManager(root) as mgr:
        assert mgr.steps() == ([1, 2] if failing == "remove_file" else [2])
        state = {"w": torch.zeros(64)}
        assert mgr.restore(state) == 2 and torch.equal(state["w"], torch.full((64,), 2.0))
        if failing == "remove_file":
            restored = {"w": torch.zeros(64)}
            assert mgr.restore(restored, step=1) == 1 and torch.equal(restored["w"], torch.ones(64))
