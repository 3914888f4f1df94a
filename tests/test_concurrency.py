"""Short reads and writes, interrupted system calls, two processes saving to one target, and a
reader while a writer replaces the checkpoint: whole files only, never a mix."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchkeep as tk
import torchkeep.storage.local as storage_module


def _state(value: float, mib: int = 1) -> dict:
    n = (mib << 20) // 4 // 4
    return {f"t{i}": torch.full((n,), value + i) for i in range(4)} | {"value": value}


def _is_whole(loaded: dict, value: float) -> bool:
    return loaded["value"] == value and all(
        torch.equal(loaded[f"t{i}"], torch.full_like(loaded[f"t{i}"], value + i)) for i in range(4)
    )


# ---------------------------------------------------------------------------------------------
# short transfers and EINTR


def _stuttering(real, cut: int):
    """``real`` (os.pwrite or os.preadv) that moves at most ``cut`` bytes per call and is
    interrupted (EINTR) every third call."""
    calls = itertools.count()

    def stutter(fd, data, offset):
        stutter.calls += 1
        if next(calls) % 3 == 2:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        if isinstance(data, list):  # preadv: the first buffer, cut short
            return real(fd, [data[0][:cut]], offset)
        return real(fd, data[:cut], offset)

    stutter.calls = 0
    return stutter


@pytest.mark.parametrize("path_name", ["state.safetensors", "state"])
def test_short_writes_and_interrupted_calls_still_write_every_byte(tmp_path, monkeypatch, path_name):
    stutter = _stuttering(os.pwrite, 4093)
    monkeypatch.setattr(storage_module.os, "pwrite", stutter)
    path = tmp_path / path_name
    state = _state(1.0, mib=1)
    tk.save(state, path)
    monkeypatch.undo()
    assert stutter.calls > 1.5 * (1 << 20) / 4093  # every byte went through the short writes
    assert tk.verify(path).ok and _is_whole(tk.load(path), 1.0)


def test_short_reads_and_interrupted_calls_still_read_every_byte(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    tk.save(_state(3.0, mib=1), path)
    stutter = _stuttering(os.preadv, 4093)
    monkeypatch.setattr(storage_module.os, "preadv", stutter)
    assert _is_whole(tk.load(path), 3.0)
    assert stutter.calls > 1.5 * (1 << 20) / 4093
    assert tk.verify(path).ok


def test_a_disk_that_accepts_no_bytes_fails_the_save_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    tk.save(_state(1.0), path)
    monkeypatch.setattr(storage_module.os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(tk.StorageError, match="accepted no bytes") as e:
        tk.save(_state(2.0), path)
    assert e.value.errno == errno.EIO and str(path) in str(e.value)
    monkeypatch.undo()
    assert _is_whole(tk.load(path), 1.0)
    assert sorted(os.listdir(tmp_path)) == ["state.safetensors"]


def test_a_read_that_returns_nothing_is_a_truncation(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    tk.save(_state(1.0), path)
    real = os.preadv
    calls = itertools.count()
    # The header reads succeed; the first data read finds the end of the file.
    monkeypatch.setattr(
        storage_module.os, "preadv", lambda fd, b, off: real(fd, b, off) if next(calls) < 2 else 0
    )
    with pytest.raises(tk.StorageError, match="truncated"):
        tk.load(path)


# ---------------------------------------------------------------------------------------------
# processes


_WRITER = """
import sys, torch, torchkeep as tk
path, value, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
n = (8 << 20) // 4 // 4
state = {f"t{i}": torch.full((n,), value + i) for i in range(4)} | {"value": value}
for _ in range(rounds):
    tk.save(state, path)
"""


def _writers(tmp_path: Path, path: Path, values: list[float], rounds: int) -> list[subprocess.Popen]:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    return [
        subprocess.Popen([sys.executable, str(script), str(path), str(v), str(rounds)], stderr=subprocess.PIPE, text=True)
        for v in values
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path_name", ["state.safetensors", "state"])
def test_two_processes_saving_one_target_leave_one_whole_save(tmp_path, path_name):
    path = tmp_path / path_name
    writers = _writers(tmp_path, path, [1.0, 2.0], rounds=8)
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    loaded = tk.load(path)
    assert _is_whole(loaded, loaded["value"]) and loaded["value"] in (1.0, 2.0)
    assert tk.verify(path).ok
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


@pytest.mark.slow
@pytest.mark.parametrize("path_name", ["state.safetensors", "state"])
def test_a_reader_during_saves_sees_the_old_or_the_new_never_a_mix(tmp_path, path_name):
    path = tmp_path / path_name
    tk.save(_state(0.0, mib=8), path)
    writers = _writers(tmp_path, path, [1.0, 2.0], rounds=10)
    seen: set[float] = set()
    reads = 0
    deadline = time.monotonic() + 240
    while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
        loaded = tk.load(path)  # never an error: the path always holds a whole save
        assert _is_whole(loaded, loaded["value"]), "a mix of two saves"
        seen.add(loaded["value"])
        reads += 1
    errors = [w.communicate(timeout=60)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert reads >= 3 and len(seen) >= 2, (reads, seen)


def test_a_directory_replaced_while_it_is_opened_is_opened_again_whole(tmp_path):
    from torchkeep.container import open_container, write_container
    from torchkeep.storage import LocalStorage

    path = tmp_path / "state"
    write_container(str(path), {"w": torch.full((1000,), 1.0)}, kind="weights")

    class ReplacedMidOpen(LocalStorage):
        """Replaces the save after its manifest was read, before its shard is opened."""

        replaced = 0

        def open(self, member: str):
            if member.endswith(".safetensors") and not self.replaced:
                self.replaced += 1
                write_container(str(path), {"w": torch.full((1000,), 2.0)}, kind="weights")
            return super().open(member)

    storage = ReplacedMidOpen()
    with open_container(str(path), storage=storage) as container:
        loaded = container.read(list(container.entries))
    assert storage.replaced == 1 and torch.equal(loaded["w"], torch.full((1000,), 2.0))
