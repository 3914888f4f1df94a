"""Every dtype that safetensors writes, read and written bit for bit both ways; complex tensors
and their views; dtypes torchkeep does not know, refused as unsupported (not corrupt); and the
rule of which tensors a ``dtype=`` casts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import torchkeep as tk
from torchkeep.cli import main
from torchkeep.format import DTYPE_NAMES, DTYPES, signed_manifest_text

# What safetensors itself saves from this torch (its table of item sizes by torch dtype).
SAFETENSORS_WRITES = sorted((d for d in safetensors.torch._SIZE if d is not None), key=str)
F4 = DTYPES.get("F4")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: comparable for every dtype, NaN payloads and float4 included."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` holding arbitrary bit patterns (every byte value, NaNs too)."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(_bits(a), _bits(b))


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def _handwritten(path: Path, spec: dict, data: bytes) -> Path:
    """A safetensors file built byte by byte: length prefix, JSON header, data."""
    raw = json.dumps({"w": spec}).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


ids = [str(d).removeprefix("torch.") for d in SAFETENSORS_WRITES]


def test_torchkeep_knows_every_dtype_safetensors_writes_by_the_same_name(tmp_path):
    assert set(DTYPE_NAMES) == set(SAFETENSORS_WRITES)
    for dtype in SAFETENSORS_WRITES:
        path = tmp_path / "x.safetensors"
        safetensors.torch.save_file({"x": _sample(dtype)}, path)
        assert _header(path)["x"]["dtype"] == DTYPE_NAMES[dtype], dtype
    # The names of the older dtypes never change (files already written use them).
    assert DTYPE_NAMES[torch.float8_e4m3fn] == "F8_E4M3"
    assert DTYPE_NAMES[torch.complex64] == "C64"


@pytest.mark.parametrize("dtype", SAFETENSORS_WRITES, ids=ids)
def test_a_safetensors_file_of_each_dtype_loads_bit_exactly(tmp_path, dtype):
    tensors = {"x": _sample(dtype), "empty": _sample(dtype, (0, 2)), "row": _sample(dtype, (1, 2))}
    path = tmp_path / "st.safetensors"
    safetensors.torch.save_file(tensors, path)
    for loaded in (tk.load(path), tk.load_state_dict(path), tk.load_state_dict(path, lazy=True)):
        assert set(loaded) == set(tensors)
        for name, t in tensors.items():
            assert _same_bits(t, loaded[name]), (name, dtype)
    info = {t.name: t for t in tk.describe(path).tensors}
    assert info["x"].dtype == DTYPE_NAMES[dtype] and info["x"].shape == (3, 4)
    report = tk.verify(path)
    assert report.ok and report.tensors == 3


@pytest.mark.parametrize("dtype", SAFETENSORS_WRITES, ids=ids)
def test_torchkeep_files_of_each_dtype_load_bit_exactly_in_safetensors(tmp_path, dtype):
    x, y = _sample(dtype), _sample(dtype, (2, 6), seed=1)
    state = {"x": x, "view": y.t(), "empty": _sample(dtype, (0,))}  # a non-contiguous view
    weights = tmp_path / "weights.safetensors"
    tk.save_weights(state, weights)
    for read in (safetensors.torch.load_file(weights), tk.load_state_dict(weights)):
        for name, t in state.items():
            assert _same_bits(t, read[name]), (name, dtype)
    with safetensors.safe_open(weights, "pt") as f:
        assert _same_bits(x, f.get_tensor("x"))

    for target in (tmp_path / "state.safetensors", tmp_path / "state_dir"):
        tk.save({"model": state, "step": 3}, target)
        back = tk.load(target)
        assert back["step"] == 3
        assert all(_same_bits(t, back["model"][n]) for n, t in state.items()), dtype
        assert tk.verify(target).ok
    loaded = safetensors.torch.load_file(tmp_path / "state.safetensors")
    assert _same_bits(x, loaded["model.x"])
    assert not tk.diff(tmp_path / "state.safetensors", tmp_path / "state_dir").changed


@pytest.mark.skipif(F4 is None, reason="this torch has no float4_e2m1fn_x2")
def test_float4_headers_count_values_as_safetensors_does(tmp_path):
    t = _sample(F4, (3, 4))  # 3 × 4 bytes, two values each
    tk.save_weights({"w": t}, tmp_path / "w.safetensors")
    header = _header(tmp_path / "w.safetensors")
    assert header["w"]["shape"] == [3, 8] and header["w"]["data_offsets"] == [0, 12]
    manifest = json.loads(header["__metadata__"]["torchkeep"])
    assert manifest["tensors"]["w"]["shape"] == [3, 8]
    with pytest.raises(tk.UnsupportedObjectError, match=r"^w: a 0-dimensional .*reshape\(1\)"):
        tk.save_weights({"w": _sample(F4, ())}, tmp_path / "scalar.safetensors")
    with pytest.raises(tk.UnsupportedObjectError, match="0-dimensional"):
        tk.save({"w": _sample(F4, ())}, tmp_path / "scalar.safetensors")
    assert not (tmp_path / "scalar.safetensors").exists()


def test_complex64_weights_round_trip_into_a_model(tmp_path):
    class Filter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.taps = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))
            self.register_buffer("window", torch.randn(4, 4, dtype=torch.complex64))

    model, fresh = Filter(), Filter()
    tk.save_weights(model, tmp_path / "filter.safetensors")
    assert tk.load_weights(fresh, tmp_path / "filter.safetensors").ok
    assert _same_bits(model.taps.detach(), fresh.taps.detach())
    assert _same_bits(model.window, fresh.window)
    assert _header(tmp_path / "filter.safetensors")["taps"]["dtype"] == "C64"
    reference = safetensors.torch.load_file(tmp_path / "filter.safetensors")
    assert _same_bits(model.window, reference["window"])


def test_conjugate_and_negative_views_are_stored_as_their_values(tmp_path):
    z = torch.randn(3, 5, dtype=torch.complex64)
    big = torch.randn(1 << 18, dtype=torch.complex64)  # written in chunks, not batched
    state = {"z": z, "conj": z.conj(), "imag_of_conj": z.conj().imag, "big_conj": big.conj()}
    expected = {n: t.resolve_conj().resolve_neg() for n, t in state.items()}
    tk.save(state, tmp_path / "views.safetensors")
    tk.save_weights(state, tmp_path / "weights.safetensors")
    for loaded in (
        tk.load(tmp_path / "views.safetensors"),
        tk.load_state_dict(tmp_path / "weights.safetensors"),
        safetensors.torch.load_file(tmp_path / "weights.safetensors"),
    ):
        for name, t in expected.items():
            assert _same_bits(t, loaded[name]), name
            assert not loaded[name].is_conj() and not loaded[name].is_neg()
    # z and its conjugate share memory but are different values: neither is an alias.
    assert _header(tmp_path / "weights.safetensors").keys() >= set(state)
    into = {"z": torch.zeros(3, 5, dtype=torch.complex64).conj()}
    restored = tk.load(tmp_path / "views.safetensors", into=into)
    assert torch.equal(restored["z"], z)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32], ids=["c128", "c32"])
def test_complex_dtypes_without_a_safetensors_name_are_stored_as_pairs(tmp_path, dtype):
    z = torch.view_as_complex(torch.randn(4, 3, 2).to(dtype.to_real()))
    real = dtype.to_real()
    path = tmp_path / "z.safetensors"
    tk.save({"z": z, "view": z.conj(), "n": 1}, path)
    back = tk.load(path)
    assert back["z"].dtype == dtype and _same_bits(back["z"], z)
    assert _same_bits(back["view"], z.conj().resolve_conj())
    assert tk.load(path, dtype=torch.float16)["z"].dtype == dtype  # complex is never cast
    assert tk.describe(path).format_version == 3 and tk.verify(path).ok
    with safe_open(path, "pt") as f:  # standard safetensors: the pairs, as torch.view_as_real
        assert f.get_tensor("z:real").dtype == real and f.get_tensor("z:real").shape == (4, 3, 2)
    tk.save_weights({"z": z, "w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert _same_bits(tk.load_state_dict(tmp_path / "w.safetensors")["z"], z)


def test_a_complex128_module_round_trips_and_save_model_says_what_to_store(tmp_path):
    model = nn.Linear(3, 2).to(torch.complex128)
    tk.save_weights(model, tmp_path / "m.safetensors")
    fresh = nn.Linear(3, 2).to(torch.complex128)
    tk.load_weights(fresh, tmp_path / "m.safetensors")
    assert _same_bits(fresh.weight, model.weight) and _same_bits(fresh.bias, model.bias)
    with pytest.raises(tk.UnsupportedObjectError, match=r"^weight: .*complex128.*view_as_real"):
        tk.save_model(model, tmp_path / "model")


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda r: r.update(dtype="complex256"), "unknown complex dtype"),
        (lambda r: r.update(extra=1), "has keys"),
        (lambda r: r.update(real={"$tensor": "nothing"}), "lacks"),
    ],
)
def test_a_lying_complex_recipe_is_corrupt(tmp_path, edit, why):
    path = tmp_path / "z"
    tk.save({"z": torch.ones(2, dtype=torch.complex128)}, path)
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest["tree"]["z"]["$complex"])
    manifest.pop("manifest_checksum")
    (path / "manifest.json").write_text(signed_manifest_text(manifest))
    with pytest.raises(tk.CorruptCheckpointError, match=why):
        tk.load(path)


def test_pairs_of_the_wrong_dtype_or_shape_are_corrupt(tmp_path):
    path = tmp_path / "z"
    tk.save({"z": torch.ones(2, dtype=torch.complex128), "f": torch.ones(2, 3)}, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tree"]["z"]["$complex"]["real"] = {"$tensor": "f"}
    manifest.pop("manifest_checksum")
    (path / "manifest.json").write_text(signed_manifest_text(manifest))
    with pytest.raises(tk.CorruptCheckpointError, match=r"its pairs are torch.float32"):
        tk.load(path)


def test_complex128_stored_as_the_message_advises_comes_back_exactly(tmp_path):
    z = torch.randn(4, 3, dtype=torch.complex128)
    tk.save({"z": torch.view_as_real(z)}, tmp_path / "z.safetensors")
    assert _same_bits(z, torch.view_as_complex(tk.load(tmp_path / "z.safetensors")["z"]))


@pytest.mark.parametrize(
    ("spec", "data", "reason"),
    [
        ({"dtype": "F7_E9", "shape": [2], "data_offsets": [0, 2]}, 2, "not a safetensors dtype"),
        ({"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}, 3, "has no dtype for"),
        ({"dtype": "I128", "shape": [1], "data_offsets": [0, 16]}, 16, "not a safetensors dtype"),
    ],
    ids=["invented", "safetensors-F6", "I128"],
)
def test_a_dtype_torchkeep_does_not_know_is_unsupported_everywhere(
    tmp_path, capsys, spec, data, reason
):
    path = _handwritten(tmp_path / "odd.safetensors", spec, bytes(data))
    what = f"{path}: tensor 'w' has dtype '{spec['dtype']}'"
    for read in (tk.load, tk.load_state_dict, tk.describe):
        with pytest.raises(tk.UnsupportedFormatError) as raised:
            read(path)
        assert str(raised.value).startswith(what) and reason in str(raised.value)
        assert "convert the tensor" in str(raised.value)
    with pytest.raises(tk.UnsupportedFormatError, match="'w' has dtype"):
        tk.load_weights(torch.nn.Linear(1, 1), path)
    report = tk.verify(path)
    assert not report.ok and report.problems[0].startswith(what)
    assert main(["inspect", str(path)]) == 1
    assert what in capsys.readouterr().err
    assert main(["verify", str(path)]) == 1
    assert what in capsys.readouterr().out


def test_an_unknown_dtype_in_a_directory_shard_is_unsupported(tmp_path):
    tk.save({"w": torch.ones(2)}, tmp_path / "dir")
    shard = next((tmp_path / "dir").glob("*.safetensors"))
    header = _header(shard)
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    name = next(k for k in header if k != "__metadata__")
    text = raw[8 : 8 + length].replace(b'"F32"', b'"F7_E9"', 1)
    shard.write_bytes(raw[:8] + text + raw[8 + length :])
    with pytest.raises(tk.UnsupportedFormatError, match=f"tensor '{name}' has dtype 'F7_E9'"):
        tk.load(tmp_path / "dir")


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "F7_E9", "shape": [-1], "data_offsets": [0, 2]},
        {"dtype": "F7_E9", "shape": [2], "data_offsets": [2, 0]},
        {"dtype": "F7_E9", "shape": [2]},
        {"dtype": 7, "shape": [2], "data_offsets": [0, 2]},
        {"dtype": "", "shape": [2], "data_offsets": [0, 2]},
        {"dtype": "F" * 100, "shape": [2], "data_offsets": [0, 2]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 2]},
    ],
    ids=["negative-dim", "reversed-offsets", "no-offsets", "int", "empty", "long", "short-span"],
)
def test_a_header_malformed_otherwise_stays_corrupt(tmp_path, spec):
    path = _handwritten(tmp_path / "bad.safetensors", spec, bytes(2))
    for read in (tk.load, tk.load_state_dict, tk.describe):
        with pytest.raises(tk.CorruptCheckpointError, match="tensor 'w'"):
            read(path)
    assert not tk.verify(path).ok


@pytest.mark.skipif(F4 is None, reason="this torch has no float4_e2m1fn_x2")
def test_float4_shapes_torch_cannot_hold_or_bytes_cannot_fill(tmp_path):
    odd = _handwritten(
        tmp_path / "odd.safetensors",
        {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]},
        bytes(3),
    )
    with pytest.raises(tk.UnsupportedFormatError, match=r"'w': a F4 tensor of shape \[2, 3\]"):
        tk.load(odd)
    half = _handwritten(
        tmp_path / "half.safetensors",
        {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]},
        bytes(2),
    )
    with pytest.raises(tk.CorruptCheckpointError, match="do not fill whole bytes"):
        tk.load_state_dict(half)


def test_dtype_casts_ordinary_floats_only(tmp_path):
    state = {
        "f32": torch.randn(4),
        "f64": torch.randn(4, dtype=torch.float64),
        "f8": _sample(torch.float8_e4m3fn, (4,)),
        "f8_fnuz": _sample(torch.float8_e5m2fnuz, (4,)),
        "c64": torch.randn(4, dtype=torch.complex64),
        "i64": torch.arange(4),
        "mask": torch.ones(4, dtype=torch.bool),
    }
    if F4 is not None:
        state["f4"] = _sample(F4, (4,))
    cast = {"f32", "f64"}

    def check(loaded: dict) -> None:
        for name, t in state.items():
            if name in cast:
                assert loaded[name].dtype == torch.bfloat16, name
                assert torch.equal(loaded[name], t.to(torch.bfloat16)), name
            else:
                assert _same_bits(t, loaded[name]), name

    tk.save(state, tmp_path / "s.safetensors")
    check(tk.load(tmp_path / "s.safetensors", dtype=torch.bfloat16))
    tk.save_weights(state, tmp_path / "w.safetensors")
    check(tk.load_state_dict(tmp_path / "w.safetensors", dtype=torch.bfloat16))
    tk.save_weights(state, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    check(safetensors.torch.load_file(tmp_path / "bf16.safetensors"))


def test_diff_compares_complex_and_float4_values(tmp_path):
    a = {"c": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)}
    b = {"c": torch.tensor([1 + 2j, 3 + 1j], dtype=torch.complex64)}
    if F4 is not None:
        a["f4"] = _sample(F4, (2,), seed=1)
        b["f4"] = _sample(F4, (2,), seed=2)
    tk.save(a, tmp_path / "a.safetensors")
    tk.save(b, tmp_path / "b.safetensors")
    changed = {
        c.name: c for c in tk.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").changed
    }
    assert changed["c"].what == "values" and changed["c"].max_abs_diff == pytest.approx(2.0)
    if F4 is not None:
        assert changed["f4"].what == "values" and changed["f4"].max_abs_diff is None
    assert not tk.diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors").changed
