"""Every validation rule of the reader, proved with a malformed file made inside the test.

Each test builds a damaged safetensors file or checkpoint directory under ``tmp_path`` and checks
that ``tk.load`` and ``tk.load_state_dict`` raise the specific torchkeep error naming the file,
and that ``tk.verify`` reports the damage instead of raising.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import torchkeep as tk
from torchkeep.container import WriteOptions, write_container
from torchkeep.format import (
    MANIFEST_KEY,
    MAX_HEADER_BYTES,
    MAX_RANK,
    body_checksum,
    signed_manifest_text,
)

CORRUPT = tk.CorruptCheckpointError
UNSUPPORTED = tk.UnsupportedFormatError
LOADERS: tuple[Callable[[Any], Any], ...] = (tk.load, tk.load_state_dict)


# ---------------------------------------------------------------------------------------------
# helpers


def _pack(header: Any, data: bytes = b"", *, align: int = 64) -> bytes:
    """Return a safetensors file: the 8-byte length, the header, then ``data``.

    ``header`` is a JSON value (serialised here) or the raw header text as str or bytes. It is
    padded with spaces like ``encode_header`` does, so its length never starts with 0x80.
    """
    if isinstance(header, bytes):
        raw = header
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw + data


def _write(path: Path, header: Any, data: bytes = b"") -> Path:
    path.write_bytes(_pack(header, data))
    return path


def _spec(dtype: Any, shape: Any, offsets: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _a() -> dict[str, Any]:
    return _spec("F32", [2, 2], [0, 16])


def _b() -> dict[str, Any]:
    return _spec("I64", [3], [16, 40])


DATA = bytes(range(40))
A_TEXT = json.dumps(_a())
B_TEXT = json.dumps(_b())
GOOD_TEXT = json.dumps({"a": _a(), "b": _b()}, separators=(",", ":"))


def _assert_rejected(
    path: Path, error: type[Exception] = CORRUPT, *, match: str | None = None
) -> list[Exception]:
    """Both loaders raise ``error`` naming ``path``; ``verify`` reports it, naming ``path``."""
    raised = []
    for load in LOADERS:
        with pytest.raises(error, match=match) as info:
            load(path)
        assert str(path) in str(info.value), f"{load.__name__}: {info.value}"
        raised.append(info.value)
    report = tk.verify(path)
    assert not report.ok
    assert report.problems
    assert any(str(path) in problem for problem in report.problems), report.problems
    return raised


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    """Return a safetensors file's parsed header and its data bytes."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _compact(body: dict) -> str:
    """JSON text in the form torchkeep writes its manifests (a reader requires it exactly)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _reseal(body: dict[str, Any]) -> None:
    """Recompute a manifest's own checksum after an edit, so a later rule is what fails."""
    body.pop("manifest_checksum", None)
    body["manifest_checksum"] = body_checksum(body)


def _save_state(tmp_path: Path) -> Path:
    """A valid single-file torchkeep save with two float32 tensors and a little metadata."""
    path = tmp_path / "ckpt.safetensors"
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(4, 4), "b": torch.randn(4)}, "step": 7}
    tk.save(state, path, metadata={"note": "sentinel-0001"})
    return path


def _edit_manifest(
    path: Path, edit: Callable[[dict[str, Any]], None], *, reseal: bool = True
) -> Path:
    """Rewrite a single file with its manifest changed by ``edit`` (the data is kept)."""
    header, data = _split(path)
    body = json.loads(header["__metadata__"][MANIFEST_KEY])
    edit(body)
    if reseal:
        _reseal(body)
    header["__metadata__"][MANIFEST_KEY] = _compact(body)
    path.write_bytes(_pack(header, data))
    return path


def _set_manifest_text(path: Path, text: str) -> Path:
    header, data = _split(path)
    header["__metadata__"][MANIFEST_KEY] = text
    path.write_bytes(_pack(header, data))
    return path


def _save_dir(path: Path, seed: int = 0) -> Path:
    """A valid two-shard torchkeep directory: four 8×8 float32 tensors, two per shard."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(8, 8, generator=generator) for i in range(4)}
    write_container(str(path), tensors, kind="weights", options=WriteOptions(shard_bytes=512))
    assert sorted(os.listdir(path)) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    return path


def _edit_dir_manifest(
    path: Path, edit: Callable[[dict[str, Any]], None], *, reseal: bool = True
) -> Path:
    manifest = path / "manifest.json"
    body = json.loads(manifest.read_text())
    edit(body)
    if reseal:
        _reseal(body)
    manifest.write_text(_compact(body))
    return path


# ---------------------------------------------------------------------------------------------
# the baselines the malformed files are derived from are themselves accepted


def test_baseline_files_load(tmp_path):
    path = _write(tmp_path / "good.safetensors", {"a": _a(), "b": _b()}, DATA)
    loaded = tk.load(path)
    assert loaded["a"].shape == (2, 2)
    assert torch.equal(loaded["b"], torch.frombuffer(bytearray(DATA[16:]), dtype=torch.int64))
    assert set(tk.load_state_dict(path)) == {"a", "b"}
    assert tk.verify(path).ok

    # The largest rank allowed, reached with dims whose product keeps the span right.
    rank = _write(
        tmp_path / "rank.safetensors",
        {"a": _spec("F32", [1] * (MAX_RANK - 2) + [2, 2], [0, 16]), "b": _b()},
        DATA,
    )
    assert tk.load(rank)["a"].dim() == MAX_RANK

    saved = _save_state(tmp_path)
    assert tk.load(saved)["step"] == 7
    assert set(tk.load_state_dict(saved)) == {"w", "b"}
    assert tk.verify(saved).ok

    directory = _save_dir(tmp_path / "sharded")
    assert len(tk.load_state_dict(directory)) == 4
    assert tk.verify(directory).ok


def test_valid_header_whose_length_starts_with_0x80_is_not_taken_for_pickle(tmp_path):
    # A safetensors header of 384 bytes has the prefix 80 01 00 00 00 00 00 00. Such files are
    # valid (safetensors pads headers to 8 bytes only) and must not be refused as torch.save
    # pickles, whose first byte is also 0x80.
    raw = GOOD_TEXT.encode()
    raw += b" " * (0x180 - len(raw))
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + DATA)
    assert path.read_bytes()[:1] == b"\x80"
    assert set(safetensors.torch.load_file(path)) == {"a", "b"}  # the reference reader agrees

    assert set(tk.load(path)) == {"a", "b"}
    assert set(tk.load_state_dict(path)) == {"a", "b"}
    assert tk.verify(path).ok


# ---------------------------------------------------------------------------------------------
# the length prefix


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00", b"\x10\x00\x00\x00\x00\x00\x00"],
    ids=["empty", "one-byte", "seven-bytes"],
)
def test_file_shorter_than_the_length_prefix(tmp_path, blob):
    path = tmp_path / "short.safetensors"
    path.write_bytes(blob)
    _assert_rejected(path, match="too short")


@pytest.mark.parametrize(
    "length",
    [len(GOOD_TEXT) + 100, 1 << 20, MAX_HEADER_BYTES, 2**64 - 1],
    ids=["just-beyond", "one-mib", "at-the-cap", "2**64-1"],
)
def test_length_prefix_beyond_the_file(tmp_path, length):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", length) + GOOD_TEXT.encode() + DATA)
    _assert_rejected(path)


def test_header_length_of_zero(tmp_path):
    path = tmp_path / "zero.safetensors"
    path.write_bytes(struct.pack("<Q", 0) + DATA)
    _assert_rejected(path)


def test_header_over_the_size_cap_is_refused_before_reading_it(tmp_path):
    # The file really is large enough to hold the claimed header (sparse, so it costs nothing):
    # only the cap can refuse it, and it must do so without reading 100 MiB.
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(8 + MAX_HEADER_BYTES + 64)
    tracemalloc.start()
    try:
        _assert_rejected(path, match="limit")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ---------------------------------------------------------------------------------------------
# the header's JSON


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"a\xff":1}', id="not-utf8"),
        pytest.param(b'{"a":{"dtype":"F32"\xc3\x28}}', id="bad-utf8-sequence"),
        pytest.param(GOOD_TEXT[:-5], id="truncated-json"),
        pytest.param(GOOD_TEXT + "}", id="trailing-brace"),
        pytest.param("", id="empty-text"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="100000-nested-lists"),
        pytest.param(_nested(100_000), id="100000-nested-objects"),
        pytest.param("[]", id="list-not-object"),
        pytest.param('"header"', id="string-not-object"),
        pytest.param("null", id="null-not-object"),
        pytest.param("42", id="number-not-object"),
    ],
)
def test_malformed_header_json(tmp_path, raw):
    path = _write(tmp_path / "bad.safetensors", raw, DATA)
    _assert_rejected(path)


@pytest.mark.parametrize(
    "raw",
    [
        # json.loads would keep the last value of each: only the duplicate check refuses these.
        pytest.param(
            '{"a":' + A_TEXT + ',"a":' + A_TEXT + ',"b":' + B_TEXT + "}", id="tensor-name"
        ),
        pytest.param(
            '{"a":{"dtype":"I64","dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":'
            + B_TEXT
            + "}",
            id="field-of-a-tensor",
        ),
        pytest.param(
            '{"__metadata__":{"k":"x","k":"y"},"a":' + A_TEXT + ',"b":' + B_TEXT + "}",
            id="metadata-key",
        ),
        pytest.param(
            '{"__metadata__":{},"__metadata__":{},"a":' + A_TEXT + ',"b":' + B_TEXT + "}",
            id="metadata-entry",
        ),
    ],
)
def test_duplicate_keys(tmp_path, raw):
    path = _write(tmp_path / "dup.safetensors", raw, DATA)
    (error, _) = _assert_rejected(path, match="duplicate")
    assert "duplicate" in str(error)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}}', id="NaN"),
        pytest.param('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}}', id="inf"),
        pytest.param(
            '{"a":{"dtype":"F32","shape":[1' + "0" * 5000 + '],"data_offsets":[0,16]}}',
            id="5000-digit-integer",
        ),
    ],
)
def test_json_literals_python_parses_specially(tmp_path, raw):
    path = _write(tmp_path / "literal.safetensors", raw, DATA[:16])
    _assert_rejected(path)


# ---------------------------------------------------------------------------------------------
# tensor entries


def _header_case(a: Any = None, b: Any = None, data: bytes = DATA, **extra: Any) -> Any:
    header = {"a": _a() if a is None else a, "b": _b() if b is None else b, **extra}
    return (header, data)


TENSOR_CASES = [
    pytest.param(*_header_case(a=_spec(4, [2, 2], [0, 16])), id="dtype-not-a-string"),
    pytest.param(*_header_case(a=_spec("F32", [-2, -2], [0, 16])), id="negative-dims"),
    pytest.param(*_header_case(a=_spec("F32", [2.0, 2], [0, 16])), id="float-dim"),
    pytest.param(*_header_case(a=_spec("F32", [True, 4], [0, 16])), id="bool-dim"),
    pytest.param(*_header_case(a=_spec("F32", ["2", 2], [0, 16])), id="string-dim"),
    pytest.param(*_header_case(a=_spec("F32", [None, 4], [0, 16])), id="null-dim"),
    pytest.param(*_header_case(a=_spec("F32", 4, [0, 16])), id="shape-not-a-list"),
    pytest.param(
        *_header_case(a=_spec("F32", [1] * (MAX_RANK - 1) + [2, 2], [0, 16])),
        id="rank-over-64",
    ),
    pytest.param(*_header_case(a=_spec("F32", [1] * 100_000, [0, 4])), id="rank-100000"),
    pytest.param(*_header_case(a=_spec("F32", [2, 3], [0, 16])), id="shape-bigger-than-span"),
    pytest.param(*_header_case(a=_spec("F32", [3], [0, 16])), id="shape-smaller-than-span"),
    pytest.param(*_header_case(a=_spec("F16", [2, 2], [0, 16])), id="itemsize-mismatch"),
    pytest.param(*_header_case(b=_spec("I64", [3], [8, 32]), data=DATA[:32]), id="overlap"),
    pytest.param(*_header_case(b=_spec("I64", [3], [0, 24]), data=DATA[:24]), id="same-begin"),
    pytest.param(*_header_case(b=_spec("I64", [3], [24, 48]), data=DATA + bytes(8)), id="gap"),
    pytest.param(
        *_header_case(a=_spec("F32", [2, 2], [8, 24]), b=_spec("I64", [2], [24, 40])),
        id="gap-at-start",
    ),
    pytest.param(
        *_header_case(a=_spec("F32", [2, 2], [-16, 0]), b=_spec("I64", [3], [0, 24])),
        id="negative-offsets",
    ),
    pytest.param(
        *_header_case(a=_spec("F32", [2, 2], [16, 0]), b=_spec("I64", [2], [0, 16])),
        id="begin-after-end",
    ),
    pytest.param(*_header_case(a=_spec("F32", [2, 2], [0.0, 16.0])), id="float-offsets"),
    pytest.param(*_header_case(a=_spec("F32", [2, 2], [0, 16, 16])), id="three-offsets"),
    pytest.param(*_header_case(a=_spec("F32", [2, 2], [16])), id="one-offset"),
    pytest.param(*_header_case(a=_spec("F32", [2, 2], [False, 16])), id="bool-offset"),
    pytest.param(*_header_case(a=_spec("F32", [2, 2], {"0": 16})), id="offsets-not-a-list"),
    pytest.param(*_header_case(data=DATA + b"\x00"), id="one-trailing-byte"),
    pytest.param(*_header_case(data=DATA + bytes(4096)), id="trailing-page"),
    pytest.param(*_header_case(data=DATA[:-1]), id="one-byte-missing"),
    pytest.param(*_header_case(data=DATA[:16]), id="last-tensor-missing"),
    pytest.param(*_header_case(data=b""), id="no-data"),
    pytest.param(*_header_case(a={**_a(), "extra": 1}), id="extra-field"),
    pytest.param(*_header_case(a={**_a(), "checksum": "0" * 16}), id="extra-checksum-field"),
    pytest.param(*_header_case(a={"dtype": "F32", "shape": [2, 2]}), id="missing-offsets"),
    pytest.param(*_header_case(a={"dtype": "F32", "data_offsets": [0, 16]}), id="missing-shape"),
    pytest.param(*_header_case(a={"shape": [2, 2], "data_offsets": [0, 16]}), id="missing-dtype"),
    pytest.param(*_header_case(a=["F32", [2, 2], [0, 16]]), id="entry-not-an-object"),
    pytest.param(*_header_case(a="F32"), id="entry-a-string"),
    pytest.param(*_header_case(__metadata__={"k": 1}), id="metadata-int-value"),
    pytest.param(*_header_case(__metadata__={"k": None}), id="metadata-null-value"),
    pytest.param(*_header_case(__metadata__={"k": True}), id="metadata-bool-value"),
    pytest.param(*_header_case(__metadata__={"k": {"x": "y"}}), id="metadata-object-value"),
    pytest.param(*_header_case(__metadata__={"k": ["x"]}), id="metadata-list-value"),
    pytest.param(*_header_case(__metadata__="text"), id="metadata-a-string"),
    pytest.param(*_header_case(__metadata__=["k", "v"]), id="metadata-a-list"),
    pytest.param(*_header_case(__metadata__={"torchkeep": 1}), id="manifest-not-a-string"),
]


@pytest.mark.parametrize(("header", "data"), TENSOR_CASES)
def test_malformed_tensor_entry(tmp_path, header, data):
    path = _write(tmp_path / "bad.safetensors", header, data)
    _assert_rejected(path)


@pytest.mark.parametrize("dtype", ["F31", "float32", "f32"])
def test_a_dtype_name_torchkeep_does_not_know_is_unsupported_not_corrupt(tmp_path, dtype):
    path = _write(tmp_path / "bad.safetensors", *_header_case(a=_spec(dtype, [2, 2], [0, 16])))
    _assert_rejected(path, UNSUPPORTED, match=f"tensor 'a' has dtype '{dtype}'")


def test_error_names_the_offending_tensor(tmp_path):
    path = _write(
        tmp_path / "bad.safetensors", *_header_case(b=_spec("I64", [3], [16, 48]), data=DATA)
    )
    for error in _assert_rejected(path):
        assert "'b'" in str(error)
    path = _write(tmp_path / "dtype.safetensors", *_header_case(a=_spec("Q8", [16], [0, 16])))
    for error in _assert_rejected(path, UNSUPPORTED):
        assert "'a'" in str(error) and "Q8" in str(error)


@pytest.mark.parametrize(
    "shape",
    [[2**62, 2**62, 0], [2**63, 0], [2**64, 0], [0, 2**70]],
    ids=["product-overflows-int64", "dim-2**63", "dim-2**64", "dim-2**70"],
)
def test_empty_tensor_with_dims_torch_cannot_represent(tmp_path, shape):
    # Zero elements, so the span [16, 16] is right; but no torch tensor has these dims.
    header = {"a": _a(), "e": _spec("U8", shape, [16, 16]), "b": _b()}
    path = _write(tmp_path / "dims.safetensors", header, DATA)
    _assert_rejected(path)


# ---------------------------------------------------------------------------------------------
# torch.save files


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "model"])
def test_torch_save_file_is_read_by_content_not_name(tmp_path, zipfile, name):
    path = tmp_path / name
    w = torch.randn(4, 4)
    torch.save({"w": w}, path, _use_new_zipfile_serialization=zipfile)
    assert torch.equal(tk.load(path)["w"], w)
    assert torch.equal(tk.load_state_dict(path)["w"], w)
    assert tk.verify(path).ok


# ---------------------------------------------------------------------------------------------
# the torchkeep manifest inside a single file


def test_manifest_checksum_mismatch_from_an_in_place_edit(tmp_path):
    # One character of the metadata changes; the header keeps its length and stays valid JSON.
    path = _save_state(tmp_path)
    blob = path.read_bytes()
    assert blob.count(b"sentinel-0001") == 1
    path.write_bytes(blob.replace(b"sentinel-0001", b"sentinel-0002"))
    _assert_rejected(path, match="checksum")


def test_manifest_checksum_itself_edited(tmp_path):
    path = _save_state(tmp_path)

    def edit(body: dict[str, Any]) -> None:
        digit = body["manifest_checksum"][0]
        body["manifest_checksum"] = ("1" if digit == "0" else "0") + body["manifest_checksum"][1:]

    _edit_manifest(path, edit, reseal=False)
    _assert_rejected(path, match="checksum")


def test_manifest_edit_without_reseal(tmp_path):
    path = _edit_manifest(
        _save_state(tmp_path), lambda body: body.update(kind="weights"), reseal=False
    )
    _assert_rejected(path, match="checksum")


def test_manifest_checksum_removed(tmp_path):
    path = _edit_manifest(
        _save_state(tmp_path), lambda body: body.pop("manifest_checksum"), reseal=False
    )
    _assert_rejected(path, match="checksum")


@pytest.mark.parametrize(
    "text",
    ["not json {", "", "{", "[]", "null", '{"format":"torchkeep"', _nested(50_000)],
    ids=["garbage", "empty", "open-brace", "list", "null", "truncated", "deep"],
)
def test_garbage_manifest_text(tmp_path, text):
    path = _set_manifest_text(_save_state(tmp_path), text)
    _assert_rejected(path)


def test_manifest_of_another_format(tmp_path):
    path = _edit_manifest(_save_state(tmp_path), lambda body: body.update(format="other"))
    _assert_rejected(path, match="not a torchkeep manifest")


def test_manifest_from_a_newer_format_version(tmp_path):
    path = _edit_manifest(_save_state(tmp_path), lambda body: body.update(format_version=999))
    errors = _assert_rejected(path, UNSUPPORTED, match="999")
    assert "upgrade" in str(errors[0]).lower()


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_manifest_with_an_invalid_format_version(tmp_path, version):
    path = _edit_manifest(_save_state(tmp_path), lambda body: body.update(format_version=version))
    _assert_rejected(path, match="format_version")


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "I32"), ("shape", [16]), ("shape", [4, 2, 2]), ("offsets", [64, 128])],
)
def test_manifest_entry_differs_from_the_header(tmp_path, field, value):
    # Each edited entry is valid on its own (its span matches its shape): only the comparison
    # with the header refuses it.
    def edit(body: dict[str, Any]) -> None:
        entry = body["tensors"]["model.w"]
        if field == "offsets":
            entry["offsets"] = [entry["offsets"][0] + 16, entry["offsets"][1] + 16]
        else:
            entry[field] = value

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="manifest")


def test_manifest_lacks_a_tensor_the_header_holds(tmp_path):
    def edit(body: dict[str, Any]) -> None:
        del body["tensors"]["model.b"]
        body["tree"]["model"]["b"] = 0  # the tree no longer refers to it either

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="do not match its manifest")


def test_manifest_holds_a_tensor_the_header_lacks(tmp_path):
    def edit(body: dict[str, Any]) -> None:
        body["tensors"]["ghost"] = {**body["tensors"]["model.b"]}

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="do not match its manifest")


def test_manifest_entry_naming_a_file_inside_a_single_file(tmp_path):
    def edit(body: dict[str, Any]) -> None:
        body["tensors"]["model.w"]["file"] = "shard-00000.safetensors"

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path)


@pytest.mark.parametrize(
    "checksum",
    [
        {"algorithm": "md5", "chunk_bytes": 16 << 20},
        {"algorithm": "crc32c", "chunk_bytes": 16 << 20},
        {"chunk_bytes": 16 << 20},
        "xxh3_64",
        None,
    ],
    ids=["md5", "crc32c", "no-algorithm", "a-string", "null"],
)
def test_unknown_checksum_algorithm(tmp_path, checksum):
    path = _edit_manifest(_save_state(tmp_path), lambda body: body.update(checksum=checksum))
    _assert_rejected(path, UNSUPPORTED, match="checksum algorithm")


@pytest.mark.parametrize("chunk", [0, 4095, -1, "16", 1.5, None, True])
def test_invalid_checksum_chunk_size(tmp_path, chunk):
    def edit(body: dict[str, Any]) -> None:
        body["checksum"]["chunk_bytes"] = chunk

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="chunk")


@pytest.mark.parametrize(
    "value",
    [pytest.param(None, id="missing"), "", "abc", 1234, "0" * 15, "0" * 17],
)
def test_missing_or_malformed_tensor_checksum(tmp_path, value):
    def edit(body: dict[str, Any]) -> None:
        entry = body["tensors"]["model.w"]
        if value is None:
            del entry["checksum"]
        else:
            entry["checksum"] = value

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="checksum")


def test_tensor_checksum_that_does_not_match_the_data(tmp_path):
    def edit(body: dict[str, Any]) -> None:
        old = body["tensors"]["model.w"]["checksum"]
        body["tensors"]["model.w"]["checksum"] = ("1" if old[0] == "0" else "0") + old[1:]

    path = _edit_manifest(_save_state(tmp_path), edit)
    errors = _assert_rejected(path, match="model.w")
    assert "checksum" in str(errors[0])
    assert any("model.w" in p for p in tk.verify(path).problems)


@pytest.mark.parametrize(
    "table",
    [{"tensors": []}, {"tensors": None}, {"aliases": []}, {"aliases": None}],
    ids=["tensors-list", "tensors-null", "aliases-list", "aliases-null"],
)
def test_manifest_tables_of_the_wrong_type(tmp_path, table):
    path = _edit_manifest(_save_state(tmp_path), lambda body: body.update(table))
    _assert_rejected(path)


def test_alias_to_a_tensor_the_manifest_lacks(tmp_path):
    path = _edit_manifest(
        _save_state(tmp_path), lambda body: body["aliases"].update({"model.v": "nowhere"})
    )
    _assert_rejected(path, match="alias")


def test_tree_refers_to_a_tensor_the_manifest_lacks(tmp_path):
    def edit(body: dict[str, Any]) -> None:
        body["tree"]["model"]["w"] = {"$tensor": "nowhere"}

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path, match="nowhere")


@pytest.mark.parametrize(
    "node",
    [
        {"$tensor": 5},
        {"$tensor": ["model.w"]},
        {"$bytes": 5},
        {"$bytes": "abc"},
        {"$float": "abc"},
        {"$device": "nope"},
        {"$dtype": "nope"},
        {"$dtype": "Tensor"},
        {"$dict": 5},
        {"$dict": [[1]]},
        {"$dict": [[{"a": 1}, 2]]},
        {"$tuple": 5},
        {"$size": ["a"]},
    ],
    ids=lambda node: json.dumps(node),
)
def test_malformed_typed_value_in_the_tree(tmp_path, node):
    # The manifest is sealed with a valid checksum: only validating the tree can refuse it.
    def edit(body: dict[str, Any]) -> None:
        body["tree"]["step"] = node

    path = _edit_manifest(_save_state(tmp_path), edit)
    _assert_rejected(path)


def test_tree_nested_deeper_than_the_reader_can_decode(tmp_path):
    # json.loads accepts these depths; decoding must not then die of RecursionError.
    path = _save_state(tmp_path)
    for depth in (400, 500, 600, 700, 800, 900):
        value: Any = 1
        for _ in range(depth):
            value = [value]
        saved = path.read_bytes()
        _edit_manifest(path, lambda body, value=value: body["tree"].update(step=value))
        try:
            state = tk.load(path)
        except tk.CorruptCheckpointError as e:
            assert str(path) in str(e)
        else:
            assert state["step"] == value, depth
        path.write_bytes(saved)


def test_manifest_entry_not_an_object(tmp_path):
    path = _edit_manifest(
        _save_state(tmp_path), lambda body: body["tensors"].update({"model.w": "F32"})
    )
    _assert_rejected(path)


# ---------------------------------------------------------------------------------------------
# directories


def test_directory_without_manifest_never_committed(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    (path / "manifest.json").unlink()
    _assert_rejected(path, tk.IncompleteCheckpointError, match="manifest.json")


def test_empty_directory_is_incomplete(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    _assert_rejected(path, tk.IncompleteCheckpointError)


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../shard-00000.safetensors",
        "../../etc/passwd",
        "/etc/passwd",
        "sub/shard-00000.safetensors",
        "shard-00000.safetensors/",
        "..\\shard-00000.safetensors",
        "shard\x00.safetensors",
        "",
        5,
    ],
)
def test_manifest_naming_a_file_outside_the_directory(tmp_path, name):
    path = _save_dir(tmp_path / "ckpt")
    # A valid shard sits where the escaping names point, so only the name check can refuse them.
    (path / "sub").mkdir()
    shutil.copy(path / "shard-00000.safetensors", path / "sub" / "shard-00000.safetensors")
    shutil.copy(path / "shard-00000.safetensors", tmp_path / "shard-00000.safetensors")

    def edit(body: dict[str, Any]) -> None:
        for entry in body["tensors"].values():
            if entry["file"] == "shard-00000.safetensors":
                entry["file"] = name

    _edit_dir_manifest(path, edit)
    _assert_rejected(path, match="outside the checkpoint directory")


def test_missing_shard_file(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    (path / "shard-00001.safetensors").unlink()
    errors = _assert_rejected(path)
    assert "shard-00001.safetensors" in str(errors[0])


def test_shard_that_is_a_directory(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    (path / "shard-00001.safetensors").unlink()
    (path / "shard-00001.safetensors").mkdir()
    _assert_rejected(path)


def test_shard_from_another_save_with_the_same_layout(tmp_path):
    path = _save_dir(tmp_path / "ckpt", seed=0)
    other = _save_dir(tmp_path / "other", seed=1)
    shutil.copy(other / "shard-00001.safetensors", path / "shard-00001.safetensors")
    _assert_rejected(path, match="comes from another save")
    # A manifest without the save's id (as written before it was recorded): the shards must
    # still agree among themselves.
    manifest = json.loads((path / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k not in ("manifest_checksum", "save_id")}
    (path / "manifest.json").write_text(signed_manifest_text(body))
    _assert_rejected(path, match="different saves")


def test_all_shards_from_another_save(tmp_path):
    path = _save_dir(tmp_path / "ckpt", seed=0)
    other = _save_dir(tmp_path / "other", seed=1)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors"):
        shutil.copy(other / name, path / name)
    _assert_rejected(path, match="comes from another save")


def test_an_invalid_save_id_in_the_manifest(tmp_path):
    path = _save_dir(tmp_path / "ckpt", seed=0)
    manifest = json.loads((path / "manifest.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    body["save_id"] = "../not-an-id"
    (path / "manifest.json").write_text(signed_manifest_text(body))
    _assert_rejected(path, match="save_id")


def test_directory_manifest_not_utf8(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    (path / "manifest.json").write_bytes(b'{"format":"torchkeep\xff"}')
    _assert_rejected(path, match="UTF-8")


@pytest.mark.parametrize("text", ["", "not json", "{", "[]", '{"a":1,"a":1}'])
def test_directory_manifest_garbage(tmp_path, text):
    path = _save_dir(tmp_path / "ckpt")
    (path / "manifest.json").write_text(text)
    _assert_rejected(path)


def test_directory_manifest_checksum_mismatch(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    _edit_dir_manifest(path, lambda body: body.update(created="2000-01-01T00:00:00Z"), reseal=False)
    _assert_rejected(path, match="checksum")


def test_directory_manifest_from_a_newer_format_version(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    _edit_dir_manifest(path, lambda body: body.update(format_version=999))
    errors = _assert_rejected(path, UNSUPPORTED)
    assert "upgrade" in str(errors[0]).lower()


def test_directory_entry_naming_no_shard(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    _edit_dir_manifest(path, lambda body: body["tensors"]["layer0.weight"].pop("file"))
    _assert_rejected(path)


def test_directory_shard_differs_from_the_manifest(tmp_path):
    path = _save_dir(tmp_path / "ckpt")

    def edit(body: dict[str, Any]) -> None:
        body["tensors"]["layer3.weight"]["shape"] = [64]

    _edit_dir_manifest(path, edit)
    errors = _assert_rejected(path, match="shard-00001")
    assert "layer3.weight" in str(errors[0])


def test_directory_shard_bit_rot_names_the_shard_and_tensor(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    shard = path / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    errors = _assert_rejected(path, match="shard-00001")
    assert "checksum" in str(errors[0])
    problems = tk.verify(path).problems
    assert len(problems) == 1 and "shard-00001" in problems[0]


def test_directory_shard_truncated(tmp_path):
    path = _save_dir(tmp_path / "ckpt")
    shard = path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    _assert_rejected(path, match="shard-00000")


@pytest.mark.parametrize("name", ["missing.safetensors", "missing", "missing/"])
def test_nonexistent_path(tmp_path, name):
    path = os.path.join(tmp_path, name)
    for load in (*LOADERS, tk.verify):
        with pytest.raises(tk.CheckpointNotFoundError) as info:
            load(path)
        assert isinstance(info.value, FileNotFoundError)
        assert path.rstrip("/") in str(info.value)
    with pytest.raises(FileNotFoundError):
        tk.load(Path(path))


# ---------------------------------------------------------------------------------------------
# bit rot and truncation over the whole file


def _rot_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A weights file of several dtypes, a few KB, with a header of well over 600 bytes."""
    generator = torch.Generator().manual_seed(0)
    state = {
        "encoder.weight": torch.randn(24, 24, generator=generator),
        "encoder.bias": torch.randn(24, generator=generator),
        "embed.weight": torch.randn(32, 8, generator=generator).to(torch.bfloat16),
        "head.weight": torch.randn(8, 8, generator=generator).half(),
        "positions": torch.arange(40),
        "mask": torch.rand(64, generator=generator) > 0.5,
        "scale": torch.tensor(0.5, dtype=torch.float64),
    }
    path = tmp_path / "weights.safetensors"
    tk.save_weights(state, path)
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    assert length > 600 and len(blob) > 4000
    return path, blob


def _undetected(path: Path) -> list[str]:
    """Return what each reader did wrong with the damaged file at ``path`` (nothing: [])."""
    wrong = []
    for load in LOADERS:
        try:
            load(path)
        except tk.TorchkeepError:
            pass
        except Exception as e:
            wrong.append(f"{load.__name__} raised {type(e).__name__}: {e}")
        else:
            wrong.append(f"{load.__name__} returned data")
    try:
        if tk.verify(path).ok:
            wrong.append("verify said ok")
    except Exception as e:
        wrong.append(f"verify raised {type(e).__name__}: {e}")
    return wrong


def _flips_undetected(path: Path, original: bytes, positions: list[int], mask: int) -> list[str]:
    """Flip ``mask`` into each position in turn (restoring it after); report the misses."""
    failures = []
    with open(path, "r+b", buffering=0) as f:
        for position in positions:
            f.seek(position)
            f.write(bytes([original[position] ^ mask]))
            wrong = _undetected(path)
            f.seek(position)
            f.write(original[position : position + 1])
            if wrong:
                context = original[max(0, position - 12) : position + 12]
                failures.append(f"byte {position} (near {context!r}): {'; '.join(wrong)}")
    assert path.read_bytes() == original
    return failures


def _spread(size: int, first: int, count: int) -> list[int]:
    """Every position below ``first``, then ``count`` evenly spaced ones up to ``size - 1``."""
    rest = [first + (size - 1 - first) * i // (count - 1) for i in range(count)]
    return sorted(set(range(min(first, size))) | set(rest))


def test_every_flipped_byte_is_detected(tmp_path):
    path, original = _rot_file(tmp_path)
    positions = _spread(len(original), 600, 200)
    assert len(positions) == 800 and positions[-1] == len(original) - 1
    failures = _flips_undetected(path, original, positions, 0xFF)
    assert not failures, "\n".join(failures)


def test_every_single_bit_flip_in_the_header_is_detected(tmp_path):
    # Subtler than xor 0xFF: a one-bit change keeps ASCII ASCII, so the header stays valid UTF-8
    # and often valid JSON (a digit becomes another digit, a letter another letter).
    path, original = _rot_file(tmp_path)
    (length,) = struct.unpack("<Q", original[:8])
    failures = _flips_undetected(path, original, list(range(8 + length)), 0x01)
    assert not failures, "\n".join(failures)


def test_every_truncation_is_detected(tmp_path):
    path, original = _rot_file(tmp_path)
    failures = []
    with open(path, "r+b", buffering=0) as f:
        for length in _spread(len(original), 80, 160):
            if length == len(original):
                continue
            f.truncate(length)
            wrong = _undetected(path)
            f.seek(length)
            f.write(original[length:])
            if wrong:
                failures.append(f"truncated to {length}: {'; '.join(wrong)}")
    assert path.read_bytes() == original
    assert not failures, "\n".join(failures)


def test_appended_bytes_are_detected(tmp_path):
    path, original = _rot_file(tmp_path)
    for extra in (b"\x00", b" ", bytes(64), original):
        path.write_bytes(original + extra)
        assert _undetected(path) == []


# ---------------------------------------------------------------------------------------------
# claims of huge sizes fail at once, without allocating what they claim


HUGE_CASES = [
    pytest.param(struct.pack("<Q", 2**64 - 1) + b"{}      ", id="length-2**64-1"),
    pytest.param(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}      ", id="length-at-cap"),
    pytest.param(_pack({"a": _spec("F32", [2**40], [0, 2**42])}, bytes(16)), id="2**40-elements"),
    pytest.param(
        _pack({"a": _spec("F32", [2**40], [0, 16])}, bytes(16)), id="2**40-elements-small-span"
    ),
    pytest.param(
        _pack({"a": _spec("F64", [2**32] * 3, [0, 2**99])}, bytes(16)), id="2**96-elements"
    ),
    pytest.param(
        _pack({f"t{i}": _spec("U8", [2**30], [i << 30, (i + 1) << 30]) for i in range(64)}),
        id="64-tensors-of-1-gib",
    ),
]


@pytest.mark.parametrize("blob", HUGE_CASES)
def test_huge_claims_fail_fast_without_allocating(tmp_path, blob):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(blob)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        _assert_rejected(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 16 << 20


def test_huge_claim_in_a_manifest_fails_fast(tmp_path):
    path = _save_state(tmp_path)

    def edit(body: dict[str, Any]) -> None:
        body["tensors"]["model.w"]["shape"] = [2**40]
        body["tensors"]["model.w"]["offsets"] = [0, 2**42]

    _edit_manifest(path, edit)
    started = time.perf_counter()
    _assert_rejected(path)
    assert time.perf_counter() - started < 2.0


def test_a_manifest_changed_without_changing_its_values_is_refused(tmp_path):
    """One bit flipped in ``1e-05`` gives ``1E-05``: the same float, other bytes. The manifest
    is checked byte for byte, not only its parsed values, so this is corruption too."""
    path = tmp_path / "ckpt"
    tk.save({"w": torch.ones(2), "lr": 1e-05}, path)
    manifest = path / "manifest.json"
    text = manifest.read_text()
    assert text.count("1e-05") == 1
    manifest.write_text(text.replace("1e-05", "1E-05"))
    assert json.loads(manifest.read_text()) == json.loads(text)
    _assert_rejected(path, match="does not match its checksum")


def test_a_signed_manifest_with_an_out_of_range_number_is_corrupt(tmp_path):
    """``1e400`` parses as infinity, which torchkeep never writes: refused as corrupt, even with
    a checksum made to match, never a ValueError."""
    path = tmp_path / "ckpt"
    tk.save({"w": torch.ones(2), "lr": 0.5}, path)
    manifest = path / "manifest.json"
    body = json.loads(manifest.read_text())
    body.pop("manifest_checksum")
    text = _compact({**body, "manifest_checksum": body_checksum({**body, "extra": float("inf")})})
    manifest.write_text(text.replace('"manifest_checksum"', '"extra":1e400,"manifest_checksum"'))
    _assert_rejected(path, match="does not match its checksum")


def test_one_tiling_check_for_every_chunked_tensor():
    from torchkeep.format import tiles

    halves = [((0, 0), (2, 4)), ((2, 0), (2, 4))]
    assert tiles((4, 4), halves)
    assert tiles((4, 4), [((0, 0), (4, 4)), ((4, 0), (0, 4))])  # an empty chunk holds nothing
    assert tiles((), [((), ())])  # a scalar, in one chunk
    assert not tiles((4, 4), halves[:1])  # a gap
    assert not tiles((4, 4), [((0, 0), (3, 4)), ((1, 0), (3, 4))])  # an overlap, sizes adding up
    assert not tiles((4, 4), [((0, 0), (2, 4)), ((3, 0), (2, 4))])  # outside the tensor
    assert not tiles((4, 4), [((0,), (4,)), ((0, 0), (4, 4))])  # of another rank
    assert not tiles((), [((), ()), ((), ())])  # a scalar twice
