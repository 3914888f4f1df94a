"""Nothing is lost on failure: exceptions at every step of the commit, full disks, SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from conftest import run_script, small_filesystem
from torchkeep.container import write_container
from torchkeep.storage import LocalStorage, Sink
from torchkeep.testing import InjectedFault


class FaultySink:
    def __init__(self, inner: Sink, fail_after: int) -> None:
        self._inner = inner
        self._budget = fail_after

    def pwrite(self, data: memoryview, offset: int) -> None:
        if len(data) > self._budget:
            raise InjectedFault(errno.EIO, "injected write failure")
        self._budget -= len(data)
        self._inner.pwrite(data, offset)

    def written(self, offset: int, nbytes: int) -> None:
        self._inner.written(offset, nbytes)


class FaultyStorage(LocalStorage):
    """Local storage that fails one named step of the commit protocol."""

    def __init__(self, phase: str, *, fail_after: int = 0) -> None:
        self.phase = phase
        self.fail_after = fail_after

    def _sink(self, fd: int, path: str) -> Sink:
        sink = super()._sink(fd, path)
        return FaultySink(sink, self.fail_after) if self.phase == "write" else sink

    def _fsync(self, fd: int) -> None:
        if self.phase == "fsync":
            raise InjectedFault(errno.EIO, "injected fsync failure")
        super()._fsync(fd)

    def _replace(self, tmp: str, path: str) -> None:
        if self.phase == "rename":
            raise InjectedFault(errno.EIO, "injected rename failure")
        super()._replace(tmp, path)

    def staging_dir(self, path: str) -> str:
        if self.phase == "mkdir":
            raise InjectedFault(errno.EACCES, "injected mkdir failure")
        return super().staging_dir(path)

    def commit_dir(self, staging: str, path: str) -> None:
        if self.phase == "commit":
            raise InjectedFault(errno.EIO, "injected directory rename failure")
        super().commit_dir(staging, path)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(300, 100, generator=g) for i in range(6)}


PHASES = [
    ("write", 0),  # the first write of the file
    ("write", 200_000),  # in the middle of the data
    ("fsync", 0),
    ("rename", 0),
]


def _fail_and_check(tmp_path, name, kind, phase, after):
    """Save good state, fail a second save at ``phase``, then find the first intact."""
    path = tmp_path / name
    good = _state(1)
    write_container(str(path), good, kind=kind)
    with pytest.raises(OSError):  # the injected error, or the StorageError made of it
        write_container(
            str(path), _state(2), kind=kind, storage=FaultyStorage(phase, fail_after=after)
        )
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert tk.verify(path).ok
    back = tk.load_state_dict(path)
    assert all(torch.equal(back[k], v) for k, v in good.items())


@pytest.mark.parametrize(("phase", "after"), PHASES)
def test_failed_file_save_keeps_previous_and_leaves_no_temporary(tmp_path, phase, after):
    _fail_and_check(tmp_path, "model.safetensors", "weights", phase, after)


@pytest.mark.parametrize(("phase", "after"), [*PHASES, ("mkdir", 0), ("commit", 0)])
def test_failed_directory_save_keeps_previous(tmp_path, phase, after):
    _fail_and_check(tmp_path, "step_1", "weights", phase, after)


def test_exception_inside_the_data_is_not_a_partial_file(tmp_path):
    # An error raised while converting a tensor (here: CUDA-less "cuda" move is impossible, so use
    # a tensor whose conversion fails) stops the save before anything is committed.
    path = tmp_path / "w.safetensors"
    tk.save_weights({"a": torch.ones(2)}, path)

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tk.save_weights(Exploding(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert torch.equal(tk.load_state_dict(path)["a"], torch.ones(2))


def _run_limited(script: str, tmp_path) -> subprocess.CompletedProcess[str]:
    return run_script(script, cwd=tmp_path, timeout=120)


def test_file_size_limit_is_a_storage_error_and_keeps_previous(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past a size, as a full disk refuses them.
    path = tmp_path / "model.safetensors"
    tk.save_weights(_state(1), path)
    result = _run_limited(
        f"""
        import resource, signal, torch, torchkeep as tk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            tk.save_weights({{"w": torch.randn(1000, 1000)}}, {str(path)!r})
        except tk.StorageError as e:
            print("StorageError:", e)
        """,
        tmp_path,
    )
    assert "StorageError:" in result.stdout, result.stderr
    assert str(path) in result.stdout and "free some disk" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert tk.verify(path).ok


def test_full_disk_is_a_storage_error_and_keeps_previous(tmp_path):
    mount = small_filesystem(tmp_path) if os.geteuid() == 0 else None
    if mount is None:
        pytest.skip("cannot mount a small tmpfs here; test_file_size_limit covers the path")
    try:
        path = mount / "model.safetensors"
        tk.save_weights({"w": torch.randn(100, 1000)}, path)  # 400 kB of 1 MiB
        before = path.read_bytes()
        with pytest.raises(tk.StorageError, match="free some disk") as e:
            tk.save_weights({"w": torch.randn(200, 1000)}, path)  # 800 kB: no room for both
        assert e.value.errno == errno.ENOSPC
        assert str(path) in str(e.value)
        assert [p.name for p in mount.iterdir()] == ["model.safetensors"]
        assert path.read_bytes() == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_sigkill_during_saves_never_loses_the_last_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    writer = textwrap.dedent(
        f"""
        import sys, torch, torchkeep as tk
        n = 0
        while True:
            n += 1
            state = {{"step": n, "w": torch.full((4_000_000,), float(n))}}
            tk.save(state, {str(path)!r})
            print(n, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        committed = int(proc.stdout.readline())  # at least one save has completed
        for delay in (0.01, 0.03, 0.07, 0.11):
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGSTOP)  # freeze mid-save, then inspect the file
            state = tk.load(path)
            assert state["step"] >= committed
            assert torch.equal(state["w"], torch.full((4_000_000,), float(state["step"])))
            committed = state["step"]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = tk.load(path)
    assert state["step"] >= committed
    assert torch.equal(state["w"], torch.full((4_000_000,), float(state["step"])))
    assert tk.verify(path).ok
    # The killed save may leave a temporary beside the file; readers never take it for a save.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.safetensors"]
    assert all(name.startswith(".ckpt.safetensors.tmp-") for name in leftovers)


# ---------------------------------------------------------------------------------------------
# replacing a file or a link with a directory, and what a crash leaves beside a target


def _staged(tmp_path, name: str = "new") -> str:
    from torchkeep.storage import LocalStorage

    staging = LocalStorage().staging_dir(str(tmp_path / "target"))
    (Path(staging) / "payload").write_text(name)
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("entry", ["file", "link", "directory"])
def test_commit_dir_replaces_a_file_or_a_link_only_when_asked(tmp_path, monkeypatch, exchange, entry):
    import torchkeep.storage.local as storage

    if not exchange:
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    target = tmp_path / "target"
    pointee = tmp_path / "elsewhere"
    pointee.mkdir()
    (pointee / "keep").write_text("theirs")
    if entry == "file":
        target.write_text("old pickle")
    elif entry == "link":
        target.symlink_to(pointee)
    else:
        target.mkdir()
        (target / "payload").write_text("old")
    staging = _staged(tmp_path)
    if entry != "directory":
        with pytest.raises(tk.StorageError, match="exists and is not a directory"):
            storage.LocalStorage().commit_dir(staging, str(target))
        assert target.is_symlink() if entry == "link" else target.read_text() == "old pickle"
    storage.LocalStorage().commit_dir(staging, str(target), replace_entry=True)
    assert target.is_dir() and not target.is_symlink() and (target / "payload").read_text() == "new"
    assert (pointee / "keep").read_text() == "theirs"  # a link is replaced, never followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "target"]


def restore_or_remove(leftover: str, target: str, whole) -> bool:
    """Recover one entry a crash left beside ``target``, as ``recover_leftovers`` does."""
    from torchkeep.storage import Leftover, LocalStorage

    moved_aside = leftover.endswith(".old")
    return LocalStorage().recover(Leftover(leftover, target, moved_aside), whole)


def test_restore_or_remove_puts_back_an_intact_previous_version_only(tmp_path):
    target = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.tmp-0123456789ab.old"
    old.mkdir()
    (old / "payload").write_text("previous")
    # The target exists: the moved-aside copy is stale and removed.
    target.mkdir()
    assert not restore_or_remove(str(old), str(target), lambda p: True)
    assert not old.exists()
    # The target is missing: an intact previous version goes back; a damaged one is removed.
    target.rmdir()
    for intact in (False, True):
        old.mkdir()
        (old / "payload").write_text("previous")

        def whole(path: str, intact: bool = intact) -> bool:
            if not intact:
                raise tk.CorruptCheckpointError(f"{path}: damaged")
            return True

        assert restore_or_remove(str(old), str(target), whole) is intact
        assert not old.exists() and target.exists() is intact
    assert (target / "payload").read_text() == "previous"
    # A staging directory that never became anything is removed.
    staging = tmp_path / ".ckpt.tmp-ba9876543210"
    staging.mkdir()
    assert not restore_or_remove(str(staging), str(target), lambda p: True)
    assert not staging.exists() and target.exists()


def test_a_previous_version_that_cannot_go_back_is_kept(tmp_path, monkeypatch):
    import torchkeep.storage.local as local

    old = tmp_path / ".ckpt.tmp-0123456789ab.old"
    old.mkdir()
    (old / "payload").write_text("previous")

    def refused(a, b):
        raise OSError(errno.EACCES, "injected rename refusal")

    monkeypatch.setattr(local.os, "rename", refused)
    assert not restore_or_remove(str(old), str(tmp_path / "ckpt"), lambda p: True)
    # Not removed: it is the only copy of that checkpoint, and the next recovery retries.
    assert (old / "payload").read_text() == "previous"


def test_leftovers_are_recognised_by_name_and_dealt_with_for_their_owner(tmp_path):
    from torchkeep.storage import LocalStorage, hidden_target, recover_leftovers

    for name in (".a.tmp-0123456789ab", ".a.tmp-0123456789ab.old", ".b.deleted-0123456789ab"):
        (tmp_path / name).mkdir()
    for name in ("a", ".a.tmp-xyz", ".a.tmp-0123456789abc", "a.tmp-0123456789ab"):
        (tmp_path / name).write_text("not a leftover")
    assert hidden_target(".a.tmp-0123456789ab.old") == "a"
    assert hidden_target(".a.tmp-xyz") is None
    storage = LocalStorage()
    found = storage.leftovers(str(tmp_path))
    assert [(Path(x.path).name, Path(x.target).name, x.moved_aside) for x in found] == [
        (".a.tmp-0123456789ab", "a", False),
        (".a.tmp-0123456789ab.old", "a", True),
        (".b.deleted-0123456789ab", "b", False),
    ]
    done = recover_leftovers(
        storage, str(tmp_path), lambda p: True, belongs=lambda x: x.target.endswith("a")
    )
    assert [restored for _, restored in done] == [False, False]  # "a" exists: the old goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".a.tmp-0123456789abc",
        ".a.tmp-xyz",
        ".b.deleted-0123456789ab",
        "a",
        "a.tmp-0123456789ab",
    ]


def test_retiring_a_directory_hides_it_durably_or_says_why_not(tmp_path):
    from torchkeep.storage import LocalStorage

    storage = LocalStorage()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "payload").write_text("data")
    remains = storage.retire_dir(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()
    assert Path(remains).parent == tmp_path and Path(remains).name.startswith(".ckpt.tmp-")
    assert [x.path for x in storage.leftovers(str(tmp_path))] == [remains]
    storage.remove_dir(remains)
    with pytest.raises(tk.StorageError, match="ckpt: cannot remove the checkpoint") as caught:
        storage.retire_dir(str(tmp_path / "ckpt"))
    assert caught.value.errno == errno.ENOENT
