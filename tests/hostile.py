"""A corpus of malformed and malicious files, generated on demand: safetensors headers, torchkeep
manifests and directories, and pickles. Each case names the error every reader must raise."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import torchkeep as tk
from conftest import SimpleNet
from torchkeep.container import WriteOptions, write_container
from torchkeep.format import body_checksum


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    error: type[tk.TorchkeepError]
    # The damage is in tensor bytes (indices, scales) that only a reader of the data sees:
    # describe, which reads none, lists the tensors.
    in_the_data: bool = False


# ---------------------------------------------------------------------------------------------
# pickles that would run code


class Evil:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def zip_with(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def _stack_global_payload(canary: str) -> bytes:
    command = f"touch {canary}".encode()
    return (
        b"\x80\x04"
        + b"\x8c\x05posix\x94"  # module name, memoised
        + b"\x8c\x06system\x94"  # function name, memoised
        + b"h\x00h\x01\x93"  # fetch both from the memo, STACK_GLOBAL
        + b"\x8c"
        + bytes([len(command)])
        + command
        + b"\x85R."
    )


def pickle_files(tmp_path, canary: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for protocol in range(6):
        files[f"reduce-protocol-{protocol}"] = pickle.dumps(Evil(canary), protocol=protocol)
    stack = _stack_global_payload(canary)
    files["stack-global-memo"] = stack
    files["payload-then-garbage"] = stack + b"garbage" * 10
    files["two-pickles"] = pickle.dumps({"w": 1}, protocol=2) + stack
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Evil(canary)}, buffer)
    files["torch-zip-calls-a-function"] = buffer.getvalue()
    legacy = io.BytesIO()
    torch.save({"evil": Evil(canary)}, legacy, _use_new_zipfile_serialization=False)
    files["torch-legacy-calls-a-function"] = legacy.getvalue()
    zipped = tmp_path / "zip-data-pkl.pt"
    zip_with(zipped, {"archive/data.pkl": stack, "archive/version": b"3\n"})
    files["zip-stack-global"] = zipped.read_bytes()
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(SimpleNet()), scripted)
    files["torchscript"] = scripted.read_bytes()
    bomb = tmp_path / "bomb.pt"
    zip_with(bomb, {"archive/data.pkl": b"\x80\x02N." + b"\x00" * (64 << 20)}, zipfile.ZIP_DEFLATED)
    files["deflated-zip-bomb"] = bomb.read_bytes()
    files["png-renamed"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    files["empty"] = b""
    files["plain-pickle-not-torch"] = pickle.dumps({"a": 1}, protocol=4)
    files.update(_scanner_samples(canary))
    return files


def _scanner_samples(canary: str) -> dict[str, bytes]:
    """The kinds of sample public pickle scanners test with, each touching ``canary``."""
    cmd = f"touch {canary}".encode()
    evil = pickle.dumps(Evil(canary), protocol=2)
    return {
        # INST and OBJ build an object by calling a class, or anything callable.
        "inst-opcode": b"(S'" + cmd + b"'\nios\nsystem\n.",
        "obj-opcode": b"(cos\nsystem\nS'" + cmd + b"'\no.",
        # getattr(__import__("os"), "system")(cmd): the callable is fetched, not named.
        "getattr-chain": b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'"
        + cmd
        + b"'\ntR.",
        # A pickle inside a pickle, unpickled by pickle.loads.
        "nested-pickle-loads": b"\x80\x02cpickle\nloads\nq\x00C"
        + bytes([len(evil)])
        + evil
        + b"\x85R.",
        "builtins-eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"" + cmd + b"\")'\ntR.",
        # EXT1: a callable from copyreg's extension registry, by number.
        "ext-opcode": b"\x80\x02\x82\x7f(S'" + cmd + b"'\ntR.",
        # BUILD on a class: its attributes changed for every later load.
        "build-on-a-global": b"\x80\x02ctorch\nTensor\n}S'__reduce_ex__'\ncos\nsystem\nsb.",
    }


def _zip_tensor(
    path: Path, storage_numel: int, size: tuple[int, ...], data: bytes, offset: int = 0
) -> None:
    """A torch zip holding one float tensor whose storage claims ``storage_numel`` elements."""

    class Saver(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is STORAGE:
                return ("storage", torch.FloatStorage, "0", "cpu", storage_numel)
            return None

    STORAGE = object()

    class Tensor:
        def __reduce__(self):
            import torch._utils

            stride = tuple(int(torch.tensor(size[i + 1 :]).prod()) for i in range(len(size)))
            return (torch._utils._rebuild_tensor_v2, (STORAGE, offset, size, stride, False, {}))

    buffer = io.BytesIO()
    Saver(buffer, protocol=2).dump({"w": Tensor()})
    zip_with(
        path,
        {"archive/data.pkl": buffer.getvalue(), "archive/data/0": data, "archive/version": b"3\n"},
    )


class Stored:
    """One storage of a crafted torch zip (``crafted_zip``): its type, say ``torch.LongStorage``,
    and its bytes; ``numel`` is what the pickle claims it holds (by default what it does)."""

    def __init__(self, kind: type, data: bytes, numel: int | None = None) -> None:
        self.kind, self.data, self.numel = kind, data, numel
        if numel is None:
            with warnings.catch_warnings():  # the legacy storage classes' dtype is deprecated
                warnings.simplefilter("ignore")
                self.numel = len(data) // kind.dtype.itemsize


class Call:
    """Pickled as ``function(*args)``: how a crafted pickle calls torch's rebuilding functions."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def stored_tensor(values: torch.Tensor, kind: type | None = None, **claims: object) -> Call:
    """``values`` as torch.save pickles a tensor: ``_rebuild_tensor_v2`` over a storage of its
    own; ``claims`` replace what the pickle says (``size``, ``stride``, ``offset``)."""
    import torch._utils

    kind = kind or {
        torch.float32: torch.FloatStorage,
        torch.float64: torch.DoubleStorage,
        torch.int64: torch.LongStorage,
        torch.int32: torch.IntStorage,
        torch.int8: torch.CharStorage,
        torch.uint8: torch.ByteStorage,
    }[values.dtype]
    storage = Stored(kind, values.contiguous().numpy().tobytes())
    size = claims.get("size", tuple(values.shape))
    stride = claims.get("stride", values.contiguous().stride())
    offset = claims.get("offset", 0)
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, {})


def crafted_zip(path: Path, obj: object) -> Path:
    """A torch zip whose pickle is ``obj``; each ``Stored`` in it is one of its storages."""
    keys: dict[int, tuple[str, Stored]] = {}

    class Saver(pickle.Pickler):
        def persistent_id(self, value):
            if not isinstance(value, Stored):
                return None
            key, _ = keys.setdefault(id(value), (str(len(keys)), value))
            return ("storage", value.kind, key, "cpu", value.numel)

    buffer = io.BytesIO()
    Saver(buffer, protocol=2).dump(obj)
    members = {"archive/data.pkl": buffer.getvalue(), "archive/version": b"3\n"}
    members.update({f"archive/data/{key}": stored.data for key, stored in keys.values()})
    zip_with(path, members)
    return path


def _sparse_and_quantized_cases(root: Path) -> list[Case]:
    """Sparse and quantized tensors whose parts lie about each other."""
    import torch._utils

    sparse, qtensor = torch._utils._rebuild_sparse_tensor, torch._utils._rebuild_qtensor
    indices = torch.tensor([[0, 1, 2], [1, 0, 2]])
    qint8 = Stored(torch.QInt8Storage, bytes(12))
    channels = {
        "scales": stored_tensor(torch.full((3,), 0.1, dtype=torch.float64)),
        "zero_points": stored_tensor(torch.zeros(3, dtype=torch.int64)),
    }
    cases = {
        "sparse-values-disagree-with-its-indices": Call(
            sparse, torch.sparse_coo, (stored_tensor(indices), stored_tensor(torch.ones(2)), (3, 3), True)
        ),
        "sparse-csr-size-disagrees-with-its-indices": Call(
            sparse,
            torch.sparse_csr,
            (
                stored_tensor(torch.tensor([0, 1, 2, 3])),
                stored_tensor(torch.tensor([0, 1, 2])),
                stored_tensor(torch.ones(3)),
                (1 << 40, 3),
            ),
        ),
        "quantized-scale-nan": Call(
            qtensor, qint8, 0, (3, 4), (4, 1), (torch.per_tensor_affine, float("nan"), 0), False, {}
        ),
        "quantized-zero-point-out-of-range": Call(
            qtensor, qint8, 0, (3, 4), (4, 1), (torch.per_tensor_affine, 0.1, 1 << 20), False, {}
        ),
        "quantized-axis-out-of-range": Call(
            qtensor,
            qint8,
            0,
            (3, 4),
            (4, 1),
            (torch.per_channel_affine, channels["scales"], channels["zero_points"], 2),
            False,
            {},
        ),
        "quantized-storage-claims-more-than-its-entry": Call(
            qtensor,
            Stored(torch.QInt8Storage, bytes(8), numel=12),
            0,
            (3, 4),
            (4, 1),
            (torch.per_tensor_affine, 0.1, 0),
            False,
            {},
        ),
    }
    in_the_data = {
        "sparse-index-beyond-its-size": Call(
            sparse,
            torch.sparse_coo,
            (stored_tensor(torch.tensor([[0, 1, 7], [1, 0, 2]])), stored_tensor(torch.ones(3)), (3, 3), False),
        ),
        "sparse-csr-compressed-indices-decreasing": Call(
            sparse,
            torch.sparse_csr,
            (
                stored_tensor(torch.tensor([0, 2, 1, 3])),
                stored_tensor(torch.tensor([0, 1, 2])),
                stored_tensor(torch.ones(3)),
                (3, 3),
            ),
        ),
        "quantized-per-channel-scales-infinite": Call(
            qtensor,
            qint8,
            0,
            (3, 4),
            (4, 1),
            (
                torch.per_channel_affine,
                stored_tensor(torch.tensor([0.1, float("inf"), 0.1], dtype=torch.float64)),
                channels["zero_points"],
                0,
            ),
            False,
            {},
        ),
    }
    return [
        Case(
            f"pickle:{name}",
            crafted_zip(root / f"{name}.pt", {"t": obj}),
            tk.CorruptCheckpointError,
            in_the_data=name in in_the_data,
        )
        for name, obj in {**cases, **in_the_data}.items()
    ]


# ---------------------------------------------------------------------------------------------
# safetensors headers


def _safetensors(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _spec(dtype: str = "F32", shape=(2, 2), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _header_cases() -> dict[str, tuple[bytes, type[tk.TorchkeepError]]]:
    corrupt = tk.CorruptCheckpointError
    unsupported = tk.UnsupportedFormatError
    data = bytes(16)
    good = {"w": _spec()}
    cases: dict[str, tuple[bytes, type[tk.TorchkeepError]]] = {
        "empty-file": (b"", corrupt),
        "shorter-than-the-prefix": (b"\x10\x00\x00", corrupt),
        "length-beyond-the-file": (_safetensors(good, data, length=1 << 20), corrupt),
        "length-2^64-1": (_safetensors(good, data, length=(1 << 64) - 1), corrupt),
        "length-zero": (_safetensors(good, data, length=0), corrupt),
        "header-not-utf8": (_safetensors(b'{"w": "\xff\xfe"}', data), corrupt),
        "header-truncated-json": (_safetensors(b'{"w": {"dtype": "F32", "sha', data), corrupt),
        "header-deeply-nested": (_safetensors(b"[" * 100_000 + b"]" * 100_000), corrupt),
        "header-nested-metadata": (
            _safetensors(b'{"__metadata__": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001, data),
            corrupt,
        ),
        "header-a-list": (_safetensors(b"[1, 2, 3]"), corrupt),
        "header-nan-literal": (
            _safetensors(b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', data),
            corrupt,
        ),
        "duplicate-keys": (
            _safetensors(
                b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                b'"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}',
                data,
            ),
            corrupt,
        ),
        "overlapping-offsets": (
            _safetensors({"a": _spec(offsets=(0, 16)), "b": _spec(offsets=(8, 24))}, bytes(24)),
            corrupt,
        ),
        "gap-between-tensors": (
            _safetensors({"a": _spec(offsets=(0, 16)), "b": _spec(offsets=(24, 40))}, bytes(40)),
            corrupt,
        ),
        "negative-offset": (_safetensors({"w": _spec(offsets=(-16, 0))}, data), corrupt),
        "offsets-reversed": (_safetensors({"w": _spec(offsets=(16, 0))}, data), corrupt),
        "offsets-not-a-pair": (_safetensors({"w": _spec(offsets=(0, 8, 16))}, data), corrupt),
        "size-disagrees-with-shape": (_safetensors({"w": _spec(offsets=(0, 12))}, bytes(12)), corrupt),
        "shape-overflow": (
            _safetensors({"w": _spec(shape=(1 << 62, 1 << 62, 0), offsets=(0, 0))}), corrupt
        ),
        "shape-claims-an-exabyte": (
            _safetensors({"w": _spec(shape=(1 << 30, 1 << 30), offsets=(0, 1 << 62))}), corrupt
        ),
        "negative-dim": (_safetensors({"w": _spec(shape=(-2, -2))}, data), corrupt),
        "float-dim": (_safetensors({"w": _spec(shape=(2.0, 2))}, data), corrupt),
        "bool-dim": (_safetensors({"w": _spec(shape=(True, 4), offsets=(0, 16))}, data), corrupt),
        "absurd-rank": (_safetensors({"w": _spec(shape=(1,) * 100_000, offsets=(0, 4))}, bytes(4)), corrupt),
        "unknown-dtype": (_safetensors({"w": _spec(dtype="F128")}, data), unsupported),
        "dtype-torch-lacks": (
            _safetensors({"w": _spec(dtype="F6_E2M3", shape=(4,), offsets=(0, 3))}, bytes(3)),
            unsupported,
        ),
        "dtype-not-a-string": (_safetensors({"w": _spec(dtype=7)}, data), corrupt),
        "dtype-name-a-megabyte": (_safetensors({"w": _spec(dtype="F" * (1 << 20))}, data), corrupt),
        "f4-half-a-byte": (_safetensors({"w": _spec(dtype="F4", shape=(3,), offsets=(0, 2))}, bytes(2)), corrupt),
        "f4-odd-last-dim": (
            _safetensors({"w": _spec(dtype="F4", shape=(2, 3), offsets=(0, 3))}, bytes(3)),
            unsupported,
        ),
        "f4-shape-claims-an-exabyte": (
            _safetensors({"w": _spec(dtype="F4", shape=(1 << 62, 1 << 4), offsets=(0, 1 << 65))}),
            corrupt,
        ),
        "spec-missing-fields": (_safetensors({"w": {"dtype": "F32"}}, data), corrupt),
        "spec-not-a-dict": (_safetensors({"w": [0, 16]}, data), corrupt),
        "trailing-bytes": (_safetensors(good, data + b"extra!!!"), corrupt),
        "missing-bytes": (_safetensors(good, data[:10]), corrupt),
        "metadata-not-strings": (_safetensors({"__metadata__": {"a": 1}, **good}, data), corrupt),
        "metadata-a-list": (_safetensors({"__metadata__": ["a"], **good}, data), corrupt),
        "big-endian-marker": (
            _safetensors({"__metadata__": {"torchkeep": "{"}, **good}, data), corrupt
        ),
    }
    return cases


# ---------------------------------------------------------------------------------------------
# torchkeep manifests and directories


def _saved_directory(root: Path, name: str) -> Path:
    path = root / name
    tk.save({"w": torch.arange(8.0), "b": torch.ones(3), "step": 1}, path)
    return path


def _shard(path: Path) -> Path:
    return next(p for p in path.iterdir() if p.name.startswith("shard-"))


def _compact(body: dict) -> str:
    """JSON text in the form torchkeep writes its manifests (a reader requires it exactly)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _signed(manifest: dict, edit: Callable[[dict], None]) -> dict:
    """``manifest`` edited, with its own checksum made to match again (as an attacker would),
    so that the edit itself must be caught."""
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    edit(body)
    return {**body, "manifest_checksum": body_checksum(body)}


def _edit_manifest(path: Path, edit: Callable[[dict], None], *, sign: bool = True) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    if sign:
        manifest = _signed(manifest, edit)
    else:
        edit(manifest)
    (path / "manifest.json").write_text(_compact(manifest))


def _tensor_entry(manifest: dict) -> dict:
    return manifest["tensors"]["w"]


def _directory_cases(root: Path) -> list[Case]:
    corrupt = tk.CorruptCheckpointError
    cases: list[tuple[str, Callable[[Path], None], type[tk.TorchkeepError]]] = []

    def case(name: str, error: type[tk.TorchkeepError] = corrupt):
        def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
            cases.append((name, fn, error))
            return fn

        return register

    @case("manifest-garbage")
    def _(p: Path) -> None:
        (p / "manifest.json").write_bytes(os.urandom(64) + b"\xff")

    @case("manifest-empty")
    def _(p: Path) -> None:
        (p / "manifest.json").write_bytes(b"")

    @case("manifest-deeply-nested")
    def _(p: Path) -> None:
        (p / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)

    @case("manifest-unknown-version", tk.UnsupportedFormatError)
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: m.update(format_version=999))

    @case("manifest-tensor-not-in-the-shard")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: m["tensors"].update(ghost=dict(m["tensors"]["w"])))

    @case("manifest-shard-path-dotdot")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(file="../outside.safetensors"))

    @case("manifest-shard-path-absolute")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(file="/etc/passwd"))

    @case("manifest-shard-path-not-a-string")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(file=["a"]))

    @case("shard-symlink-escaping")
    def _(p: Path) -> None:
        shard = _shard(p)
        outside = p.parent / f"{p.name}-outside.safetensors"
        shard.rename(outside)
        shard.symlink_to(outside)

    @case("manifest-symlink-escaping")
    def _(p: Path) -> None:
        outside = p.parent / f"{p.name}-manifest.json"
        (p / "manifest.json").rename(outside)
        (p / "manifest.json").symlink_to(outside)

    @case("shard-missing")
    def _(p: Path) -> None:
        _shard(p).unlink()

    @case("shards-of-two-saves")
    def _(p: Path) -> None:
        other = p.parent / f"{p.name}-other"
        tensors = {"w": torch.arange(8.0), "b": torch.ones(3)}
        write_container(str(other), tensors, kind="weights", options=WriteOptions(shard_bytes=16))
        shutil.rmtree(p)
        write_container(str(p), tensors, kind="weights", options=WriteOptions(shard_bytes=16))
        mine = sorted(q.name for q in p.iterdir() if q.name.startswith("shard-"))
        theirs = sorted(q for q in other.iterdir() if q.name.startswith("shard-"))
        shutil.copyfile(theirs[-1], p / mine[-1])

    @case("checksum-entry-missing")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).pop("checksum"))

    @case("checksum-unknown-algorithm", tk.UnsupportedFormatError)
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: m["checksum"].update(algorithm="md4"))

    @case("manifest-own-checksum-wrong")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(shape=[4, 2]), sign=False)

    @case("manifest-shape-disagrees-with-the-shard")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(shape=[4, 2]))

    @case("manifest-tree-names-a-missing-tensor")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: m["tree"].update(ghost={"$tensor": "ghost"}))

    @case("manifest-alias-to-nothing")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: m["aliases"].update(tied="ghost"))

    @case("manifest-huge-claim")
    def _(p: Path) -> None:
        _edit_manifest(p, lambda m: _tensor_entry(m).update(shape=[1 << 40], end=1 << 42))

    built = []
    for name, edit, error in cases:
        path = _saved_directory(root, name)
        edit(path)
        built.append(Case(f"dir:{name}", path, error))
    return built


def _single_file_manifest_cases(root: Path) -> list[Case]:
    """A single-file save whose embedded manifest was altered (the header stays valid JSON)."""
    path = root / "base.safetensors"
    tk.save({"w": torch.arange(8.0), "step": 1}, path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    manifest = json.loads(header["__metadata__"]["torchkeep"])
    cases = []

    def write(name: str, meta: dict, error: type[tk.TorchkeepError]) -> None:
        edited = dict(header, __metadata__=meta)
        target = root / f"{name}.safetensors"
        target.write_bytes(_safetensors(edited, data))
        cases.append(Case(f"file:{name}", target, error))

    write("embedded-manifest-garbage", {"format": "pt", "torchkeep": "{garbage"}, tk.CorruptCheckpointError)
    write(
        "embedded-manifest-newer",
        {"format": "pt", "torchkeep": json.dumps({**manifest, "format_version": 999})},
        tk.UnsupportedFormatError,
    )
    tree = _signed(manifest, lambda m: m.update(tree={"w": {"$tensor": "not-stored"}}))
    write("embedded-tree-names-a-missing-tensor", {"format": "pt", "torchkeep": _compact(tree)}, tk.CorruptCheckpointError)
    offsets = _signed(manifest, lambda m: m["tensors"]["w"].update(offsets=[0, 64]))
    write("embedded-offsets-beyond-the-data", {"format": "pt", "torchkeep": _compact(offsets)}, tk.CorruptCheckpointError)
    write("embedded-extra-metadata", {**header["__metadata__"], "extra": "x"}, tk.CorruptCheckpointError)
    return cases


# ---------------------------------------------------------------------------------------------
# the whole corpus


def corpus(root: Path, canary: str) -> list[Case]:
    """Every hostile case, written under ``root``; pickles that would run code touch ``canary``."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for name, (data, error) in _header_cases().items():
        path = root / f"{name}.safetensors"
        path.write_bytes(data)
        cases.append(Case(f"header:{name}", path, error))
    cases += _single_file_manifest_cases(root)
    cases += _directory_cases(root)
    not_torch = {
        "png-renamed": tk.CorruptCheckpointError,  # read as a safetensors file: its length
        "empty": tk.CorruptCheckpointError,
        "plain-pickle-not-torch": tk.UnsupportedFormatError,
        "deflated-zip-bomb": tk.UnsupportedFormatError,  # compressed records are refused
        "ext-opcode": tk.CorruptCheckpointError,  # no extension is registered: malformed
    }
    for name, data in pickle_files(root, canary).items():
        path = root / f"{name}.pt"
        path.write_bytes(data)
        cases.append(Case(f"pickle:{name}", path, not_torch.get(name, tk.UnsafeFileError)))
    huge = root / "storage-claims-2^40-floats.pt"
    _zip_tensor(huge, 1 << 40, (1 << 20, 1 << 20), bytes(16))
    cases.append(Case("pickle:storage-claims-2^40-floats", huge, tk.CorruptCheckpointError))
    view = root / "view-beyond-its-storage.pt"
    _zip_tensor(view, 4, (4,), bytes(16), offset=2)
    cases.append(Case("pickle:view-beyond-its-storage", view, tk.CorruptCheckpointError))
    # Found by fuzzing: a memo index of a billion makes the C unpickler fill a memo of that
    # size; a zip entry said to start before the file; a zip of an unknown version.
    memo = b"\x80\x02}q\x00r" + (1_275_750_499).to_bytes(4, "little") + b"."
    (root / "memo-index-of-a-billion.pt").write_bytes(memo)
    cases.append(Case("pickle:memo-index-of-a-billion", root / "memo-index-of-a-billion.pt", tk.CorruptCheckpointError))
    zipped_memo = root / "zip-memo-index-of-a-billion.pt"
    zip_with(zipped_memo, {"archive/data.pkl": memo, "archive/version": b"3\n"})
    cases.append(Case("pickle:zip-memo-index-of-a-billion", zipped_memo, tk.CorruptCheckpointError))
    # An INT line cut by a NUL byte: the reference parser refuses it, the C unpickler reads 0
    # and goes on to a memo index of 171 million.
    nul = b"\x80\x02}q\x00I" + b"\x00" * 8 + b"(X\x01\x00\x00\x00wq\x01ctorch._utils\nr_v2\nq\x00."
    (root / "int-line-cut-by-a-nul.pt").write_bytes(nul)
    cases.append(Case("pickle:int-line-cut-by-a-nul", root / "int-line-cut-by-a-nul.pt", tk.CorruptCheckpointError))
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer)
    whole = buffer.getvalue()
    middle = len(whole) // 2
    (root / "zip-entry-before-the-file.pt").write_bytes(whole[:middle] + whole[middle + 1 :])
    cases.append(Case("pickle:zip-entry-before-the-file", root / "zip-entry-before-the-file.pt", tk.CorruptCheckpointError))
    versioned = bytearray(whole)
    central = versioned.find(b"PK\x01\x02")
    versioned[central + 6 : central + 8] = (64).to_bytes(2, "little")  # needs zip 6.4
    (root / "zip-of-an-unknown-version.pt").write_bytes(bytes(versioned))
    cases.append(Case("pickle:zip-of-an-unknown-version", root / "zip-of-an-unknown-version.pt", tk.CorruptCheckpointError))
    expanded = root / "view-expanding-its-storage.pt"
    _zip_tensor(expanded, 4, (1 << 20, 1 << 20), bytes(16))
    cases.append(Case("pickle:view-expanding-its-storage", expanded, tk.UnsupportedFormatError))
    cases += _sparse_and_quantized_cases(root)
    return cases
