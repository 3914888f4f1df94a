"""Direct I/O for local files: the same bytes as through the page cache, whatever the sizes and
offsets; a clean fallback where the file system refuses it; failures reported, never lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import torchkeep as tk
from torchkeep.bench.workload import drop_cache, make_model
from torchkeep.errors import CorruptCheckpointError, StorageError
from torchkeep.storage import direct
from torchkeep.storage.local import LocalSource


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        # Sizes chosen so that no tensor starts or ends on a page: ragged ends on both sides.
        "a": torch.randn(1_234_567, generator=g),
        "b": torch.randint(0, 255, (3_000_001,), dtype=torch.uint8, generator=g),
        "c": torch.randn(777, generator=g).to(torch.bfloat16),
        "d": torch.randn(2_500_003, generator=g).to(torch.float16),
        "e": torch.randn(5, 5, generator=g),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _direct_io_here(tmp_path: Path) -> None:
    """These tests need a file system that takes O_DIRECT and whose page cache can be dropped
    (not tmpfs, which keeps every page)."""
    probe = tmp_path / ".probe"
    probe.write_bytes(os.urandom(1 << 20))
    fd = direct.open_direct(str(probe), os.O_RDONLY)
    if fd is None:
        probe.unlink()
        pytest.skip(f"{tmp_path}: the file system refuses O_DIRECT")
    try:
        drop_cache(probe)
        cached = direct.resident(fd, 1 << 20)
    finally:
        os.close(fd)
        probe.unlink()
    if cached:
        pytest.skip(f"{tmp_path}: the page cache of this file system cannot be dropped")


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """Count the calls of ``direct.<name>``: one entry per call."""
    calls: list[object] = []
    function = getattr(direct, name)

    def spy(*args: object) -> object:
        calls.append(args)
        return function(*args)

    monkeypatch.setattr(direct, name, spy)
    return calls


@pytest.mark.parametrize("write_mode", ["on", "off"])
@pytest.mark.parametrize("read_mode", ["on", "off"])
def test_direct_and_buffered_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_mode: str, read_mode: str
) -> None:
    writes, reads = _spy(monkeypatch, "write_direct"), _spy(monkeypatch, "read_direct")
    state = _state()
    path = str(tmp_path / "w.safetensors")
    monkeypatch.setenv(direct.ENV, write_mode)
    tk.save_weights(state, path)
    assert bool(writes) == (write_mode == "on")
    drop_cache(path)
    monkeypatch.setenv(direct.ENV, read_mode)
    assert _same(tk.load_state_dict(path), state)
    assert bool(reads) == (read_mode == "on")
    assert _same(safetensors.torch.load_file(path), state)  # another reader agrees
    model = make_model(state)  # zeroed: loading into existing tensors
    drop_cache(path)
    tk.load_weights(model, path)
    assert _same(model.state_dict(), state)
    assert tk.verify(path).ok


def test_the_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(direct.ENV, raising=False)
    assert direct.mode() == "off" and not direct.enabled()  # the page cache by default
    monkeypatch.setenv(direct.ENV, " ON ")
    assert direct.mode() == "on" and direct.enabled()
    monkeypatch.setenv(direct.ENV, "off")
    assert not direct.enabled()
    monkeypatch.setenv(direct.ENV, "sometimes")  # not a mode: the default
    assert direct.mode() == "off"


def test_a_file_in_the_page_cache_is_read_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    with open(path, "rb") as f:
        f.read()
    source = LocalSource(str(path))
    try:
        assert direct.resident(source._fd, source.size)
        drop_cache(path)
        assert not direct.resident(source._fd, source.size)
    finally:
        source.close()
    state = _state()
    saved = str(tmp_path / "w.safetensors")
    tk.save_weights(state, saved)  # through the page cache: it stays there
    reads = _spy(monkeypatch, "read_direct")
    monkeypatch.setenv(direct.ENV, "on")
    assert _same(tk.load_state_dict(saved), state)
    assert reads == []  # a copy from memory, not a second trip to the disk
    drop_cache(saved)
    assert _same(tk.load_state_dict(saved), state)
    assert reads


def test_a_file_replaced_after_it_was_opened_is_not_read_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The direct descriptor is opened by name at the first large read: if a save renamed
    # another file over the name since, the bytes must still come from the file opened.
    old, new = _state(), {k: v + 1 for k, v in _state().items()}
    path = str(tmp_path / "w.safetensors")
    tk.save_weights(old, path)
    drop_cache(path)
    monkeypatch.setenv(direct.ENV, "on")
    source = LocalSource(path)
    try:
        tk.save_weights(new, path)
        drop_cache(path)
        data = bytearray(2 << 20)
        source.readinto([memoryview(data)], 0)
        with open(path, "rb") as f:
            assert bytes(data) != f.read(2 << 20)
        assert source._direct_fd is None  # the name now names another file: no direct reads
    finally:
        source.close()


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 5000, (4 << 20) - 3])
@pytest.mark.parametrize("length", [1 << 20, (1 << 20) + 17, 9 << 20])
def test_direct_reads_of_any_span(tmp_path: Path, offset: int, length: int) -> None:
    data = os.urandom(16 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    drop_cache(path)
    fd = direct.open_direct(str(path), os.O_RDONLY)
    assert fd is not None
    try:
        first, second = bytearray(length // 3), bytearray(length - length // 3)
        got = direct.read_direct(fd, [memoryview(first), memoryview(second)], offset, len(data))
    finally:
        os.close(fd)
    want = data[offset : offset + length]
    assert got == len(want)
    assert (bytes(first) + bytes(second))[:got] == want


def test_a_direct_read_past_the_end_stops_there(tmp_path: Path) -> None:
    data = os.urandom((2 << 20) + 100)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = direct.open_direct(str(path), os.O_RDONLY)
    assert fd is not None
    try:
        buffer = bytearray(2 << 20)
        got = direct.read_direct(fd, [memoryview(buffer)], 1000, len(data))
    finally:
        os.close(fd)
    assert got == len(data) - 1000
    assert bytes(buffer[:got]) == data[1000:]


def test_a_file_shorter_than_its_read_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A truncated save is refused when it is opened, before any tensor is read: its header
    # names more bytes than the file holds. A file cut while it is being read is met here.)
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom((3 << 20) + 123))
    drop_cache(path)
    monkeypatch.setenv(direct.ENV, "on")
    reads = _spy(monkeypatch, "read_direct")
    source = LocalSource(str(path))
    try:
        with pytest.raises(StorageError, match="it was truncated"):
            source.readinto([memoryview(bytearray(4 << 20))], 0)
    finally:
        source.close()
    assert reads


def test_damage_is_found_through_direct_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(direct.ENV, "on")
    reads = _spy(monkeypatch, "read_direct")
    path = tmp_path / "w.safetensors"
    tk.save_weights(_state(), str(path))
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    drop_cache(path)
    with pytest.raises(CorruptCheckpointError, match="does not match its checksum"):
        tk.load_state_dict(str(path))
    assert reads


_REFUSED: list[object] = []


def _refuse(*args: object) -> int:
    _REFUSED.append(args)
    raise OSError(errno.EINVAL, "Invalid argument")


def test_a_refused_direct_write_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems take the O_DIRECT open and refuse the requests (EINVAL).
    monkeypatch.setenv(direct.ENV, "on")
    monkeypatch.setattr(direct, "_pwrite", _refuse)
    _REFUSED.clear()
    state = _state()
    path = str(tmp_path / "w.safetensors")
    tk.save_weights(state, path)
    assert _REFUSED  # the direct path was tried, and refused
    assert _same(tk.load_state_dict(path), state)


def test_a_refused_direct_read_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    path = str(tmp_path / "w.safetensors")
    tk.save_weights(state, path)
    drop_cache(path)
    monkeypatch.setenv(direct.ENV, "on")
    monkeypatch.setattr(direct, "_preadv", _refuse)
    _REFUSED.clear()
    assert _same(tk.load_state_dict(path), state)
    assert len(_REFUSED) == 1  # refused once, then the page cache for the rest


def test_a_refused_direct_open_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(direct.ENV, "on")
    opened: list[str] = []

    def refused(path: str, flags: int) -> None:
        opened.append(path)
        return None

    monkeypatch.setattr(direct, "open_direct", refused)
    state = _state()
    path = str(tmp_path / "w.safetensors")
    tk.save_weights(state, path)
    drop_cache(path)
    assert _same(tk.load_state_dict(path), state)
    assert len(opened) == 2  # asked for the write and for the read, refused both times


def test_a_full_disk_during_a_direct_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "w.safetensors")
    tk.save_weights({"old": torch.ones(3)}, path)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv(direct.ENV, "on")
    monkeypatch.setattr(direct, "_pwrite", full)
    with pytest.raises(StorageError, match="no space left for the file") as raised:
        tk.save_weights(_state(), path)
    assert "previous file, if any, is unchanged" in str(raised.value)
    assert _same(tk.load_state_dict(path), {"old": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left


def test_a_failing_disk_during_a_direct_read_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "w.safetensors")
    tk.save_weights(_state(), path)
    drop_cache(path)

    def failing(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setenv(direct.ENV, "on")
    monkeypatch.setattr(direct, "_preadv", failing)
    with pytest.raises(StorageError, match="read failed: Input/output error"):
        tk.load_state_dict(path)


def test_tmpfs_takes_either_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether tmpfs takes O_DIRECT depends on the kernel (6.6 and later do): either way the
    # same bytes come back.
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm here")
    monkeypatch.setenv(direct.ENV, "on")
    state = _state()
    path = shm / f"torchkeep-direct-{os.getpid()}.safetensors"
    try:
        tk.save_weights(state, str(path))
        assert _same(tk.load_state_dict(str(path)), state)
    finally:
        path.unlink(missing_ok=True)


def test_the_benchmark_knows_where_direct_io_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.bench import cases

    assert not cases.direct_io_refused(str(tmp_path))  # ext4 or tmpfs: taken
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    assert cases.direct_io_refused(str(tmp_path))
    monkeypatch.setattr(os, "open", real_open)
    # Some file systems open with O_DIRECT and refuse the requests: the probe says so too,
    # and the references then open without it.
    real_pwrite = os.pwrite

    def refusing_pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    assert cases.direct_io_refused(str(tmp_path))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    flags: list[int] = []

    def recording(path: str, flag: int, mode: int = 0o777) -> int:
        flags.append(flag)
        return real_open(path, flag, mode)

    monkeypatch.setattr(os, "open", recording)
    buffer = cases.aligned_buffer(1 << 20)
    assert cases.time_raw_write(buffer, str(tmp_path / "raw.bin"), direct=False) > 0
    assert cases.time_raw_read(buffer, str(tmp_path / "raw.bin"), direct=False) > 0
    assert flags and not any(f & os.O_DIRECT for f in flags)
    (tmp_path / "raw.bin").unlink()
    monkeypatch.setattr(os, "open", no_direct)
    # The raw references still measure, through the page cache.
    buffer = cases.aligned_buffer(1 << 20)
    assert cases.time_raw_write(buffer, str(tmp_path / "raw.bin")) > 0
    assert cases.time_raw_read(buffer, str(tmp_path / "raw.bin")) > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "raw.bin"]


@pytest.mark.parametrize("step", ["write-first", "write-middle", "fsync", "rename"])
def test_a_failed_direct_save_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    from torchkeep.testing import FaultyStorage, InjectedFault

    path = str(tmp_path / "w.safetensors")
    tk.save_weights({"old": torch.ones(3)}, path)
    monkeypatch.setenv(direct.ENV, "on")
    writes = _spy(monkeypatch, "write_direct")
    with pytest.raises((InjectedFault, StorageError)):
        tk.save_weights(_state(), path, storage=FaultyStorage(step, middle=3 << 20))
    assert writes or step == "write-first"  # the failure came after direct writes began
    assert _same(tk.load_state_dict(path), {"old": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
