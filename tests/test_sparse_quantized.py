"""Sparse and quantized tensors saved as plain component tensors plus a typed-JSON recipe, and
rebuilt on load: round trips through every writer and reader, standard safetensors files, the
format version, dtype casting, and crafted manifests that lie about them."""

import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.ao.quantization as tq
from safetensors import safe_open
from torch import nn

import torchkeep as tk
from torchkeep.format import signed_manifest_text

warnings.filterwarnings("ignore", message=".*(deprecated|beta state|implicitly disabled).*")


def _matrix(seed=0, shape=(6, 8)):
    torch.manual_seed(seed)
    m = torch.randn(*shape)
    m[m.abs() < 0.8] = 0
    return m


def sparse_tensors():
    m = _matrix()
    uncoalesced = torch.sparse_coo_tensor(
        torch.tensor([[2, 0, 2], [1, 3, 1]]), torch.tensor([1.5, -2.0, 4.0]), (4, 5)
    )
    return {
        "coo": m.to_sparse().coalesce(),
        "coo_uncoalesced": uncoalesced,
        "coo_hybrid": torch.randn(4, 3, 2).to_sparse(1),
        "coo_int": torch.tensor([[0, 7], [3, 0]], dtype=torch.int32).to_sparse(),
        "coo_empty": torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), [], (3, 3)),
        "csr": m.to_sparse_csr(),
        "csr_batched": torch.stack([_matrix(1, (3, 4)), _matrix(1, (3, 4)) * 2]).to_sparse_csr(),
        "csc": m.to_sparse_csc(),
        "bsr": m.to_sparse_bsr((2, 4)),
        "bsc": m.to_sparse_bsc((3, 2)),
        "csr_float64": m.double().to_sparse_csr(),
    }


def quantized_tensors():
    x = torch.randn(4, 6)
    scales = torch.rand(6, dtype=torch.float64) + 0.01
    return {
        "qint8": torch.quantize_per_tensor(x, 0.05, -3, torch.qint8),
        "quint8": torch.quantize_per_tensor(x, 0.1, 128, torch.quint8),
        "qint32": torch.quantize_per_tensor(x, 1e-4, 7, torch.qint32),
        "per_channel": torch.quantize_per_channel(x, scales, torch.arange(6) - 3, 1, torch.qint8),
        "per_channel_axis0": torch.quantize_per_channel(
            x, scales[:4], torch.tensor([0, 10, 20, 255]), 0, torch.quint8
        ),
        "float_qparams": torch.quantize_per_channel(
            x, torch.rand(4) + 0.01, torch.randn(4), 0, torch.quint8
        ),
    }


def assert_same(a, b):
    """Bit for bit: layout, dtype, size, every component, and the quantization parameters."""
    assert type(a) is type(b) and a.layout == b.layout and a.dtype == b.dtype
    assert a.shape == b.shape
    if a.layout == torch.sparse_coo:
        assert a.is_coalesced() == b.is_coalesced()
        assert torch.equal(a._indices(), b._indices())
        assert torch.equal(a._values(), b._values())
    elif a.layout in (torch.sparse_csr, torch.sparse_bsr):
        assert torch.equal(a.crow_indices(), b.crow_indices())
        assert torch.equal(a.col_indices(), b.col_indices())
        assert torch.equal(a.values(), b.values())
    elif a.layout in (torch.sparse_csc, torch.sparse_bsc):
        assert torch.equal(a.ccol_indices(), b.ccol_indices())
        assert torch.equal(a.row_indices(), b.row_indices())
        assert torch.equal(a.values(), b.values())
    elif a.is_quantized:
        assert b.is_quantized and a.qscheme() == b.qscheme()
        assert torch.equal(a.int_repr(), b.int_repr())
        if a.qscheme() == torch.per_tensor_affine:
            assert (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point())
        else:
            assert a.q_per_channel_axis() == b.q_per_channel_axis()
            assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            assert torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
    else:
        assert torch.equal(a, b)


def everything():
    return {**sparse_tensors(), **quantized_tensors(), "dense": torch.arange(5.0)}


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt"])
def test_save_and_load_round_trip_bit_exact(tmp_path, name):
    state = {"tensors": everything(), "epoch": 3, "pair": (sparse_tensors()["csr"], 1)}
    info = tk.save(state, tmp_path / name)
    assert info.path
    loaded = tk.load(tmp_path / name)
    assert set(loaded["tensors"]) == set(state["tensors"])
    for key, t in state["tensors"].items():
        assert_same(t, loaded["tensors"][key])
    assert_same(state["pair"][0], loaded["pair"][0])
    assert loaded["epoch"] == 3 and loaded["pair"][1] == 1
    assert tk.verify(tmp_path / name).ok
    assert tk.describe(tmp_path / name).format_version == 3


def test_a_tensor_at_the_root_and_one_object_named_twice(tmp_path):
    s = sparse_tensors()["coo"]
    tk.save(s, tmp_path / "root.safetensors")
    assert_same(s, tk.load(tmp_path / "root.safetensors"))
    q = quantized_tensors()["per_channel"]
    tk.save({"a": s, "b": s, "q1": q, "q2": q}, tmp_path / "twice.safetensors")
    with safe_open(tmp_path / "twice.safetensors", "pt") as f:
        names = set(f.keys())
    assert names == {"a:indices", "a:values", "q1:int_repr", "q1:scales", "q1:zero_points"}
    loaded = tk.load(tmp_path / "twice.safetensors")
    assert loaded["a"] is loaded["b"] and loaded["q1"] is loaded["q2"]
    assert_same(s, loaded["b"])
    assert_same(q, loaded["q2"])


def test_the_file_is_standard_safetensors_with_the_parts_under_their_names(tmp_path):
    s, q = sparse_tensors()["csr"], quantized_tensors()["per_channel"]
    tk.save({"emb": {"weight": s}, "fc.weight": q}, tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        names = list(f.keys())
        parts = {k: f.get_tensor(k) for k in names}
    assert set(parts) == {
        "emb.weight:crow_indices",
        "emb.weight:col_indices",
        "emb.weight:values",
        "fc.weight:int_repr",
        "fc.weight:scales",
        "fc.weight:zero_points",
    }
    assert torch.equal(parts["emb.weight:crow_indices"], s.crow_indices())
    assert torch.equal(parts["emb.weight:values"], s.values())
    assert torch.equal(parts["fc.weight:int_repr"], q.int_repr())
    assert torch.equal(parts["fc.weight:scales"], q.q_per_channel_scales())
    tree = tk.describe(tmp_path / "x.safetensors").tree
    assert tree["emb"]["weight"]["$sparse"]["layout"] == "csr"
    recipe = tree["fc.weight"]["$quantized"]
    assert (recipe["qscheme"], recipe["dtype"], recipe["axis"]) == (
        "per_channel_affine",
        "qint8",
        1,
    )


def test_a_part_name_taken_by_another_tensor_gets_a_suffix(tmp_path):
    s = sparse_tensors()["coo"]
    state = {"w": s, "w:values": torch.ones(2)}
    tk.save(state, tmp_path / "x.safetensors")
    loaded = tk.load(tmp_path / "x.safetensors")
    assert_same(s, loaded["w"])
    assert torch.equal(loaded["w:values"], torch.ones(2))


def test_plain_saves_keep_their_version(tmp_path):
    tk.save({"a": torch.ones(2)}, tmp_path / "plain.safetensors")
    assert tk.describe(tmp_path / "plain.safetensors").format_version == 1
    tk.save_weights({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert tk.describe(tmp_path / "w.safetensors").format_version == 1
    assert tk.describe(tmp_path / "w.safetensors").tree is None
    tk.save_weights({"a": quantized_tensors()["qint8"]}, tmp_path / "q.safetensors")
    assert tk.describe(tmp_path / "q.safetensors").format_version == 3


def test_save_weights_and_load_state_dict(tmp_path):
    shared = torch.randn(3, 3)
    state = {**sparse_tensors(), **quantized_tensors(), "w": shared, "tied": shared}
    tk.save_weights(state, tmp_path / "w.safetensors")
    for lazy in (False, True):
        loaded = tk.load_state_dict(tmp_path / "w.safetensors", lazy=lazy)
        assert set(loaded) == set(state)
        for key, t in state.items():
            assert_same(t, loaded[key])
        assert loaded["w"] is loaded["tied"]
    # Another tool reads the parts; the state-dict names of plain tensors are unchanged.
    plain = safetensors.torch.load_file(tmp_path / "w.safetensors")
    assert torch.equal(plain["w"], shared) and "coo:indices" in plain
    assert tk.load(tmp_path / "w.safetensors").keys() == state.keys()
    assert tk.verify(tmp_path / "w.safetensors").ok


def test_weights_of_sparse_tensors_only_and_keys_with_a_dollar(tmp_path):
    state = {"$odd": sparse_tensors()["csc"], "model": sparse_tensors()["coo"]}
    tk.save_weights(state, tmp_path / "w.safetensors")
    loaded = tk.load_state_dict(tmp_path / "w.safetensors")
    assert set(loaded) == set(state)
    for key, t in state.items():
        assert_same(t, loaded[key])


def test_load_state_dict_dtype_casts_sparse_values_not_quantized_parts(tmp_path):
    s, q = sparse_tensors()["coo"], quantized_tensors()["per_channel"]
    tk.save_weights({"s": s, "q": q, "i": sparse_tensors()["coo_int"]}, tmp_path / "w.safetensors")
    loaded = tk.load_state_dict(tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert loaded["s"].dtype == torch.bfloat16 and loaded["s"].layout == torch.sparse_coo
    assert torch.equal(loaded["s"]._values(), s._values().bfloat16())
    assert loaded["s"]._indices().dtype == torch.int64
    assert loaded["i"].dtype == torch.int32
    assert_same(q, loaded["q"])


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt"])
def test_load_dtype_casts_sparse_values_not_quantized_parts(tmp_path, name):
    s, q = sparse_tensors()["csr"], quantized_tensors()["per_channel"]
    tk.save({"s": s, "q": q, "again": q}, tmp_path / name)
    loaded = tk.load(tmp_path / name, dtype=torch.float16)
    assert loaded["s"].dtype == torch.float16
    assert torch.equal(loaded["s"].values(), s.values().half())
    assert torch.equal(loaded["s"].crow_indices(), s.crow_indices())
    assert_same(q, loaded["q"])
    assert loaded["again"] is loaded["q"]


def test_save_weights_dtype_casts_sparse_values_not_quantized_parts(tmp_path):
    s, q = sparse_tensors()["bsr"], quantized_tensors()["float_qparams"]
    tk.save_weights({"s": s, "q": q}, tmp_path / "w.safetensors", dtype=torch.bfloat16)
    loaded = tk.load_state_dict(tmp_path / "w.safetensors")
    assert loaded["s"].dtype == torch.bfloat16
    assert torch.equal(loaded["s"].values(), s.values().bfloat16())
    assert_same(q, loaded["q"])


class SparseBuffer(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.register_buffer("adjacency", _matrix(seed).to_sparse().coalesce())


def test_load_weights_into_a_model_with_a_sparse_buffer(tmp_path):
    source, target = SparseBuffer(0), SparseBuffer(1)
    tk.save_weights(source, tmp_path / "w.safetensors")
    assert tk.load_weights(target, tmp_path / "w.safetensors").ok
    assert_same(source.adjacency, target.adjacency)
    assert torch.equal(source.fc.weight, target.fc.weight)
    smaller = SparseBuffer()
    smaller.adjacency = torch.zeros(2, 2).to_sparse()
    with pytest.raises(tk.StateMismatchError, match=r"adjacency \(file \[6, 8\], model \[2, 2\]\)"):
        tk.load_weights(smaller, tmp_path / "w.safetensors")


def test_checkpoint_and_into_with_a_sparse_buffer(tmp_path):
    source, target = SparseBuffer(0), SparseBuffer(1)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    tk.save_checkpoint(tmp_path / "ckpt.safetensors", model=source, optimizer=optimizer, epoch=2)
    checkpoint = tk.load_checkpoint(tmp_path / "ckpt.safetensors", model=target)
    assert checkpoint.epoch == 2
    assert_same(source.adjacency, target.adjacency)
    assert_same(source.adjacency, tk.load_state_dict(tmp_path / "ckpt.safetensors")["adjacency"])
    other = SparseBuffer(2)
    tk.load(tmp_path / "ckpt.safetensors", into={"model_state_dict": other})
    assert_same(source.adjacency, other.adjacency)
    # A preallocated sparse tensor of the saved shape takes the values; another shape is refused.
    tk.save({"adjacency": source.adjacency}, tmp_path / "state.safetensors")
    held = {"adjacency": torch.zeros(6, 8).to_sparse()}
    tk.load(tmp_path / "state.safetensors", into=held)
    assert torch.equal(held["adjacency"].to_dense(), _matrix(0))
    wrong = {"adjacency": torch.zeros(2, 2).to_sparse()}
    with pytest.raises(
        tk.StateMismatchError, match=r"shape \[2, 2\] but the checkpoint's is \[6, 8\]"
    ):
        tk.load(tmp_path / "state.safetensors", into=wrong)


class Quantizable(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.fc = nn.Linear(4, 3)
        self.dequant = tq.DeQuantStub()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x):
        return self.dequant(self.fc(self.quant(x)))


def quantized_model(seed):
    torch.manual_seed(seed)
    model = Quantizable().eval()
    model.qconfig = tq.get_default_qconfig("x86")
    model.emb.qconfig = tq.float_qparams_weight_only_qconfig
    tq.prepare(model, inplace=True)
    model(torch.randn(16, 4))
    return tq.convert(model, inplace=True)


def test_a_quantized_model_from_torch_ao_quantization(tmp_path):
    source = quantized_model(0)
    x = torch.randn(5, 4)
    tk.save(source.state_dict(), tmp_path / "state")
    loaded = quantized_model(1)
    loaded.load_state_dict(tk.load(tmp_path / "state"))
    assert torch.equal(source(x), loaded(x))
    assert_same(source.emb.weight(), loaded.emb.weight())
    restored = quantized_model(2)
    tk.load(tmp_path / "state", into=restored)
    assert torch.equal(source(x), restored(x))
    tk.save_checkpoint(tmp_path / "ckpt.safetensors", model=source, step=7)
    resumed = quantized_model(3)
    assert tk.load_checkpoint(tmp_path / "ckpt.safetensors", model=resumed).step == 7
    assert torch.equal(source(x), resumed(x))
    assert tk.verify(tmp_path / "ckpt.safetensors").ok


def test_checkpoint_manager_saves_and_restores_them(tmp_path):
    for async_save in (False, True):
        state = {"model": SparseBuffer(0), "q": quantized_tensors()["per_channel"]}
        with tk.CheckpointManager(tmp_path / str(async_save), async_save=async_save) as mgr:
            mgr.save(1, state)
            mgr.wait()
            target = {"model": SparseBuffer(1)}
            assert mgr.restore(target) == 1
        assert_same(state["model"].adjacency, target["model"].adjacency)
        root = tmp_path / str(async_save)
        step = next(p for p in root.iterdir() if p.is_dir())
        assert_same(state["q"], tk.load(step)["q"])


def test_convert_keeps_them(tmp_path):
    state = {"s": sparse_tensors()["csc"], "q": quantized_tensors()["per_channel"]}
    tk.save_weights(state, tmp_path / "w.safetensors")
    tk.convert(tmp_path / "w.safetensors", tmp_path / "c.safetensors", dtype=torch.bfloat16)
    loaded = tk.load_state_dict(tmp_path / "c.safetensors")
    assert loaded["s"].dtype == torch.bfloat16
    assert_same(state["q"], loaded["q"])


def test_what_has_no_stored_form_is_refused(tmp_path):
    target = tmp_path / "x.safetensors"
    q4 = torch.quantize_per_tensor(torch.zeros(4), 0.1, 3, torch.quint4x2)
    with pytest.raises(tk.UnsupportedObjectError, match=r"^q: .*quint4x2.*dequantize"):
        tk.save({"q": q4}, target)
    with pytest.raises(tk.UnsupportedObjectError, match=r"^m: torch\._mkldnn .*to_dense"):
        tk.save_weights({"m": torch.zeros(2).to_mkldnn()}, target)
    with pytest.raises(tk.UnsupportedObjectError, match=r"^s: a meta tensor"):
        tk.save({"s": torch.zeros(2, 2).to_sparse().to("meta")}, target)
    assert not target.exists()
    with pytest.raises(tk.UnsupportedObjectError, match=r"^a: torch\.sparse_coo .*to_dense"):
        tk.save_model(SparseOnly(), tmp_path / "model")


class SparseOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.eye(3).to_sparse())


# -- crafted manifests: a file that lies is CorruptCheckpointError, never a crash


def _edit(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    edit(body)
    (path / "manifest.json").write_text(signed_manifest_text(body))


def _crafted(tmp_path, state, edit) -> Path:
    path = tmp_path / "ckpt"
    tk.save(state, path)
    _edit(path, edit)
    return path


def _recipe(body, key):
    ((_, recipe),) = body["tree"][key].items()
    return recipe


SPARSE_LIES = {
    "size smaller than the indices": (lambda r: r.update(size=[1, 1]), "size is inconsistent"),
    "size of another rank": (lambda r: r.update(size=[6, 8, 2]), "sparse_dim"),
    "indices out of range": (lambda r: r.update(indices={"$tensor": "big"}), "found index 99"),
    "float indices": (lambda r: r.update(indices={"$tensor": "floats"}), "float32, not integers"),
    "values of another length": (lambda r: r.update(values={"$tensor": "three"}), "same nnz"),
    "uncoalesced called coalesced": (
        lambda r: r.update(indices={"$tensor": "repeated"}),
        "uncoalesced",
    ),
}


@pytest.mark.parametrize("lie", sorted(SPARSE_LIES))
def test_a_sparse_tensor_that_lies_is_corrupt(tmp_path, lie):
    edit, match = SPARSE_LIES[lie]
    state = {
        "s": torch.sparse_coo_tensor([[0, 1], [1, 2]], [1.0, 2.0], (6, 8)).coalesce(),
        "big": torch.tensor([[0, 99], [1, 1]]),
        "floats": torch.zeros(2, 2),
        "three": torch.ones(3),
        "repeated": torch.tensor([[1, 1], [2, 2]]),
    }
    path = _crafted(tmp_path, state, lambda b: edit(_recipe(b, "s")))
    with pytest.raises(tk.CorruptCheckpointError, match=rf"sparse COO tensor .*{match}.*corrupt"):
        tk.load(path)


COMPRESSED_LIES = {
    "decreasing crow_indices": lambda r: r.update(crow_indices={"$tensor": "decreasing"}),
    "col_indices out of range": lambda r: r.update(col_indices={"$tensor": "far"}),
    "int32 and int64 indices": lambda r: r.update(crow_indices={"$tensor": "int32"}),
    "more rows than crow_indices": lambda r: r.update(size=[9, 8]),
}


@pytest.mark.parametrize("lie", sorted(COMPRESSED_LIES))
def test_a_compressed_sparse_tensor_that_lies_is_corrupt(tmp_path, lie):
    s = torch.tensor([[1.0, 0], [0, 2.0]]).to_sparse_csr()
    state = {
        "s": s,
        "decreasing": torch.tensor([0, 2, 1]),
        "far": torch.tensor([0, 5]),
        "int32": torch.tensor([0, 1, 2], dtype=torch.int32),
    }
    path = _crafted(tmp_path, state, lambda b: COMPRESSED_LIES[lie](_recipe(b, "s")))
    with pytest.raises(tk.CorruptCheckpointError, match=r"sparse CSR tensor .*corrupt"):
        tk.load(path)


QUANTIZED_LIES = {
    "a scale that is text": ("q", lambda r: r.update(scale="0.1"), "scale"),
    "a NaN scale": ("q", lambda r: r.update(scale={"$float": "nan"}), "scale"),
    "a zero scale": ("q", lambda r: r.update(scale=0), "scale"),
    "a negative scale": ("q", lambda r: r.update(scale=-0.5), "scale"),
    "a boolean scale": ("q", lambda r: r.update(scale=True), "scale"),
    "a zero point out of range": ("q", lambda r: r.update(zero_point=300), "zero_point"),
    "a fractional zero point": ("q", lambda r: r.update(zero_point=1.5), "zero_point"),
    "an unknown dtype": ("q", lambda r: r.update(dtype="qint4"), "dtype"),
    "an unknown qscheme": ("q", lambda r: r.update(qscheme="magic"), "qscheme"),
    "a missing key": ("qc", lambda r: r.pop("axis"), "axis"),
    "a missing part": ("qc", lambda r: r.pop("scales"), "keys"),
    "an extra key": ("qc", lambda r: r.update(scale=0.1), "keys"),
    "an int_repr of another dtype": ("q", lambda r: r.update(dtype="quint8"), "int_repr"),
    "a part the manifest lacks": ("q", lambda r: r.update(int_repr={"$tensor": "nope"}), "lacks"),
    "a negative axis": ("qc", lambda r: r.update(axis=-1), "axis"),
    "an axis past the last dimension": ("qc", lambda r: r.update(axis=2), "axis"),
    "an axis that is text": ("qc", lambda r: r.update(axis="1"), "axis"),
    "fewer scales than channels": ("qc", lambda r: r.update(axis=0), "channels"),
    "NaN among the scales": ("qc", lambda r: r.update(scales={"$tensor": "nan"}), "scale"),
    "integer scales": ("qc", lambda r: r.update(scales={"$tensor": "ints"}), "scales"),
    "zero points out of range": ("qc", lambda r: r.update(zero_points={"$tensor": "ints"}), "zero"),
}


@pytest.mark.parametrize("lie", sorted(QUANTIZED_LIES))
def test_a_quantized_tensor_that_lies_is_corrupt(tmp_path, lie):
    key, edit, match = QUANTIZED_LIES[lie]
    x = torch.randn(3, 6)
    state = {
        "q": torch.quantize_per_tensor(x, 0.1, 3, torch.qint8),
        "qc": torch.quantize_per_channel(
            x,
            torch.rand(6, dtype=torch.float64) + 0.01,
            torch.zeros(6, dtype=torch.long),
            1,
            torch.qint8,
        ),
        "nan": torch.tensor([0.1] * 5 + [float("nan")], dtype=torch.float64),
        "ints": torch.full((6,), 1000),
    }
    path = _crafted(tmp_path, state, lambda b: edit(_recipe(b, key)))
    with pytest.raises(tk.CorruptCheckpointError, match=match):
        tk.load(path)


@pytest.mark.parametrize(
    "recipe",
    [
        {"layout": "dia", "size": [2, 2]},
        {"layout": "coo", "size": [-1, 2], "coalesced": False},
        {"layout": "coo", "size": [1 << 40, 1 << 40], "coalesced": False},
        {"layout": "coo", "size": [2, 2], "coalesced": "yes"},
        {"layout": "csr", "size": [2, 2], "coalesced": True},
        "coo",
    ],
)
def test_a_malformed_sparse_recipe_is_corrupt_on_every_reader(tmp_path, recipe):
    def edit(body):
        parts = {"indices": {"$tensor": "s:indices"}, "values": {"$tensor": "s:values"}}
        body["tree"]["s"] = {"$sparse": {**parts, **recipe} if isinstance(recipe, dict) else recipe}

    path = _crafted(tmp_path, {"s": _matrix().to_sparse()}, edit)
    for reader in (tk.load, tk.load_state_dict, tk.describe):
        with pytest.raises(tk.CorruptCheckpointError, match=r"state tree is malformed: \$sparse"):
            reader(path)
    report = tk.verify(path)
    assert not report.ok and "state tree is malformed: $sparse" in report.problems[0]


def test_a_weights_file_that_lies_is_corrupt(tmp_path):
    path = tmp_path / "w"
    tk.save_weights({"q": quantized_tensors()["per_channel"], "i": torch.tensor([1])}, path)
    _edit(path, lambda b: b["tree"]["q"]["$quantized"].update(zero_points={"$tensor": "i"}))
    with pytest.raises(tk.CorruptCheckpointError, match="not as many zero points"):
        tk.load_state_dict(path)
    with pytest.raises(tk.CorruptCheckpointError, match="not as many zero points"):
        tk.load(path)
