"""Bad inputs and edge cases found in review: each must fail cleanly, before harm is done."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import pytest
import torch

import torchkeep as tk
from conftest import SimpleNet, TiedLM, assert_same_state


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')")
    with pytest.raises(tk.StorageError, match="not a checkpoint"):
        tk.save_weights(SimpleNet(), project)
    tk.save_weights(SimpleNet(), tmp_path / "w.safetensors")
    with pytest.raises(tk.StorageError, match="not a checkpoint"):
        tk.convert(tmp_path / "w.safetensors", project, max_shard_size="1MB")
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # An empty directory, or an earlier save, is replaced.
    (tmp_path / "empty").mkdir()
    tk.save({"x": 1}, tmp_path / "empty")
    tk.save({"x": 2}, tmp_path / "empty")
    assert tk.load(tmp_path / "empty") == {"x": 2}


def test_the_name_metadata_is_reserved(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="__metadata__"):
        tk.save_weights({"__metadata__": torch.ones(2)}, tmp_path / "w.safetensors")
    obj = {"__metadata__": torch.ones(2), "w": torch.zeros(3)}
    tk.save(obj, tmp_path / "s.safetensors")
    back = tk.load(tmp_path / "s.safetensors")
    assert torch.equal(back["__metadata__"], obj["__metadata__"])


def test_tied_model_loads_from_a_file_that_stores_the_weights_twice(tmp_path):
    source = TiedLM()
    untied = {k: v.clone() for k, v in source.state_dict().items()}
    tk.save_weights(untied, tmp_path / "untied.safetensors")
    target = TiedLM()
    assert tk.load_weights(target, tmp_path / "untied.safetensors").ok
    assert_same_state(source, target)
    target2 = TiedLM()
    tk.save({"model": untied}, tmp_path / "state.safetensors")
    tk.load(tmp_path / "state.safetensors", into={"model": target2})
    assert_same_state(source, target2)


def test_into_is_checked_before_anything_is_written(tmp_path):
    saved = SimpleNet()
    tk.save({"model": saved}, tmp_path / "m.safetensors")
    target = SimpleNet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    with pytest.raises(tk.StateMismatchError, match="optimizer"):
        tk.load(tmp_path / "m.safetensors", into={"model": target, "optimizer": optimizer})
    target.register_buffer("extra", torch.zeros(1))
    with pytest.raises(tk.StateMismatchError, match="extra"):
        tk.load(tmp_path / "m.safetensors", into={"model": target})
    for key, value in before.items():
        assert torch.equal(target.state_dict()[key], value), key


def _rewrite_manifest(path, edit):
    from torchkeep.format import (
        encode_header,
        parse_header,
        read_header_length,
        signed_manifest_text,
    )

    raw = path.read_bytes()
    length = read_header_length(raw[:9], file_size=len(raw), where="x")
    header = parse_header(raw[8 : 8 + length], file_size=len(raw), where="x")
    body = json.loads(header.metadata["torchkeep"])
    body.pop("manifest_checksum")
    edit(body)
    text = signed_manifest_text(body)
    data = raw[header.data_start :]
    path.write_bytes(encode_header(header.tensors, {"format": "pt", "torchkeep": text}) + data)


def test_tampered_manifests_fail_as_corrupt(tmp_path):
    path = tmp_path / "s.safetensors"
    tk.save({"a": torch.ones(2), "b": {1: 2}}, path)
    _rewrite_manifest(path, lambda body: body["aliases"].update({"x": ["list"]}))
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)
    assert not tk.verify(path).ok

    tk.save({"a": torch.ones(2), "b": {1: 2}}, path)

    def bad_key(body):
        body["tree"]["b"] = {"$dict": [[{"$tuple": [{"q": 1}]}, 2]]}

    _rewrite_manifest(path, bad_key)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)


def test_huge_manifest_json_is_refused_unread(tmp_path):
    directory = tmp_path / "ckpt"
    tk.save({"w": torch.ones(2)}, directory)
    with open(directory / "manifest.json", "r+b") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB claimed, nothing stored
    with pytest.raises(tk.CorruptCheckpointError, match="limit"):
        tk.load(directory)


def test_overlapping_zip_entries_and_expanded_tensors(tmp_path):
    expanded = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(15000, 15000)}, expanded)
    with pytest.raises(tk.UnsupportedFormatError, match="contiguous"):
        tk.load(expanded)
    with pytest.raises(tk.UnsupportedFormatError):
        tk.convert(expanded, tmp_path / "out.safetensors")

    # Two storage entries whose bytes overlap: rewrite the central directory of a real file so
    # that entry data/1 points at data/0's local header.
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1000), "b": torch.ones(1000)}, buffer)
    raw = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        infos = {i.filename: i for i in z.infolist()}
    first = next(i for n, i in infos.items() if n.endswith("data/0"))
    second = next(i for n, i in infos.items() if n.endswith("data/1"))
    # Point the central directory record of data/1 at the local header of data/0.
    central = raw.rfind(second.filename.encode()) - 46
    assert raw[central : central + 4] == b"PK\x01\x02"
    raw[central + 42 : central + 46] = struct.pack("<I", first.header_offset)
    path = tmp_path / "overlap.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(tk.TorchkeepError):
        tk.load(path)


def test_legacy_storages_cannot_claim_more_than_the_file(tmp_path):
    buffer = io.BytesIO()
    torch.save([torch.ones(10) for _ in range(50)], buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    # Each storage reference claims 10 elements; make each claim 10,000 (4 bytes × 50 > file).
    patched = raw.replace(b"K\n", b"M\x10'", 200)
    path = tmp_path / "legacy.pt"
    path.write_bytes(patched)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load(path)
    assert os.path.getsize(path) < 100_000


def test_small_checksum_chunks_agree_between_writer_reader_and_verify(tmp_path):
    from torchkeep.container import WriteOptions, open_container, write_container

    state = {"small": torch.randn(50_000), "tiny": torch.ones(3)}  # 200 kB: 4 pieces of 64 KiB
    write_container(str(tmp_path / "s.safetensors"), state, kind="weights", options=WriteOptions(checksum_chunk=64 << 10))
    with open_container(tmp_path / "s.safetensors") as c:
        assert c.manifest is not None and c.manifest.checksum_chunk == 64 << 10
    assert tk.verify(tmp_path / "s.safetensors").ok
    assert torch.equal(tk.load_state_dict(tmp_path / "s.safetensors")["small"], state["small"])


def test_oversized_dcp_metadata_is_refused_unread(tmp_path):
    directory = tmp_path / "dcp"
    directory.mkdir()
    with open(directory / ".metadata", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB claimed, nothing stored
    (directory / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(tk.CorruptCheckpointError, match="refused unread"):
        tk.load(directory)


def test_scan_of_a_pre_1_6_file_reads_only_its_pickles(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(10)}, path, _use_new_zipfile_serialization=False)
    report = tk.scan(path)
    assert report.safe and report.format == "torch legacy"
    assert "torch.FloatStorage" in report.globals


MEMORY_SCRIPT = """
import resource, sys, torchkeep as tk
paths = sys.argv[1:]
try:
    tk.load(paths[0])
except tk.TorchkeepError:
    pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in paths:
    try:
        tk.load(path)
    except tk.TorchkeepError:
        pass
    else:
        raise SystemExit(f"{path} loaded")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_hostile_files_do_not_grow_memory(tmp_path):
    import subprocess
    import sys

    files = []
    expanded = tmp_path / "expanded.pt"  # 1.5 kB claiming a 900 MB tensor
    torch.save({"w": torch.zeros(1).expand(15000, 15000)}, expanded)
    files.append(expanded)
    liar = tmp_path / "liar.pt"  # a storage claiming 2**30 elements, backed by 16 bytes
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04", b"J\x00\x00\x00\x40", 1)
    with zipfile.ZipFile(liar, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    files.append(liar)
    header = tmp_path / "header.safetensors"  # a shape of 2**40 elements in an 80-byte file
    spec = {"a": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    text = json.dumps(spec).encode()
    header.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 16)
    files.append(header)
    assert all(os.path.getsize(f) < 4096 for f in files)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    grown_mib = float(done.stdout.strip().splitlines()[-1])
    assert grown_mib < 16, f"loading hostile files grew the peak RSS by {grown_mib:.0f} MiB"
