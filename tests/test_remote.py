"""Object storage: the storage contract on local, memory:// and S3 (moto's server on loopback),
every API on URLs, commits without rename, and the failures of a remote store."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
import torchkeep.storage.fsspec as fsspec_storage
import torchkeep.storage.s3 as s3_storage
from conftest import SimpleNet, TiedLM, assert_same_state
from s3server import FailingProxy, free_port, options, silent_server
from torchkeep.container import WriteOptions, open_container, write_container
from torchkeep.format import MANIFEST_FILE
from torchkeep.storage import FsspecStorage, LocalStorage, storage_for

MiB = 1 << 20


@pytest.fixture
def small_parts(monkeypatch):
    """S3's smallest part size, so that a few MiB make a multipart upload of several parts."""
    monkeypatch.setattr(s3_storage, "PART_BYTES", 5 * MiB)
    monkeypatch.setattr(s3_storage, "READ_PIECE", 3 * MiB)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path):
    """(storage, root) for each backend; the root exists and is empty."""
    if request.param == "local":
        return LocalStorage(), str(tmp_path)
    if request.param == "memory":
        return storage_for(f"memory://tk-{uuid.uuid4().hex[:12]}")
    root, opts = request.getfixturevalue("s3")
    return storage_for(root, opts)


@pytest.fixture(params=["memory", "s3"])
def url(request):
    """(a fresh root URL, its storage_options) on memory:// and on S3."""
    if request.param == "memory":
        return f"memory://tk-{uuid.uuid4().hex[:12]}", None
    return request.getfixturevalue("s3")


def _pattern(size: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


def _write(storage, path: str, data: bytes, *, piece: int = 1_000_003, threads: int = 3) -> None:
    """Write ``data`` in pieces, from several threads, in shuffled order: as the engine does."""

    def fill(sink):
        spans = [(o, min(o + piece, len(data))) for o in range(0, len(data), piece)]
        random.Random(1).shuffle(spans)
        errors = []

        def work(mine):
            try:
                for begin, end in mine:
                    sink.pwrite(memoryview(data)[begin:end], begin)
                    sink.written(begin, end - begin)
            except BaseException as e:
                errors.append(e)

        workers = [threading.Thread(target=work, args=(spans[i::threads],)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]

    storage.write_file(path, len(data), fill)


# ---------------------------------------------------------------------------------------------
# the storage contract, on every backend


def test_contract_write_read_and_list(backend, small_parts):
    storage, root = backend
    data = _pattern(11 * MiB + 5)  # three parts on S3
    path = f"{root}/dir/data.bin"
    storage.make_dirs(f"{root}/dir")
    _write(storage, path, data)
    assert storage.exists(path) and not storage.is_dir(path)
    assert storage.is_dir(f"{root}/dir")
    assert storage.list_dir(f"{root}/dir") == ["data.bin"]
    source = storage.open(path)
    try:
        assert source.size == len(data)
        assert source.read(0, 16) == data[:16]
        a, b = bytearray(7 * MiB), bytearray(3)
        source.readinto([memoryview(a), memoryview(bytearray(0)), memoryview(b)], 123)
        assert bytes(a) == data[123 : 123 + 7 * MiB] and bytes(b) == data[123 + 7 * MiB : 126 + 7 * MiB]
        mapping = source.map()
        assert mapping[: len(data)] == data
        mapping.close()
        with pytest.raises(tk.StorageError, match="truncated"):
            source.read(len(data) - 2, 10)
    finally:
        source.close()
    storage.remove_file(path)
    assert not storage.exists(path)
    storage.remove_file(path)  # removing what is gone is not an error
    assert storage.list_dir(f"{root}/nothing-here") == []


def test_contract_failed_write_keeps_the_previous_file(backend, small_parts):
    storage, root = backend
    path = f"{root}/data.bin"
    old = _pattern(1000, seed=1)
    _write(storage, path, old)
    new = _pattern(12 * MiB, seed=2)

    def fill(sink):
        sink.pwrite(memoryview(new)[: 6 * MiB], 0)  # a whole part is already sent on S3
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError, match="the writer died"):
        storage.write_file(path, len(new), fill)
    source = storage.open(path)
    assert source.read(0, source.size) == old
    source.close()
    if isinstance(storage, FsspecStorage) and storage.s3:
        bucket = root.removeprefix("s3://")
        uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket)
        assert not uploads.get("Uploads"), "the aborted upload was left behind"


def test_contract_missing_and_directories(backend):
    storage, root = backend
    with pytest.raises(tk.CheckpointNotFoundError):
        storage.open(f"{root}/missing.bin")
    assert not storage.exists(f"{root}/missing.bin")
    storage.make_dirs(f"{root}/d/a")
    _write(storage, f"{root}/d/a/x.bin", b"x" * 10)
    _write(storage, f"{root}/d/y.bin", b"y" * 10)
    assert storage.list_dir(f"{root}/d") == ["a", "y.bin"]
    storage.remove_dir(f"{root}/d")
    assert not storage.exists(f"{root}/d/y.bin") and not storage.exists(f"{root}/d/a/x.bin")


# ---------------------------------------------------------------------------------------------
# the API on URLs


def test_weights_round_trip(url):
    root, opts = url
    model = TiedLM()
    info = tk.save_weights(model, f"{root}/lm.safetensors", storage_options=opts)
    assert info.path == f"{root}/lm.safetensors"
    other = TiedLM()
    tk.load_weights(other, f"{root}/lm.safetensors", storage_options=opts)
    assert_same_state(model, other)
    assert other.head.weight is other.embed.weight
    for lazy in (False, True):
        state = tk.load_state_dict(f"{root}/lm.safetensors", lazy=lazy, storage_options=opts)
        assert torch.equal(state["embed.weight"], model.embed.weight)


def test_training_state_round_trip(url):
    root, opts = url
    model = SimpleNet()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()
    tk.save_checkpoint(f"{root}/ckpt", model=model, optimizer=optimizer, epoch=3, storage_options=opts)
    model2 = SimpleNet()
    optimizer2 = torch.optim.AdamW(model2.parameters())
    ckpt = tk.load_checkpoint(f"{root}/ckpt", model=model2, optimizer=optimizer2, storage_options=opts)
    assert ckpt.epoch == 3
    assert_same_state(model, model2)
    assert str(optimizer.state_dict()) == str(optimizer2.state_dict())
    state = tk.load(f"{root}/ckpt", storage_options=opts)
    assert state["epoch"] == 3


def test_sharded_directory_reads_by_ranges(s3, small_parts):
    root, opts = s3
    storage, path = storage_for(f"{root}/big", opts)
    tensors = {f"t{i}": torch.randn(MiB // 4 + i) for i in range(9)}
    info = write_container(path, tensors, kind="state", storage=storage, options=WriteOptions(shard_bytes=3 * MiB))
    assert len([f for f in info.files if f.startswith("shard-")]) == 5
    back = tk.load(f"{root}/big", storage_options=opts)
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    dest = {n: torch.empty_like(t) for n, t in tensors.items()}
    with open_container(path, storage=storage) as container:
        out = container.read(list(tensors), into=dest)
        assert all(out[n] is dest[n] and torch.equal(dest[n], t) for n, t in tensors.items())
        assert container.verify() == []


def test_saving_over_a_remote_directory_replaces_it_whole(url):
    root, opts = url
    storage, path = storage_for(f"{root}/ckpt", opts)
    tk.save({"w": torch.ones(5)}, path, storage_options=opts)
    first = storage.list_dir(path)

    def fail() -> None:
        raise RuntimeError("abandoned before the commit")

    with pytest.raises(RuntimeError, match="abandoned"):
        write_container(path, {"w": torch.zeros(5)}, kind="state", storage=storage, options=WriteOptions(before_commit=fail))
    assert storage.list_dir(path) == first, "the abandoned save's objects were not removed"
    assert torch.equal(tk.load(path, storage_options=opts)["w"], torch.ones(5))
    tk.save({"w": torch.full((5,), 2.0)}, path, storage_options=opts)
    assert torch.equal(tk.load(path, storage_options=opts)["w"], torch.full((5,), 2.0))
    names = storage.list_dir(path)
    assert len(names) == 2 and MANIFEST_FILE in names and not set(names) & set(first) - {MANIFEST_FILE}


def test_leftovers_of_an_interrupted_save_do_not_count_and_are_cleaned(url):
    root, opts = url
    storage, path = storage_for(f"{root}/ckpt", opts)
    # What a save killed before its manifest leaves: a shard, no manifest.
    _write(storage, f"{path}/shard-00000-0123456789ab.safetensors", b"\0" * 64)
    with pytest.raises(tk.IncompleteCheckpointError, match="never committed"):
        tk.load(path, storage_options=opts)
    tk.save({"w": torch.ones(2)}, path, storage_options=opts)
    assert "shard-00000-0123456789ab.safetensors" not in storage.list_dir(path)
    # A prefix holding other things is not taken for a checkpoint and is not overwritten.
    _write(storage, f"{root}/data/notes.txt", b"mine")
    with pytest.raises(tk.StorageError, match="not a checkpoint"):
        tk.save({"w": torch.ones(2)}, f"{root}/data", storage_options=opts)
    assert storage.list_dir(f"{root}/data") == ["notes.txt"]


def test_whole_model_on_object_storage(url):
    root, opts = url
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    tk.save_model(model, f"{root}/model", storage_options=opts)
    loaded = tk.load_model(f"{root}/model", storage_options=opts)
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model.eval()(x))


def test_a_model_with_a_program_is_not_replaced_in_place(tmp_path):
    root = f"memory://tk-{uuid.uuid4().hex[:12]}"
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(2, 4)
    tk.save_model(model, f"{root}/model", example_inputs=x)
    with pytest.raises(tk.StorageError, match="Save to a new path"):
        tk.save_model(nn.Sequential(nn.Linear(4, 2)), f"{root}/model", example_inputs=x)
    assert torch.equal(tk.load_model(f"{root}/model")(x), model.eval()(x))


def test_manager_on_object_storage(url):
    root, opts = url
    run = f"{root}/run"
    with tk.CheckpointManager(run, keep_last=2, storage_options=opts) as mgr:
        assert mgr.restore({"w": torch.zeros(3)}) is None
        for step in (10, 20, 30, 40):
            mgr.save(step, {"w": torch.full((3,), float(step))}, metrics={"loss": 1 / step})
        assert mgr.steps() == [30, 40]
    storage, _ = storage_for(run, opts)
    assert storage.list_dir(run) == ["step_000000030", "step_000000040"]
    # A step whose save never committed: data without a manifest.
    _write(storage, f"{run}/step_000000050/shard-00000-0123456789ab.safetensors", b"\0" * 8)
    with tk.CheckpointManager(run, keep_last=2, async_save=True, storage_options=opts) as mgr:
        assert mgr.steps() == [30, 40]
        assert any("step_000000050" in p and "not a committed step" in p for p in mgr.problems)
        state = {"w": torch.zeros(3)}
        assert mgr.restore(state) == 40 and torch.equal(state["w"], torch.full((3,), 40.0))
        mgr.save(50, {"w": torch.full((3,), 50.0)}).result()
        assert mgr.steps() == [40, 50]
        assert mgr.restore(state) == 50 and torch.equal(state["w"], torch.full((3,), 50.0))
    names = storage.list_dir(f"{run}/step_000000050")
    assert MANIFEST_FILE in names and len(names) == 2, names  # the leftover shard is gone


def test_foreign_formats_are_downloaded_then_read(url, tmp_path):
    root, opts = url
    storage, _ = storage_for(root, opts)
    model = SimpleNet()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 2}, tmp_path / "old.pt")
    _write(storage, f"{root}/old.pt", (tmp_path / "old.pt").read_bytes())
    state = tk.load(f"{root}/old.pt", storage_options=opts)
    assert state["epoch"] == 2
    other = SimpleNet()
    tk.load_weights(other, f"{root}/old.pt", storage_options=opts)
    assert_same_state(model, other)
    # A Hugging Face directory: weights plus config, no torchkeep manifest.
    tk.save_weights(model, tmp_path / "model.safetensors")
    _write(storage, f"{root}/hf/model.safetensors", (tmp_path / "model.safetensors").read_bytes())
    _write(storage, f"{root}/hf/config.json", b"{}")
    state = tk.load_state_dict(f"{root}/hf", storage_options=opts)
    assert torch.equal(state["fc1.weight"], model.fc1.weight)


def test_inspect_and_verify_urls(url):
    root, opts = url
    tk.save({"w": torch.ones(4), "step": 3}, f"{root}/ckpt", storage_options=opts)
    assert tk.verify(f"{root}/ckpt", storage_options=opts).ok
    description = tk.describe(f"{root}/ckpt", storage_options=opts)
    assert [t.name for t in description.tensors] == ["w"]
    assert description.format == "torchkeep directory"


# ---------------------------------------------------------------------------------------------
# what can go wrong


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(tk.MissingDependencyError, match=r"pip install 'torchkeep\[remote\]'"):
        tk.save({"w": torch.ones(2)}, "s3://bucket/ckpt")


def test_unknown_scheme_and_options_for_a_local_path(tmp_path):
    with pytest.raises(tk.UnsupportedFormatError, match="nosuchscheme://"):
        tk.load("nosuchscheme://bucket/ckpt")
    with pytest.raises(ValueError, match="storage_options apply to URLs"):
        tk.save({"w": torch.ones(2)}, tmp_path / "ckpt", storage_options={"anon": True})


def test_missing_remote_checkpoint(s3):
    root, opts = s3
    with pytest.raises(tk.CheckpointNotFoundError, match=f"{root}/nothing"):
        tk.load(f"{root}/nothing.safetensors", storage_options=opts)
    with pytest.raises(tk.CheckpointNotFoundError):
        tk.load_weights(SimpleNet(), f"{root}/nothing.safetensors", storage_options=opts)


def test_corrupt_remote_object_is_detected(s3, moto_server):
    root, opts = s3
    tk.save_weights({"w": torch.arange(1000.0)}, f"{root}/w.safetensors", storage_options=opts)
    client = moto_server.client()
    bucket = root.removeprefix("s3://")
    data = bytearray(client.get_object(Bucket=bucket, Key="w.safetensors")["Body"].read())
    data[-100] ^= 0x10
    client.put_object(Bucket=bucket, Key="w.safetensors", Body=bytes(data))
    with pytest.raises(tk.CorruptCheckpointError, match="'w'"):
        tk.load_state_dict(f"{root}/w.safetensors", storage_options=opts)


def test_refused_endpoint_is_a_storage_error():
    opts = options(f"http://127.0.0.1:{_closed_port()}", fast_fail=True)
    with pytest.raises(tk.StorageError, match=r"s3://tk-nowhere/w.safetensors: .*failed"):
        tk.save({"w": torch.ones(2)}, "s3://tk-nowhere/w.safetensors", storage_options=opts)
    with pytest.raises(tk.StorageError, match="s3://tk-nowhere/ckpt"):
        tk.load("s3://tk-nowhere/ckpt", storage_options=opts)


def _closed_port() -> int:
    from s3server import free_port

    return free_port()


def test_endpoint_that_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(fsspec_storage, "REQUEST_SECONDS", 3.0)
    with silent_server() as endpoint:
        opts = options(endpoint, fast_fail=True)
        started = time.monotonic()
        with pytest.raises(tk.StorageError, match=r"s3://tk-silent/w\.safetensors: .* no answer .* within 3 s"):
            tk.save_weights({"w": torch.ones(2)}, "s3://tk-silent/w.safetensors", storage_options=opts)
        with pytest.raises(tk.StorageError, match=r"s3://tk-silent/w\.safetensors: .* no answer"):
            tk.load_state_dict("s3://tk-silent/w.safetensors", storage_options=opts)
        assert time.monotonic() - started < 30


def test_error_mid_upload_keeps_the_previous_checkpoint(s3, moto_server, small_parts):
    root, opts = s3
    path = f"{root}/w.safetensors"
    old = {"w": torch.randn(3 * MiB)}  # 12 MiB: a multipart upload of three parts
    tk.save_weights(old, path, storage_options=opts)
    proxy = FailingProxy(moto_server.endpoint, lambda method, p: method == "PUT" and "partNumber=2" in p)
    try:
        bad = options(proxy.endpoint, fast_fail=True)
        with pytest.raises(tk.StorageError, match=rf"{path}: uploading .*InternalError|{path}: .*failed") as caught:
            tk.save_weights({"w": torch.zeros(3 * MiB)}, path, storage_options=bad)
        assert "previous checkpoint" in str(caught.value)
        assert proxy.failed, "the proxy never saw the part it fails"
    finally:
        proxy.stop()
    assert torch.equal(tk.load_state_dict(path, storage_options=opts)["w"], old["w"])
    uploads = moto_server.client().list_multipart_uploads(Bucket=root.removeprefix("s3://"))
    assert not uploads.get("Uploads")


def test_error_writing_a_manifest_leaves_the_step_uncommitted(s3, moto_server):
    root, opts = s3
    run = f"{root}/run"
    with tk.CheckpointManager(run, storage_options=opts) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    proxy = FailingProxy(moto_server.endpoint, lambda method, p: method == "PUT" and p.split("?")[0].endswith(MANIFEST_FILE))
    try:
        with tk.CheckpointManager(run, storage_options=options(proxy.endpoint, fast_fail=True)) as mgr:
            with pytest.raises(tk.StorageError, match="step_000000002"):
                mgr.save(2, {"w": torch.full((2,), 2.0)})
            assert mgr.steps() == [1]
    finally:
        proxy.stop()
    with tk.CheckpointManager(run, storage_options=opts) as mgr:
        assert mgr.steps() == [1]
        state = {"w": torch.zeros(2)}
        assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.ones(2))


_KILLED_SAVE = """
import sys, torch, torchkeep as tk
from torchkeep.testing import options
run, endpoint = sys.argv[1], sys.argv[2]
with tk.CheckpointManager(run, storage_options=options(endpoint)) as mgr:
    mgr.save(1, {"w": torch.ones(4)})
    print("committed", flush=True)
    mgr.save(2, {"w": torch.randn(48 << 20)})  # 192 MiB: killed long before it completes
    print("finished", flush=True)
"""


def test_sigkill_mid_upload_leaves_nothing_committed(s3, moto_server, tmp_path):
    root, opts = s3
    run = f"{root}/run"
    bucket = root.removeprefix("s3://")
    script = tmp_path / "save.py"
    script.write_text(_KILLED_SAVE)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    child = subprocess.Popen(
        [sys.executable, str(script), run, moto_server.endpoint], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "committed"
        client = moto_server.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once parts of step 2 are on their way
            if client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the upload of step 2 never started")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with tk.CheckpointManager(run, storage_options=opts) as mgr:
        assert mgr.steps() == [1]
        state = {"w": torch.zeros(4)}
        assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.ones(4))


# ---------------------------------------------------------------------------------------------
# unclear outcomes, cancelled requests, paths that are not what they look like


class _ManifestLandsThenFails(FsspecStorage):
    """The manifest's upload reaches the store, then the answer is lost (a timeout)."""

    def write_file(self, path, size, fill):
        super().write_file(path, size, fill)
        if path.endswith(MANIFEST_FILE):
            raise tk.StorageError(110, f"{path}: uploading got no answer from the store")


def test_a_manifest_stored_before_its_error_keeps_its_shards():
    root = f"memory://tk-{uuid.uuid4().hex[:12]}"
    storage, path = storage_for(f"{root}/ckpt")
    tk.save({"w": torch.ones(3)}, path)
    flaky = _ManifestLandsThenFails(storage.fs, storage.protocol)
    with pytest.raises(tk.StorageError, match="either this save or the previous one, whole"):
        write_container(path, {"w": torch.full((3,), 2.0)}, kind="state", storage=flaky)
    # The manifest did land: the new save must be whole, its shard not deleted.
    assert torch.equal(tk.load(path)["w"], torch.full((3,), 2.0))


def test_a_failed_ranged_read_stops_writing_into_the_destination(s3, moto_server, monkeypatch):
    root, opts = s3
    monkeypatch.setattr(s3_storage, "READ_PIECE", 1 * MiB)
    path = f"{root}/w.safetensors"
    tk.save_weights({"w": torch.randn(4 * MiB)}, path, storage_options=opts)  # 16 MiB
    gets = []

    def fail(method, p):
        if method == "GET" and p.split("?")[0].endswith("/w.safetensors"):
            gets.append(p)
            return len(gets) >= 4  # pieces of the data fail (retries too), others are in flight
        return False

    proxy = FailingProxy(moto_server.endpoint, fail)
    try:
        dest = {"w": torch.zeros(4 * MiB)}
        with pytest.raises(tk.StorageError, match=rf"{path}: reading failed"):
            tk.load(path, into=dest, storage_options=options(proxy.endpoint, fast_fail=True))
        snapshot = dest["w"].clone()
        time.sleep(1.0)
        assert torch.equal(dest["w"], snapshot), "bytes arrived after the read had failed"
    finally:
        proxy.stop()


def test_a_cancelled_request_is_abandoned(s3):
    import asyncio

    root, opts = s3
    storage, _ = storage_for(root, opts)
    finished = threading.Event()

    async def slow():
        await asyncio.sleep(0.5)
        finished.set()

    future = storage.submit(slow())
    time.sleep(0.1)
    future.cancel()
    time.sleep(1.0)
    assert not finished.is_set()


def test_uncommitted_remote_directory_is_named_by_its_url(url):
    root, opts = url
    storage, path = storage_for(f"{root}/ckpt", opts)
    _write(storage, f"{path}/shard-00000-0123456789ab.safetensors", b"\0" * 64)
    for load in (tk.load, tk.load_state_dict, tk.describe):
        with pytest.raises(tk.IncompleteCheckpointError, match=rf"^{path}: no manifest"):
            load(path, storage_options=opts)


def test_convert_scan_and_diff_with_urls(url, tmp_path):
    root, opts = url
    model = SimpleNet()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    storage, _ = storage_for(root, opts)
    _write(storage, f"{root}/model.pt", (tmp_path / "model.pt").read_bytes())
    report = tk.scan(f"{root}/model.pt", storage_options=opts)
    assert report.safe and report.path == f"{root}/model.pt"
    tk.convert(f"{root}/model.pt", f"{root}/model.safetensors", storage_options=opts)
    tk.convert(tmp_path / "model.pt", f"{root}/hf", max_shard_size="1KB", storage_options=opts)
    tk.convert(f"{root}/model.safetensors", tmp_path / "copy.safetensors", dtype=torch.bfloat16, storage_options=opts)
    other = SimpleNet()
    tk.load_weights(other, f"{root}/model.safetensors", storage_options=opts)
    assert_same_state(model, other)
    hf = tk.load_state_dict(f"{root}/hf", storage_options=opts)
    assert torch.equal(hf["fc2.bias"], model.fc2.bias)
    assert storage.list_dir(f"{root}/hf")[-1] == "model.safetensors.index.json"
    d = tk.diff(f"{root}/model.safetensors", tmp_path / "copy.safetensors", storage_options=opts)
    assert d.changed and not d.added and not d.removed
    with pytest.raises(tk.StorageError, match="Convert to a new path"):
        tk.convert(tmp_path / "model.pt", f"{root}/hf", max_shard_size="1KB", storage_options=opts)


def test_command_line_with_storage_options(s3, tmp_path, capsys):
    from torchkeep.cli import main

    root, opts = s3
    flags = [
        "-o", f"key={opts['key']}",
        "-o", f"secret={opts['secret']}",
        "-o", f"client_kwargs={json.dumps(opts['client_kwargs'])}",
    ]  # fmt: skip
    model = SimpleNet()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tk.save_weights(model, f"{root}/model.safetensors", storage_options=opts)
    assert main(["inspect", f"{root}/model.safetensors", *flags]) == 0
    assert "fc1.weight" in capsys.readouterr().out
    # A URL and a local path together: the options go to the URL only.
    assert main(["verify", f"{root}/model.safetensors", str(tmp_path / "model.pt"), *flags]) == 0
    assert capsys.readouterr().out.count("ok ") == 2
    assert main(["convert", str(tmp_path / "model.pt"), f"{root}/from-pt.safetensors", *flags]) == 0
    assert main(["diff", f"{root}/model.safetensors", f"{root}/from-pt.safetensors", *flags]) == 0
    assert main(["scan", str(tmp_path / "model.pt"), *flags]) == 0
    capsys.readouterr()
    # An endpoint that refuses: an error that names the URL, not a crash.
    closed = options(f"http://127.0.0.1:{free_port()}", fast_fail=True)
    refused = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in closed.items()]
    assert main(["inspect", f"{root}/model.safetensors", *(f for o in refused for f in ("-o", o))]) == 1
    assert f"{root}/model.safetensors" in capsys.readouterr().err
    for bad in ("no-equals-sign", "n:={not json"):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", f"{root}/model.safetensors", "-o", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "KEY=VALUE" in err or "not JSON" in err, err


def test_command_line_storage_option_values():
    from torchkeep.cli import _options, _storage_option, build_parser

    assert _storage_option("secret=12345678") == ("secret", "12345678")  # a string stays one
    assert _storage_option("anon=true") == ("anon", True)
    assert _storage_option("anon=True") == ("anon", "True")
    assert _storage_option("n:=4") == ("n", 4)
    assert _storage_option('c={"a": 1}') == ("c", {"a": 1})
    args = build_parser().parse_args(["inspect", "file:///tmp/x.safetensors", "-o", "anon=true"])
    assert _options(args, "file:///tmp/x.safetensors") is None  # local: no options to give
    assert _options(args, "s3://b/x") == {"anon": True}


def test_urls_that_are_not_object_stores_or_are_mangled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tk.UnsupportedFormatError, match=r"sftp:// is not one. Mount it"):
        tk.save({"w": torch.ones(2)}, "sftp://host/ckpt")
    with pytest.raises(tk.UnsupportedFormatError, match=r"pathlib\.Path"):
        tk.save({"w": torch.ones(2)}, Path("s3://bucket/ckpt"))
    with pytest.raises(tk.UnsupportedFormatError, match="wildcards"):
        tk.load("memory://bucket/run[1]/ckpt")
    with pytest.raises(tk.UnsupportedFormatError, match="URL given with local storage"):
        write_container("s3://bucket/x.safetensors", {"w": torch.ones(1)}, kind="state")
    with pytest.raises(tk.UnsupportedFormatError, match="URL given with local storage"):
        open_container("s3://bucket/x.safetensors")
    assert os.listdir(tmp_path) == []  # nothing written locally under a URL's name


def test_manager_does_not_create_a_missing_bucket(moto_server):
    opts = options(moto_server.endpoint, fast_fail=True)
    bucket = f"tk-missing-{uuid.uuid4().hex[:8]}"
    with tk.CheckpointManager(f"s3://{bucket}/run", storage_options=opts) as mgr:
        assert mgr.steps() == []
        with pytest.raises(tk.StorageError, match=f"s3://{bucket}/run/step_000000001"):
            mgr.save(1, {"w": torch.ones(2)})
    names = [b["Name"] for b in moto_server.client().list_buckets()["Buckets"]]
    assert bucket not in names


def test_command_line_reads_urls_with_the_environment(s3, moto_server, monkeypatch, capsys):
    from torchkeep.cli import main

    root, opts = s3
    tk.save({"w": torch.ones(4), "step": 2}, f"{root}/ckpt", storage_options=opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert main(["verify", f"{root}/ckpt"]) == 0
    assert main(["inspect", f"{root}/ckpt", "--json"]) == 0
    assert '"w"' in capsys.readouterr().out
    assert main(["verify", f"{root}/missing"]) == 2


def test_an_object_store_retires_a_directory_by_removing_its_commit_marker():
    storage, root = storage_for(f"memory://tk-{uuid.uuid4().hex[:12]}")
    for name in ("manifest.json", "shard-00000.safetensors"):
        storage.write_file(f"{root}/ckpt/{name}", 3, lambda sink: sink.pwrite(memoryview(b"abc"), 0))
    assert storage.retire_dir(f"{root}/ckpt", commit_marker="manifest.json") == f"{root}/ckpt"
    assert storage.list_dir(f"{root}/ckpt") == ["shard-00000.safetensors"]
    with pytest.raises(ValueError, match="commit marker"):
        storage.retire_dir(f"{root}/ckpt")
    with pytest.raises(ValueError, match="none is kept aside"):
        storage.retire_dir(f"{root}/ckpt", commit_marker="manifest.json", previous=True)
    assert storage.leftovers(root) == []
