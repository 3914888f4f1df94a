"""torch.save files read as torch.load(weights_only=True) reads them: parameters, requires_grad,
tensors' attributes, storages, module state dicts' _metadata, conj/neg views and meta tensors;
refusals that name only what would run; crafted variants refused."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk

GOLDEN = Path(__file__).parent / "golden"


def _reference(path: Path, **kwargs: Any) -> Any:
    return torch.load(path, weights_only=True, **kwargs)


def _saved(tmp_path: Path, obj: Any, name: str = "f.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _same_tensor(ours: Any, theirs: torch.Tensor) -> None:
    assert type(ours) is type(theirs)
    assert ours.requires_grad == theirs.requires_grad and ours.is_leaf
    assert ours.dtype == theirs.dtype and ours.device == theirs.device
    assert vars(ours) == vars(theirs)
    if theirs.device.type != "meta":
        assert torch.equal(ours, theirs.resolve_conj().resolve_neg())


def _scan_agrees(path: Path) -> None:
    """A file tk.load reads is never called unsafe by scan."""
    report = tk.scan(path)
    assert report.safe and report.unsafe == (), report.verdict


# ---------------------------------------------------------------------------------------------
# what torch.load(weights_only=True) returns, tk.load returns too


def test_parameters_and_requires_grad_come_back_as_torch_reads_them(tmp_path):
    state = {
        "param": nn.Parameter(torch.randn(3)),
        "frozen": nn.Parameter(torch.randn(2), requires_grad=False),
        "grad": torch.randn(2, requires_grad=True),
        "plain": torch.arange(4),
        "model": nn.Linear(2, 2).state_dict(keep_vars=True),
    }
    path = _saved(tmp_path, state)
    ours, theirs = tk.load(path), _reference(path)
    for key in ("param", "frozen", "grad", "plain"):
        _same_tensor(ours[key], theirs[key])
    for key, value in theirs["model"].items():
        _same_tensor(ours["model"][key], value)
    # Moved and cast, they stay what they were, leaves.
    cast = tk.load(path, map_location="cpu", dtype=torch.float16)
    assert type(cast["param"]) is nn.Parameter and cast["param"].dtype == torch.float16
    assert cast["param"].requires_grad and cast["param"].is_leaf
    assert cast["grad"].requires_grad and cast["grad"].is_leaf
    assert not cast["frozen"].requires_grad and cast["plain"].dtype == torch.int64
    _scan_agrees(path)


def test_tensor_attributes_are_kept_where_they_are_plain_data(tmp_path):
    tagged = torch.arange(4.0)
    tagged.foo = 3
    tagged.bar = {"x": [1, 2.5], "y": ("a", None)}
    param = nn.Parameter(torch.ones(2))
    param.tag = "embedding"
    state = {"tagged": tagged, "param": param, "buffer": nn.Buffer(torch.zeros(2))}
    path = _saved(tmp_path, state)
    ours, theirs = tk.load(path), _reference(path)
    for key in state:
        _same_tensor(ours[key], theirs[key])
    assert ours["tagged"].foo == 3 and ours["param"].tag == "embedding"
    moved = tk.load(path, map_location="cpu", dtype=torch.float64)
    assert moved["tagged"].bar == tagged.bar and moved["param"].tag == "embedding"
    _scan_agrees(path)


def test_storages_come_back_as_torch_storages(tmp_path):
    weights = torch.arange(6.0)
    state = {
        "untyped": torch.arange(4, dtype=torch.int16).untyped_storage(),
        "typed": weights.storage(),
        "weights": weights,
    }
    path = _saved(tmp_path, state)
    ours, theirs = tk.load(path), _reference(path)
    for key in ("untyped", "typed"):
        assert type(ours[key]) is type(theirs[key]) is torch.storage.TypedStorage
        assert ours[key].dtype == theirs[key].dtype and ours[key].tolist() == theirs[key].tolist()
    # As in torch, the tensor and the storage saved beside it share their memory.
    assert ours["weights"].untyped_storage().data_ptr() == ours["typed"]._data_ptr()
    _scan_agrees(path)


def test_module_state_dict_metadata_survives_a_torch_file(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    path = _saved(tmp_path, {"model": model.state_dict(), "epoch": 2})
    theirs = _reference(path)
    for ours in (tk.load(path), tk.load(path, map_location="cpu", dtype=torch.float64)):
        assert type(ours["model"]) is OrderedDict
        assert ours["model"]._metadata == theirs["model"]._metadata
    fresh = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    tk.load(path, into={"model": fresh})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


# ---------------------------------------------------------------------------------------------
# _metadata through tk.save -> tk.load


def test_module_state_dict_metadata_survives_tk_save(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = model.state_dict()
    path = tmp_path / "ckpt.safetensors"
    tk.save({"model": state, "module": model, "empty": nn.ReLU().state_dict(), "d": {}}, path)
    back = tk.load(path)
    for key in ("model", "module"):
        assert type(back[key]) is OrderedDict and back[key]._metadata == state._metadata
        assert list(back[key]) == list(state)
    assert back["empty"]._metadata == nn.ReLU().state_dict()._metadata
    assert type(back["d"]) is dict
    # Restoring into modules and reading the weights alone see only the state dict's items.
    fresh = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    tk.load(path, into={"model": fresh, "module": fresh, "empty": nn.ReLU()})
    assert set(tk.load_state_dict(path)) == set(state)
    # The state dict without _metadata is written as before.
    plain = tmp_path / "plain.safetensors"
    tk.save({"model": dict(state)}, plain)
    assert "$metadata" not in str(tk.describe(plain).tree)
    assert type(tk.load(plain)["model"]) is dict


def test_a_save_written_before_metadata_was_kept_still_reads():
    old = tk.load(GOLDEN / "older" / "single" / "x.safetensors")
    new = tk.load(GOLDEN / "single" / "x.safetensors")
    assert type(old["model"]) is dict and not hasattr(old["model"], "_metadata")
    assert new["model"]._metadata == OrderedDict(
        [("", {"version": 1}), ("0", {"version": 1}), ("1", {"version": 1})]
    )
    assert old["model"].keys() == new["model"].keys()
    assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])


def test_malformed_metadata_entry_is_refused(tmp_path):
    from torchkeep.tree import decode

    with pytest.raises(tk.CorruptCheckpointError, match=r"\$metadata"):
        decode({"w": {"$tensor": "w"}, "$metadata": [1, 2]}, lambda name: torch.ones(1))
    with pytest.raises(tk.CorruptCheckpointError, match=r"\$metadata"):
        decode({"$tensor": "w", "$metadata": {}}, lambda name: torch.ones(1))


# ---------------------------------------------------------------------------------------------
# conj/neg views and meta tensors


def test_conj_and_neg_views_are_read_materialized(tmp_path):
    z = torch.tensor([1 + 2j, 3 - 4j, -5 + 6j], dtype=torch.complex64)
    state = {
        "z": z,
        "conj": z.conj(),  # shares z's storage
        "conj_slice": z[1:].conj(),
        "grad": torch.randn(2, dtype=torch.complex128).conj().requires_grad_(),
    }
    path = _saved(tmp_path, state)
    ours, theirs = tk.load(path), _reference(path)
    for key in state:
        _same_tensor(ours[key], theirs[key])
        assert not ours[key].is_conj() and not ours[key].is_neg()
    assert torch.equal(ours["z"], z)  # materializing never writes into the shared storage
    # Converting streams the file: the view is filled before it is written.
    real = _saved(tmp_path, {"neg": z.conj().imag, "w": torch.ones(2)}, "real.pt")
    _same_tensor(tk.load(real)["neg"], _reference(real)["neg"])
    tk.convert(real, tmp_path / "real.safetensors")
    assert torch.equal(tk.load(tmp_path / "real.safetensors")["neg"], -z.imag)
    _scan_agrees(path)


def test_meta_tensors_read_as_meta_tensors(tmp_path):
    state = {
        "meta": torch.empty(3, 4, device="meta"),
        "strided": torch.empty(4, 3, device="meta").t(),
        "grad": torch.empty(2, device="meta", requires_grad=True),
        "real": torch.ones(2),
    }
    path = _saved(tmp_path, state)
    theirs = _reference(path)
    for ours in (tk.load(path), tk.load(path, map_location="cpu", dtype=torch.float16)):
        for key in ("meta", "strided", "grad"):
            assert ours[key].device.type == "meta"
            assert ours[key].shape == theirs[key].shape
            assert ours[key].stride() == theirs[key].stride()
            assert ours[key].requires_grad == theirs[key].requires_grad
    assert tk.load(path)["meta"].dtype == torch.float32
    _scan_agrees(path)


# ---------------------------------------------------------------------------------------------
# refusals: what really runs, named; crafted variants refused


class _System:
    def __reduce__(self) -> Any:
        return (os.system, ("true",))


def test_refusal_names_only_code_that_would_run(tmp_path):
    path = _saved(tmp_path, {"w": nn.Parameter(torch.ones(2)), "evil": _System()})
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load(path)
    message = str(refused.value)
    assert "posix.system" in message and "_rebuild" not in message and "torch." not in message
    report = tk.scan(path)
    assert report.unsafe == ("posix.system",) and not report.safe
    assert "torch._utils._rebuild_parameter" in report.globals
    assert "_rebuild" not in report.verdict


def test_torch_objects_not_read_yet_are_not_called_unsafe(tmp_path):
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    path = _saved(tmp_path, {"nested": nested})
    _reference(path)  # torch's restricted loader reads it
    with pytest.raises(tk.UnsupportedFormatError, match="_rebuild_nested_tensor") as refused:
        tk.load(path)
    assert "would import and call" not in str(refused.value)
    report = tk.scan(path)
    assert report.unsafe == () and not report.safe and "unsafe" not in report.verdict
    assert "_rebuild_nested_tensor" in report.verdict
    both = _saved(tmp_path, {"nested": nested, "evil": _System()}, "both.pt")
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load(both)
    assert "posix.system" in str(refused.value) and "nested" not in str(refused.value)


_STORAGE = object()


class _Call:
    """Pickled as ``function(*args)`` (then BUILD with ``state``, if given); ``_STORAGE`` in
    the arguments stands for the file's one storage."""

    def __init__(self, function: Any, *args: Any, state: Any = None) -> None:
        self.function, self.args, self.state = function, args, state

    def __reduce__(self) -> Any:
        if self.state is None:
            return (self.function, self.args)
        return (self.function, self.args, self.state)


def _crafted(path: Path, obj: Any, storage: Any = torch.FloatStorage, numel: int = 4) -> Path:
    """A torch zip whose pickle is ``obj`` and whose one storage holds ``numel`` elements."""

    class Saver(pickle.Pickler):
        def persistent_id(self, value: Any) -> Any:
            return ("storage", storage, "0", "cpu", numel) if value is _STORAGE else None

    buffer = io.BytesIO()
    Saver(buffer, protocol=2).dump(obj)
    itemsize = torch.empty(0, dtype=getattr(storage, "dtype", torch.uint8)).element_size()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/data/0", b"\x01" * (numel * itemsize))
        z.writestr("archive/version", b"3\n")
    return path


def test_crafted_tensors_are_refused(tmp_path):
    import torch._utils as u

    v2 = u._rebuild_tensor_v2
    cases: dict[str, tuple[Any, type[tk.TorchkeepError], str]] = {
        "conj-lying-size": (
            _Call(v2, _STORAGE, 0, (9,), (1,), False, OrderedDict(), {"conj": True}),
            tk.UnsupportedFormatError,
            "expands",
        ),
        "conj-past-the-end": (
            _Call(v2, _STORAGE, 2, (3,), (1,), False, OrderedDict(), {"neg": True}),
            tk.CorruptCheckpointError,
            "reaches element",
        ),
        "metadata-not-flags": (
            _Call(v2, _STORAGE, 0, (2,), (1,), False, OrderedDict(), {"conj": "yes"}),
            tk.CorruptCheckpointError,
            "metadata",
        ),
        "conj-of-real": (
            _Call(v2, _STORAGE, 0, (2,), (1,), False, OrderedDict(), {"conj": True}),
            tk.CorruptCheckpointError,
            "conjugate",
        ),
        "requires-grad-not-a-flag": (
            _Call(v2, _STORAGE, 0, (2,), (1,), "yes", OrderedDict()),
            tk.CorruptCheckpointError,
            "requires_grad",
        ),
        "meta-dtype-not-a-dtype": (
            _Call(u._rebuild_meta_tensor_no_storage, "float32", (2,), (1,), False),
            tk.CorruptCheckpointError,
            "not a dtype",
        ),
        "meta-stride-mismatch": (
            _Call(u._rebuild_meta_tensor_no_storage, torch.float32, (2, 2), (1,), False),
            tk.CorruptCheckpointError,
            "meta tensor",
        ),
        "meta-negative-size": (
            _Call(u._rebuild_meta_tensor_no_storage, torch.float32, (-2,), (1,), False),
            tk.CorruptCheckpointError,
            "non-negative",
        ),
        "meta-overflowing-size": (
            _Call(u._rebuild_meta_tensor_no_storage, torch.float32, (1 << 40,) * 2, (1, 1), False),
            tk.CorruptCheckpointError,
            "meta tensor",
        ),
        # Tensor.__setstate__ would set_ the tensor over a storage it grows to any size.
        "build-resizes-a-tensor": (
            _Call(
                v2, _STORAGE, 0, (2,), (1,), False, OrderedDict(), state=(None, 0, (1 << 40,), (1,))
            ),
            tk.CorruptCheckpointError,
            "BUILD",
        ),
        "attribute-replaces-data": (
            _Call(
                torch._tensor._rebuild_from_type_v2,
                v2,
                torch.Tensor,
                (_STORAGE, 0, (2,), (1,), False, OrderedDict()),
                {"data": None},
            ),
            tk.CorruptCheckpointError,
            "replace one of torch's",
        ),
        "attribute-not-plain-data": (
            _Call(
                torch._tensor._rebuild_from_type_v2,
                v2,
                torch.Tensor,
                (_STORAGE, 0, (2,), (1,), False, OrderedDict()),
                {"hook": OrderedDict},
            ),
            tk.CorruptCheckpointError,
            "not plain data",
        ),
        "parameter-of-ints-requires-grad": (
            _Call(
                u._rebuild_parameter,
                _Call(v2, _STORAGE, 0, (2,), (1,), False, OrderedDict()),
                True,
                OrderedDict(),
            ),
            tk.CorruptCheckpointError,
            "requiring gradients",
        ),
    }
    for name, (obj, error, words) in cases.items():
        storage = (
            torch.IntStorage if name == "parameter-of-ints-requires-grad" else torch.FloatStorage
        )
        path = _crafted(tmp_path / f"{name}.pt", {"t": obj}, storage)
        with pytest.raises(error, match=words) as refused:
            tk.load(path)
        assert str(path) in str(refused.value), name
        assert tk.scan(path).unsafe == (), name  # nothing outside torch would have run


def test_crafted_storage_views_stay_bounded(tmp_path):
    # BUILD on the storage itself, and on a class of the allowlist, are refused before loading.
    storage_build = _crafted(
        tmp_path / "storage-build.pt",
        {
            "s": _Call(OrderedDict, (), state={"x": 1}),
            "t": _Call(torch.Size, ((2,),), state={"a": 1}),
        },
    )
    with pytest.raises(tk.CorruptCheckpointError, match="BUILD"):
        tk.load(storage_build)
    fine = _crafted(
        tmp_path / "fine.pt",
        {
            "t": _Call(
                torch._utils._rebuild_tensor_v2, _STORAGE, 1, (3,), (1,), False, OrderedDict()
            )
        },
    )
    assert tk.load(fine)["t"].shape == (3,)


def test_every_global_torch_reads_restricted_is_read_or_named_as_torch_own():
    from torch._weights_only_unpickler import _get_allowed_globals

    from torchkeep.legacy.unpickler import ALLOWED_GLOBALS, TORCH_ONLY

    read = {".".join(name) for name in ALLOWED_GLOBALS}
    missing = sorted(set(_get_allowed_globals()) - read - TORCH_ONLY)
    assert not missing, missing


@pytest.fixture
def without_crc32() -> Any:
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(True)


def test_a_file_written_without_crc32s_is_intact(tmp_path, without_crc32):
    from torchkeep.cli import main

    state = {"w": torch.arange(6.0).reshape(2, 3), "empty": torch.zeros(0)}
    path = tmp_path / "nocrc.pt"
    torch.save(state, path)
    assert {i.CRC for i in zipfile.ZipFile(path).infolist()} == {0}  # what torch wrote
    back = tk.load(path)
    assert torch.equal(back["w"], state["w"]) and back["empty"].shape == (0,)
    assert torch.equal(tk.load_state_dict(path)["w"], state["w"])
    assert not tk.describe(path).checksummed  # there was nothing to check the bytes by
    report = tk.verify(path)
    assert report.ok and not report.checksummed and report.tensors == 2
    assert main(["verify", str(path)]) == 0
    out = tk.convert(path, tmp_path / "nocrc.safetensors")
    assert out.tensors == 2 and torch.equal(
        tk.load(tmp_path / "nocrc.safetensors")["w"], state["w"]
    )


def test_a_file_with_crc32s_is_still_checked(tmp_path):
    path = tmp_path / "crc.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    assert tk.verify(path).checksummed and tk.describe(path).checksummed
    data = bytearray(path.read_bytes())
    at = data.index(torch.arange(6.0).numpy().tobytes())
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(tk.CorruptCheckpointError, match="CRC-32"):
        tk.load(path)
    assert not tk.verify(path).ok


def _as_big_endian(src: Path, dst: Path, dtypes: list[torch.dtype]) -> None:
    """Rewrite a torch.save zip as a big-endian machine would have written it: the byteorder
    entry says "big" and each storage's values have their bytes reversed (storage ``i`` holds
    ``dtypes[i]``)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            name = info.filename.split("/", 1)[1]
            if name == "byteorder":
                data = b"big"
            elif name.startswith("data/"):
                dtype = dtypes[int(name.removeprefix("data/"))]
                size = dtype.itemsize // (2 if dtype.is_complex else 1)
                values = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, size)
                data = values.flip(1).numpy().tobytes()
            new.writestr(info.filename, data)


def test_a_big_endian_file_is_read_byte_swapped_as_torch_reads_it(tmp_path):
    state = {
        "f32": torch.arange(6.0).reshape(2, 3) - 2.5,
        "i64": torch.tensor([1, -2, 1 << 40]),
        "f16": torch.tensor([0.5, -3.0], dtype=torch.float16),
        "bf16": torch.tensor([1.5, 2.0], dtype=torch.bfloat16),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
    }
    torch.save(state, tmp_path / "little.pt")
    _as_big_endian(tmp_path / "little.pt", tmp_path / "big.pt", [t.dtype for t in state.values()])
    reference = torch.load(tmp_path / "big.pt", weights_only=True)
    for source in (reference, tk.load(tmp_path / "big.pt")):
        for key, value in state.items():
            assert source[key].dtype == value.dtype and torch.equal(source[key], value), key
    assert tk.verify(tmp_path / "big.pt").ok  # the CRC-32s cover the bytes as stored
    assert torch.equal(tk.load_state_dict(tmp_path / "big.pt")["f32"], state["f32"])
    tk.convert(tmp_path / "big.pt", tmp_path / "little.safetensors")
    assert torch.equal(tk.load(tmp_path / "little.safetensors")["i64"], state["i64"])


def test_a_byteorder_that_is_neither_is_corrupt(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with (
        zipfile.ZipFile(tmp_path / "w.pt") as old,
        zipfile.ZipFile(tmp_path / "odd.pt", "w", zipfile.ZIP_STORED) as new,
    ):
        for info in old.infolist():
            odd = info.filename.endswith("/byteorder")
            new.writestr(info.filename, b"middle" if odd else old.read(info))
    with pytest.raises(tk.CorruptCheckpointError, match="byteorder entry says 'middle'"):
        tk.load(tmp_path / "odd.pt")


def test_a_pre_1_6_file_from_a_big_endian_machine_reads_as_torch_reads_it(tmp_path):
    # Such a machine writes little_endian=False in the file's system information, and the
    # storages little-endian all the same (torch converts them as it writes).
    state = {"w": torch.arange(6.0) - 2.5, "n": torch.tensor([1, -2, 1 << 40])}
    torch.save(state, tmp_path / "little.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "little.pt").read_bytes()
    little = pickle.dumps(True)[2:-1]  # the pickled True inside the system information
    at = data.index(b"little_endian") + len("little_endian")
    assert data.count(b"little_endian") == 1
    flag = data.index(b"\x88", at)  # NEWTRUE
    (tmp_path / "big.pt").write_bytes(data[:flag] + b"\x89" + data[flag + 1 :])  # NEWFALSE
    assert little == b"\x88"
    with open(tmp_path / "big.pt", "rb") as f:  # magic number, protocol, system information
        unpickler = pickle.Unpickler(f)
        assert unpickler.load() and unpickler.load()
        assert unpickler.load()["little_endian"] is False
    reference = torch.load(tmp_path / "big.pt", weights_only=True)
    back = tk.load(tmp_path / "big.pt")
    for key, value in state.items():
        assert torch.equal(reference[key], value) and torch.equal(back[key], value), key
