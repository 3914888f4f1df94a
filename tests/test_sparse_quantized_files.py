"""Sparse and quantized tensors in torch.save files, read as torch.load(weights_only=True) reads
them: every sparse layout, per-tensor and per-channel quantized tensors, the state dicts of
quantized models; what describe, verify, diff and scan say of them; crafted variants refused."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._utils
from torch import nn

import torchkeep as tk
from hostile import Call, Stored, crafted_zip, stored_tensor

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

_SPARSE, _QTENSOR = torch._utils._rebuild_sparse_tensor, torch._utils._rebuild_qtensor


def _dense(*shape: int, seed: int = 0) -> torch.Tensor:
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return values * (values > 0.3)


def _save(tmp_path: Path, obj: Any, *, legacy: bool = False, name: str = "f.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _same_sparse(ours: Any, theirs: torch.Tensor) -> None:
    assert type(ours) is type(theirs) and ours.layout == theirs.layout
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.requires_grad == theirs.requires_grad
    if theirs.layout == torch.sparse_coo:
        assert ours.is_coalesced() == theirs.is_coalesced()
        assert torch.equal(ours._indices(), theirs._indices())
        assert torch.equal(ours._values(), theirs._values())
    else:
        for part in ("crow_indices", "col_indices", "ccol_indices", "row_indices", "values"):
            if theirs.layout in _PARTS[part]:
                assert torch.equal(getattr(ours, part)(), getattr(theirs, part)()), part
    if theirs.numel() < 1 << 20:
        assert torch.equal(ours.to_dense(), theirs.to_dense())


_PARTS = {
    "crow_indices": (torch.sparse_csr, torch.sparse_bsr),
    "col_indices": (torch.sparse_csr, torch.sparse_bsr),
    "ccol_indices": (torch.sparse_csc, torch.sparse_bsc),
    "row_indices": (torch.sparse_csc, torch.sparse_bsc),
    "values": (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc),
}


def _sparse_tensors() -> dict[str, torch.Tensor]:
    batched = torch.zeros(2, 4, 6)
    batched[0, 1, 2], batched[0, 3, 5], batched[1, 0, 0], batched[1, 2, 4] = 1, 2, 3, 4
    return {
        "coo": _dense(4, 5).to_sparse(),
        "coo-uncoalesced": torch.sparse_coo_tensor(
            torch.tensor([[1, 0, 1], [2, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (3, 3)
        ),
        "coo-3d": _dense(3, 4, 5).to_sparse(),
        "coo-hybrid": _dense(3, 4, 2).to_sparse(sparse_dim=2),
        "coo-complex": (_dense(3, 3) + 1j * _dense(3, 3, seed=1)).to_sparse(),
        "coo-empty": torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (3, 3)
        ),
        "coo-of-a-huge-size": torch.sparse_coo_tensor(
            torch.tensor([[0, (1 << 30) - 1], [5, 7]]), torch.ones(2), (1 << 30, 1 << 30)
        ),
        "csr": _dense(4, 5).to_sparse_csr(),
        "csr-int32": torch.sparse_csr_tensor(
            torch.tensor([0, 1, 1, 3], dtype=torch.int32),
            torch.tensor([2, 0, 1], dtype=torch.int32),
            torch.tensor([1.0, 2.0, 3.0]),
            (3, 3),
        ),
        "csr-batched": batched.to_sparse_csr(),
        "csr-hybrid": _dense(4, 6, 2).to_sparse_csr(dense_dim=1),
        "csc": _dense(4, 5).to_sparse_csc(),
        "bsr": _dense(4, 6).to_sparse_bsr((2, 3)),
        "bsr-hybrid": _dense(4, 6, 3).to_sparse_bsr((2, 3), dense_dim=1),
        "bsc": _dense(4, 6).to_sparse_bsc((2, 2)),
        "parameter": nn.Parameter(_dense(4, 5).to_sparse()),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-1.6-stream"])
def test_sparse_tensors_read_as_torch_reads_them(tmp_path, legacy):
    state = _sparse_tensors()
    path = _save(tmp_path, state, legacy=legacy)
    theirs = torch.load(path, weights_only=True)
    ours = tk.load(path)
    assert list(ours) == list(state)
    for name, tensor in theirs.items():
        _same_sparse(ours[name], tensor)
    report = tk.scan(path)
    assert report.safe and report.unsafe == (), report.verdict
    assert "torch._utils._rebuild_sparse_tensor" in report.globals
    for name, tensor in tk.load_state_dict(path).items():
        _same_sparse(tensor, theirs[name])


def test_describe_lists_sparse_tensors_by_their_dense_shape_and_stored_bytes(tmp_path):
    state = _sparse_tensors()
    path = _save(tmp_path, state)
    described = {t.name: t for t in tk.describe(path).tensors}
    assert set(described) == set(state)
    coo, csr = state["coo"], state["csr"]
    assert described["coo"].shape == (4, 5) and described["coo"].dtype == "F32"
    assert described["coo"].nbytes == coo._nnz() * (2 * 8 + 4)  # int64 indices, float32 values
    nnz, rows = csr.values().numel(), 4
    assert described["csr"].nbytes == (rows + 1) * 8 + nnz * 8 + nnz * 4
    assert described["coo-of-a-huge-size"].shape == (1 << 30, 1 << 30)
    assert described["coo-of-a-huge-size"].nbytes == 2 * 2 * 8 + 2 * 4
    report = tk.verify(path)
    assert report.ok and report.checksummed and report.tensors == len(state)


def _quantized_tensors() -> dict[str, torch.Tensor]:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    per_channel = torch.quantize_per_channel(
        x, torch.tensor([0.1, 0.2, 0.05, 0.3]), torch.tensor([0, 3, -2, 1]), 1, torch.qint8
    )
    return {
        "qint8": torch.quantize_per_tensor(x, 0.05, -3, torch.qint8),
        "quint8": torch.quantize_per_tensor(x, 0.02, 128, torch.quint8),
        "qint32": torch.quantize_per_tensor(x, 1e-4, 17, torch.qint32),
        "transposed": torch.quantize_per_tensor(x, 0.05, 0, torch.qint8).t(),
        "per-channel": per_channel,
        "per-channel-float-qparams": torch.quantize_per_channel(
            x, torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.0, -1.0]), 0, torch.quint8
        ),
    }


def _same_quantized(ours: Any, theirs: torch.Tensor) -> None:
    assert type(ours) is torch.Tensor and ours.is_quantized
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.stride() == theirs.stride() and ours.qscheme() == theirs.qscheme()
    assert torch.equal(ours.int_repr(), theirs.int_repr())
    if theirs.qscheme() == torch.per_tensor_affine:
        assert (ours.q_scale(), ours.q_zero_point()) == (theirs.q_scale(), theirs.q_zero_point())
    else:
        assert ours.q_per_channel_axis() == theirs.q_per_channel_axis()
        assert torch.equal(ours.q_per_channel_scales(), theirs.q_per_channel_scales())
        assert torch.equal(ours.q_per_channel_zero_points(), theirs.q_per_channel_zero_points())
    assert torch.equal(ours.dequantize(), theirs.dequantize())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-1.6-stream"])
def test_quantized_tensors_read_as_torch_reads_them(tmp_path, legacy):
    state = _quantized_tensors()
    path = _save(tmp_path, state, legacy=legacy)
    theirs = torch.load(path, weights_only=True)
    ours = tk.load(path)
    for name, tensor in theirs.items():
        _same_quantized(ours[name], tensor)
    report = tk.scan(path)
    assert report.safe and report.unsafe == (), report.verdict
    described = {t.name: t for t in tk.describe(path).tensors}
    assert (described["qint8"].dtype, described["qint8"].shape, described["qint8"].nbytes) == (
        "qint8",
        (3, 4),
        12,
    )
    assert described["qint32"].nbytes == 48 and described["transposed"].shape == (4, 3)
    report = tk.verify(path)
    assert report.ok and report.tensors == len(state)


def _linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _dynamic() -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(_linear_stack(), {nn.Linear}, dtype=torch.qint8)


def _static() -> nn.Module:
    quant = torch.ao.quantization
    model = nn.Sequential(quant.QuantStub(), *_linear_stack(), quant.DeQuantStub()).eval()
    model.qconfig = quant.get_default_qconfig("fbgemm")  # weights quantized per channel
    prepared = quant.prepare(model)
    prepared(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))
    return quant.convert(prepared)


@pytest.mark.parametrize("build", [_dynamic, _static], ids=["dynamic", "static"])
def test_a_quantized_models_state_dict_loads_into_the_model(tmp_path, build):
    model = build()
    path = _save(tmp_path, model.state_dict())
    theirs = torch.load(path, weights_only=True)
    ours = tk.load(path)
    assert type(ours) is OrderedDict and list(ours) == list(theirs)
    packed = [k for k in theirs if k.endswith("._packed_params._packed_params")]
    assert packed  # (the int8 weight, the float bias): plain data, no torch.classes object
    for name, value in theirs.items():
        if isinstance(value, tuple):
            _same_quantized(ours[name][0], value[0])
            assert torch.equal(ours[name][1], value[1])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(ours[name], value)
        else:
            assert ours[name] == value
    fresh = build()
    for p in fresh.state_dict().values():
        if isinstance(p, torch.Tensor) and p.is_floating_point():
            p.zero_()
    fresh.load_state_dict(ours)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fresh(x), model(x))
    assert tk.scan(path).safe and tk.verify(path).ok
    assert {t.dtype for t in tk.describe(path).tensors} >= {"qint8", "F32"}


def test_a_whole_quantized_model_stays_refused_naming_only_its_classes(tmp_path):
    path = _save(tmp_path, _dynamic())
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load(path)
    message = str(refused.value)
    assert "torch.ao.nn.quantized.dynamic.modules.linear.Linear" in message
    assert "_rebuild" not in message and "per_tensor_affine" not in message
    report = tk.scan(path)
    assert not report.safe and "torch._utils._rebuild_qtensor" not in report.unsafe
    # The objects a whole model's pickle fills in (BUILD) are refused by their classes.
    plain = _save(tmp_path, _linear_stack(), name="plain.pt")
    with pytest.raises(tk.UnsafeFileError, match=r"torch\.nn\.modules\.container\.Sequential"):
        tk.load(plain)


class _System:
    def __reduce__(self) -> Any:
        return (os.system, ("true",))


def test_refusal_never_lists_torchs_sparse_and_quantized_rebuilders(tmp_path):
    state = {"s": _dense(3, 3).to_sparse_csr(), "q": _quantized_tensors()["per-channel"]}
    path = _save(tmp_path, {**state, "evil": _System()})
    with pytest.raises(tk.UnsafeFileError) as refused:
        tk.load(path)
    message = str(refused.value)
    assert "posix.system" in message
    for name in ("_rebuild", "_get_layout", "per_channel_affine", "Storage"):
        assert name not in message, name
    assert tk.scan(path).unsafe == ("posix.system",)


def test_diff_compares_sparse_and_quantized_tensors_part_by_part(tmp_path):
    a = torch.zeros(4, 5)
    a[0, 1] = 1
    b = a.clone()
    b[0, 1] = 3

    def state(x: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        return {
            "coo": x.to_sparse(),
            "csr": x.to_sparse_csr(),
            "q": torch.quantize_per_tensor(a, scale, 3, torch.quint8),
            "qc": _quantized_tensors()["per-channel"],
        }

    first = _save(tmp_path, state(a, 0.1), name="a.pt")
    second = _save(tmp_path, state(b, 0.2), name="b.pt")
    assert tk.diff(first, first).same
    changes = {c.name: c for c in tk.diff(first, second).changed}
    assert set(changes) == {"coo", "csr", "q"}
    assert changes["coo"].what == "values" and changes["coo"].max_abs_diff == 2.0
    assert changes["csr"].max_abs_diff == 2.0
    assert "scale" in changes["q"].what


def test_a_pending_read_of_sparse_or_quantized_tensors_is_whole_and_checked(tmp_path):
    from torchkeep.legacy import PendingLoad

    path = _save(
        tmp_path, {"s": _dense(4, 5).to_sparse(), "q": _quantized_tensors()["per-channel"]}
    )
    pending = PendingLoad(str(path))
    for tensor in pending.obj.values():
        pending.wait(tensor)
    assert torch.equal(pending.obj["s"].to_dense(), _dense(4, 5))
    pending.finish()
    bad = _crafted(tmp_path, "bad", _coo(torch.tensor([[0, 9], [0, 0]]), torch.ones(2), (3, 3)))
    with pytest.raises(tk.CorruptCheckpointError, match="does not hold together"):
        PendingLoad(str(bad))


# ---------------------------------------------------------------------------------------------
# crafted files


def _crafted(tmp_path: Path, name: str, obj: Any) -> Path:
    return crafted_zip(tmp_path / f"{name}.pt", {"t": obj})


def _coo(indices: Any, values: Any, size: Any, coalesced: Any = False) -> Call:
    stored = [stored_tensor(v) if isinstance(v, torch.Tensor) else v for v in (indices, values)]
    return Call(_SPARSE, torch.sparse_coo, (*stored, size, coalesced))


def _compressed(layout: torch.layout, compressed: Any, plain: Any, values: Any, size: Any) -> Call:
    parts = [
        stored_tensor(v) if isinstance(v, torch.Tensor) else v for v in (compressed, plain, values)
    ]
    return Call(_SPARSE, layout, (*parts, size))


def _qint8(numel: int = 12, entry: int | None = None) -> Stored:
    return Stored(torch.QInt8Storage, bytes(numel if entry is None else entry), numel=numel)


def _per_tensor(scale: Any = 0.1, zero_point: Any = 0, **kw: Any) -> Call:
    storage, offset = kw.get("storage", _qint8()), kw.get("offset", 0)
    size, stride = kw.get("size", (3, 4)), kw.get("stride", (4, 1))
    params = kw.get("params", (torch.per_tensor_affine, scale, zero_point))
    return Call(_QTENSOR, storage, offset, size, stride, params, kw.get("grad", False), {})


def _per_channel(scales: Any, zero_points: Any, axis: Any = 0) -> Call:
    params = (torch.per_channel_affine, stored_tensor(scales), stored_tensor(zero_points), axis)
    return _per_tensor(params=params)


_I = torch.tensor([[0, 1, 2], [1, 0, 2]])
_F64, _I64 = torch.float64, torch.int64
_SCALES, _ZEROS = torch.full((3,), 0.1, dtype=_F64), torch.zeros(3, dtype=_I64)

# name: (the crafted object, the error, words of its message, whether only reading data finds it)
CRAFTED: dict[str, tuple[Callable[[], Any], type[tk.TorchkeepError], str, bool]] = {
    "coo-indices-int32": (
        lambda: _coo(_I.int(), torch.ones(3), (3, 3)), tk.CorruptCheckpointError, "not int64", False
    ),
    "coo-indices-a-list": (
        lambda: _coo([[0, 1]], torch.ones(1), (3, 3)), tk.CorruptCheckpointError, "not a plain tensor", False
    ),
    "coo-size-not-integers": (
        lambda: _coo(_I, torch.ones(3), ("3", 3)), tk.CorruptCheckpointError, "non-negative", False
    ),
    "coo-values-disagree-with-indices": (
        lambda: _coo(_I, torch.ones(2), (3, 3)), tk.CorruptCheckpointError, "do not fit together", False
    ),
    "coo-dense-dims-disagree-with-size": (
        lambda: _coo(_I, torch.ones(3, 2), (3, 3, 4)), tk.CorruptCheckpointError, "do not fit", False
    ),
    "coo-coalesced-not-a-flag": (
        lambda: _coo(_I, torch.ones(3), (3, 3), "yes"), tk.CorruptCheckpointError, "is_coalesced", False
    ),
    "coo-size-overflows": (
        lambda: _coo(_I, torch.ones(3), (1 << 40, 1 << 40)), tk.CorruptCheckpointError, "hold together", False
    ),
    "coo-parts-wrapped-in-a-parts-tuple": (
        lambda: Call(_SPARSE, torch.sparse_coo, (stored_tensor(_I),)), tk.CorruptCheckpointError, "parts", False
    ),
    "layout-not-sparse": (
        lambda: Call(_SPARSE, "torch.sparse_coo", ()), tk.CorruptCheckpointError, "not a layout", False
    ),
    "coo-index-beyond-size": (
        lambda: _coo(torch.tensor([[0, 5], [0, 0]]), torch.ones(2), (3, 3)),
        tk.CorruptCheckpointError, "hold together", True,
    ),
    "coo-negative-index": (
        lambda: _coo(torch.tensor([[0, -1], [0, 0]]), torch.ones(2), (3, 3)),
        tk.CorruptCheckpointError, "hold together", True,
    ),
    "coo-claims-coalesced-with-duplicates": (
        lambda: _coo(torch.tensor([[1, 1], [0, 0]]), torch.ones(2), (3, 3), True),
        tk.CorruptCheckpointError, "coalesced", True,
    ),
    "csr-index-dtypes-differ": (
        lambda: _compressed(torch.sparse_csr, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]).int(), torch.ones(3), (3, 3)),
        tk.CorruptCheckpointError, "both int32 or both int64", False,
    ),
    "csr-compressed-indices-too-short": (
        lambda: _compressed(torch.sparse_csr, torch.tensor([0, 3]), torch.tensor([0, 1, 2]), torch.ones(3), (3, 3)),
        tk.CorruptCheckpointError, "do not fit together", False,
    ),
    "csr-values-disagree-with-indices": (
        lambda: _compressed(torch.sparse_csr, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]), torch.ones(5), (3, 3)),
        tk.CorruptCheckpointError, "do not fit together", False,
    ),
    "bsr-blocks-do-not-divide-size": (
        lambda: _compressed(torch.sparse_bsr, torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 2, 2), (3, 4)),
        tk.CorruptCheckpointError, "do not fit together", False,
    ),
    "bsr-empty-blocks": (
        lambda: _compressed(torch.sparse_bsr, torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 0, 2), (0, 4)),
        tk.CorruptCheckpointError, "do not fit together", False,
    ),
    "csr-compressed-indices-decreasing": (
        lambda: _compressed(torch.sparse_csr, torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]), torch.ones(3), (3, 3)),
        tk.CorruptCheckpointError, "hold together", True,
    ),
    "csr-last-compressed-index-not-nnz": (
        lambda: _compressed(torch.sparse_csr, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2]), torch.ones(3), (3, 3)),
        tk.CorruptCheckpointError, "hold together", True,
    ),
    "csc-plain-index-beyond-size": (
        lambda: _compressed(torch.sparse_csc, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 9]), torch.ones(3), (3, 3)),
        tk.CorruptCheckpointError, "hold together", True,
    ),
    "scale-nan": (lambda: _per_tensor(float("nan")), tk.CorruptCheckpointError, "not a finite number", False),
    "scale-inf": (lambda: _per_tensor(float("inf")), tk.CorruptCheckpointError, "not a finite number", False),
    "scale-a-string": (lambda: _per_tensor("0.1"), tk.CorruptCheckpointError, "not a finite number", False),
    "scale-a-bool": (lambda: _per_tensor(True), tk.CorruptCheckpointError, "not a finite number", False),
    "scale-beyond-any-float": (lambda: _per_tensor(1 << 2000), tk.CorruptCheckpointError, "not a finite number", False),
    "zero-point-out-of-range": (lambda: _per_tensor(0.1, 128), tk.CorruptCheckpointError, "zero point", False),
    "zero-point-a-float": (lambda: _per_tensor(0.1, 1.0), tk.CorruptCheckpointError, "zero point", False),
    "qscheme-not-written-by-torch": (
        lambda: _per_tensor(params=(torch.per_tensor_symmetric, 0.1, 0)),
        tk.CorruptCheckpointError, "not those torch.save writes", False,
    ),
    "params-not-a-tuple": (lambda: _per_tensor(params="affine"), tk.CorruptCheckpointError, "not those", False),
    "quantized-requires-grad": (lambda: _per_tensor(grad=True), tk.CorruptCheckpointError, "requiring gradients", False),
    "quantized-over-a-float-storage": (
        lambda: _per_tensor(storage=Stored(torch.FloatStorage, bytes(48))),
        tk.CorruptCheckpointError, "not of a quantized dtype", False,
    ),
    "plain-tensor-over-a-quantized-storage": (
        lambda: Call(torch._utils._rebuild_tensor_v2, _qint8(), 0, (3, 4), (4, 1), False, {}),
        tk.CorruptCheckpointError, "only quantized tensors", False,
    ),
    "plain-tensor-typed-quantized": (
        lambda: Call(torch._utils._rebuild_tensor_v3, Stored(torch.UntypedStorage, bytes(12), 12), 0, (12,), (1,), False, {}, torch.qint8),
        tk.CorruptCheckpointError, "only quantized tensors", False,
    ),
    "storage-claims-more-than-its-entry": (
        lambda: _per_tensor(storage=_qint8(12, entry=8)), tk.CorruptCheckpointError, "claims 12", False
    ),
    "view-past-the-storage": (lambda: _per_tensor(offset=4), tk.CorruptCheckpointError, "reaches element", False),
    "size-beyond-the-storage": (
        lambda: _per_tensor(size=(1 << 20, 1 << 20), stride=(1 << 20, 1)), tk.UnsupportedFormatError, "expands", False
    ),
    "axis-out-of-range": (lambda: _per_channel(_SCALES, _ZEROS, 2), tk.CorruptCheckpointError, "axis", False),
    "axis-negative": (lambda: _per_channel(_SCALES, _ZEROS, -1), tk.CorruptCheckpointError, "axis", False),
    "scales-of-the-wrong-length": (
        lambda: _per_channel(torch.full((4,), 0.1, dtype=_F64), _ZEROS), tk.CorruptCheckpointError, "channels", False
    ),
    "scales-float32": (
        lambda: _per_channel(_SCALES.float(), _ZEROS), tk.CorruptCheckpointError, "not float64 and int64", False
    ),
    "scales-not-finite": (
        lambda: _per_channel(torch.tensor([0.1, float("nan"), 0.1], dtype=_F64), _ZEROS),
        tk.CorruptCheckpointError, "not all finite", True,
    ),
    "zero-points-out-of-range": (
        lambda: _per_channel(_SCALES, torch.tensor([0, 1000, 0])), tk.CorruptCheckpointError, "zero points", True
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_sparse_and_quantized_tensors_are_refused(tmp_path, name):
    build, error, words, in_the_data = CRAFTED[name]
    path = _crafted(tmp_path, name, build())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=words) as refused:
            tk.load(path)
        assert str(path) in str(refused.value)
        assert tk.scan(path).unsafe == ()  # nothing outside torch would have run
        report = tk.verify(path)
        assert not report.ok and str(path) in report.problems[0]
        if in_the_data:
            assert tk.describe(path).tensors  # describe reads no tensor bytes
        else:
            with pytest.raises(error, match=words):
                tk.describe(path)


def test_a_layout_torch_does_not_save_is_not_read(tmp_path):
    path = _crafted(
        tmp_path,
        "strided",
        Call(_SPARSE, Call(torch.serialization._get_layout, "torch.strided"), ()),
    )
    with pytest.raises(tk.UnsupportedFormatError, match=r"layout .torch\.strided. is not read"):
        tk.load(path)


def test_load_weights_of_a_quantized_model_says_how_to_restore_it(tmp_path):
    def quantized() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)

    model = quantized()
    torch.save(model.state_dict(), tmp_path / "q.pt")
    tk.save(model.state_dict(), tmp_path / "q.safetensors")
    for path in (tmp_path / "q.pt", tmp_path / "q.safetensors"):
        fresh = quantized()
        with pytest.raises(tk.UnsupportedObjectError, match=r"not tensors .*model\.load_state_dict"):
            tk.load_weights(fresh, path)
        fresh.load_state_dict(tk.load(path))  # what the message says works
        x = torch.randn(2, 4)
        assert torch.equal(fresh(x), model(x))


def test_float_qparams_of_a_dtype_torch_never_makes_them_for_are_refused(tmp_path):
    # torch makes per_channel_affine_float_qparams for quint8 only; a qint32 one crashes its
    # kernels (SIGILL in dequantize), so it is refused on every path and never returned.
    crafted = torch._make_per_channel_quantized_tensor(
        torch.zeros(4, 3, dtype=torch.int32), torch.ones(4), torch.zeros(4), 0
    )
    assert crafted.qscheme() == torch.per_channel_affine_float_qparams
    torch.save({"q": crafted}, tmp_path / "q.pt")
    with pytest.raises(tk.CorruptCheckpointError, match="float zero points, which torch makes for quint8"):
        tk.load(tmp_path / "q.pt")
    with pytest.raises(tk.UnsupportedObjectError, match="float zero points with quint8 only"):
        tk.save({"q": crafted}, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_a_scale_the_format_cannot_hold_is_read_but_not_stored(tmp_path, scale):
    q = torch._make_per_tensor_quantized_tensor(torch.arange(3, dtype=torch.int8), scale, 0)
    torch.save({"q": q}, tmp_path / "q.pt")
    back = tk.load(tmp_path / "q.pt")["q"]  # read exactly, as torch reads it
    assert back.q_scale() == scale and torch.equal(back.int_repr(), q.int_repr())
    with pytest.raises(tk.UnsupportedObjectError, match=r"^q: .*finite scales above 0"):
        tk.save({"q": back}, tmp_path / "q.safetensors")


def test_many_conjugate_views_of_one_storage_stay_within_memory(tmp_path):
    z = torch.randn(1 << 16, dtype=torch.complex64)  # 512 KiB
    torch.save([z.conj(), z[1:].conj()], tmp_path / "two.pt")  # what users save: loads
    two = tk.load(tmp_path / "two.pt")
    assert torch.equal(two[0], z.conj().resolve_conj()) and torch.equal(two[1], z[1:].conj())
    torch.save([z.conj() for _ in range(60)], tmp_path / "many.pt")  # 60 views, one storage
    with pytest.raises(tk.CorruptCheckpointError, match="conjugate and negative views"):
        tk.load(tmp_path / "many.pt")
