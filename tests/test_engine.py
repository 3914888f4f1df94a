from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep as tk
from torchkeep.bench.engine import make_small_state_dict
from torchkeep.container import WriteOptions, write_container
from torchkeep.io.memory import tensor_bytes
from torchkeep.io.writer import WriteItem, write_tensors


class _RecordingSink:
    """Keeps every write in memory and counts the calls."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.writes = 0
        self.hints: list[tuple[int, int]] = []

    def pwrite(self, data: memoryview, offset: int) -> None:
        self.data[offset : offset + len(data)] = data
        self.writes += 1

    def written(self, offset: int, nbytes: int) -> None:
        self.hints.append((offset, nbytes))


def test_small_tensors_next_to_each_other_go_out_in_one_write() -> None:
    tensors = [torch.full((256,), float(i)) for i in range(100)]  # 1 KiB each
    items = [WriteItem(f"t{i}", t, t.dtype, i * 1024) for i, t in enumerate(tensors)]
    sink = _RecordingSink(100 * 1024)
    checksums = write_tensors(sink, items, threads=2, chunk=1 << 20)
    assert sink.writes == 1 and sink.hints == [(0, 100 * 1024)]
    assert set(checksums) == {f"t{i}" for i in range(100)}
    for i in range(100):
        stored = torch.frombuffer(sink.data[i * 1024 : (i + 1) * 1024], dtype=torch.float32)
        assert torch.equal(stored, tensors[i])


def test_a_batch_ends_where_a_large_tensor_or_a_gap_lies_between() -> None:
    small = torch.arange(64, dtype=torch.float32)  # 256 bytes
    large = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: written in its own pieces
    items = [
        WriteItem("a", small, small.dtype, 0),
        WriteItem("big", large, large.dtype, 256),
        WriteItem("b", small + 1, small.dtype, 256 + large.nbytes),
        WriteItem("c", small + 2, small.dtype, 512 + large.nbytes + 256),  # a 256-byte gap
    ]
    size = 512 + large.nbytes + 512
    sink = _RecordingSink(size)
    write_tensors(sink, items, threads=1, chunk=1 << 20)
    assert sink.writes == 2 + 3  # 2 pieces of the large tensor; a, b, c each in its own batch
    data = torch.frombuffer(sink.data, dtype=torch.float32)
    assert torch.equal(data[:64], small)
    assert torch.equal(data[64 : 64 + large.numel()], large)
    tail = data[64 + large.numel() :]
    assert torch.equal(tail[:64], small + 1)
    assert torch.equal(tail[128:192], small + 2)


def test_small_tensors_that_need_a_cast_or_are_strided_round_trip(tmp_path: Path) -> None:
    state = make_small_state_dict(300)
    state["strided"] = torch.arange(600, dtype=torch.float32).reshape(20, 30).t()
    state["scalar"] = torch.tensor(7, dtype=torch.int64)
    state["flag"] = torch.tensor([True, False, True])
    path = tmp_path / "small.safetensors"
    tk.save_weights(state, path, dtype=torch.bfloat16)
    loaded = tk.load_state_dict(path)
    assert tk.verify(path).ok
    for name, value in state.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert torch.equal(loaded[name], expected), name
    tk.save_weights(state, path)
    loaded = tk.load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_save_without_checksums_is_refused_by_every_reader(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64), "b": torch.zeros(64)}
    for name in ("nochecksum.safetensors", "nochecksum_dir"):
        path = tmp_path / name
        write_container(str(path), state, kind="weights", options=WriteOptions(checksums=False))
        with pytest.raises(tk.CorruptCheckpointError, match="does not match its checksum"):
            tk.load_state_dict(path)
        assert not tk.verify(path).ok


def _file_with(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "staged.safetensors"
    tk.save_weights(state, path)
    return path


def _staged_state() -> dict[str, torch.Tensor]:
    state = make_small_state_dict(40)
    state["large"] = torch.randn(3 << 20)  # 12 MiB: pieces of 1 MiB below
    state["scalar"] = torch.tensor(3.5)
    state["half"] = torch.randn(1000).half()
    return state


@pytest.mark.parametrize("threads", [1, 3])
def test_staged_reads_fill_every_destination(tmp_path: Path, threads: int) -> None:
    from torchkeep.container import open_container
    from torchkeep.io.reader import ReadItem, read_tensors

    state = _staged_state()
    path = _file_with(tmp_path, state)
    with open_container(path) as container:
        source = container._files[None].source
        start = container._files[None].header.data_start
        dests = {
            n: torch.empty(e.shape, dtype=state[n].dtype) for n, e in container.entries.items()
        }
        items = [
            ReadItem(n, start + e.begin, dests[n], e.checksum) for n, e in container.entries.items()
        ]
        # The file was written with 16 MiB checksum pieces; read it in 1 MiB ones without
        # verifying, then verify with the file's own pieces: both through two buffers a thread.
        read_tensors(source, items, threads=threads, chunk=1 << 20, verify=False, staged=True)
        assert all(torch.equal(dests[n], state[n]) for n in state)
        for t in dests.values():
            t.zero_()
        chunk = container.manifest.checksum_chunk
        read_tensors(source, items, threads=threads, chunk=chunk, verify=True, staged=True)
        assert all(torch.equal(dests[n], state[n]) for n in state)


def test_staged_reads_detect_a_flipped_byte(tmp_path: Path) -> None:
    from torchkeep.container import open_container
    from torchkeep.io.reader import ReadItem, read_tensors

    state = _staged_state()
    path = _file_with(tmp_path, state)
    with open_container(path) as container:
        entry = container.entries["large"]
        offset = container._files[None].header.data_start + entry.begin + 5_000_000
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with open_container(path) as container:
        start = container._files[None].header.data_start
        items = [
            ReadItem(n, start + e.begin, torch.empty(e.shape, dtype=state[n].dtype), e.checksum)
            for n, e in container.entries.items()
        ]
        with pytest.raises(tk.CorruptCheckpointError, match="'large' does not match"):
            read_tensors(
                container._files[None].source,
                items,
                threads=2,
                chunk=container.manifest.checksum_chunk,
                verify=True,
                staged=True,
            )


def test_staged_reads_refuse_pieces_larger_than_their_buffers(tmp_path: Path) -> None:
    from torchkeep.io.reader import MAX_STAGING_BYTES, ReadItem, read_tensors
    from torchkeep.storage import DEFAULT_STORAGE

    path = _file_with(tmp_path, {"w": torch.zeros(4)})
    source = DEFAULT_STORAGE.open(str(path))
    try:
        with pytest.raises(ValueError, match="at most"):
            read_tensors(
                source,
                [ReadItem("w", 8, torch.empty(4), None)],
                threads=1,
                chunk=MAX_STAGING_BYTES * 2,
                verify=False,
                staged=True,
            )
    finally:
        source.close()


def test_tied_destinations_are_read_once_and_copied(tmp_path: Path) -> None:
    from torchkeep.container.read import _disjoint

    base = torch.zeros(100)
    into = {"a": base, "b": base, "c": base[50:], "d": torch.zeros(10)}
    kept = _disjoint(into, stream=True)
    assert set(kept) == {"a", "d"} or set(kept) == {"b", "d"}
    meta = {"m": torch.empty(10, device="meta")}
    assert _disjoint(meta, stream=True) == {}


def test_only_destinations_that_need_staging_go_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.io import reader
    from torchkeep.io.reader import ReadItem, read_tensors
    from torchkeep.storage import DEFAULT_STORAGE

    data = torch.arange(64, dtype=torch.float32)
    path = tmp_path / "four.bin"
    path.write_bytes(bytes(tensor_bytes(data)))
    staged_into: list[str] = []
    copy = reader.Staging.copy

    def record(self: reader.Staging, dest: torch.Tensor, *args: object) -> None:
        staged_into.append(dest.device.type)
        copy(self, dest, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(reader.Staging, "copy", record)
    # Side by side in the file: CPU destinations are read into directly, the others (meta
    # here, a GPU in use) through staging; one batch never mixes the two.
    a, b = torch.empty(16), torch.empty(16)
    m1, m2 = torch.empty(16, device="meta"), torch.empty(16, device="meta")
    items = [ReadItem("a", 0, a, None), ReadItem("m1", 64, m1, None)]
    items += [ReadItem("b", 128, b, None), ReadItem("m2", 192, m2, None)]
    source = DEFAULT_STORAGE.open(str(path))
    try:
        read_tensors(source, items, threads=1, chunk=1 << 20, verify=False)
    finally:
        source.close()
    assert staged_into == ["meta", "meta"]
    assert torch.equal(a, data[:16]) and torch.equal(b, data[32:48])
